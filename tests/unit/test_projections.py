"""Properties of the cyclic projections on random latents (Hansen et al., ICML 2024, case 2)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from quotient_models.invariance import assert_invariant
from quotient_models.projections import CyclicProjectionHead, align, max_filter

C, N = 6, 8


@pytest.fixture
def head() -> CyclicProjectionHead:
    return CyclicProjectionHead.create(C, N, seed=7, rotation_shift=1)


@pytest.fixture
def z() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((64, C, N)).astype(np.float32)


def rolls(order: int) -> dict[str, object]:
    return {f"roll{k}": (lambda x, k=k: np.roll(x, k, axis=-1)) for k in range(1, order)}


@pytest.mark.parametrize("name", ["align", "maxfilter", "mean", "max"])
def test_invariant_projections_are_invariant(head, z, name):
    assert_invariant(lambda x: head.apply(name, x).values, z, rolls(N), rtol=1e-6)


def test_raw_latent_is_detected_as_not_invariant(head, z):
    with pytest.raises(AssertionError, match="not invariant"):
        assert_invariant(
            lambda x: head.apply("raw", x).values, z, rolls(N), rtol=1e-3, statistic="median"
        )


def test_aligned_output_lies_on_the_input_orbit(head, z):
    out = head.apply("align", z).values.reshape(z.shape)
    for i in range(len(z)):
        assert any(np.array_equal(out[i], np.roll(z[i], k, -1)) for k in range(N))


def test_align_is_a_cross_section_distance_bounds_orbit_distance(head, z):
    out = head.apply("align", z).values
    a, b = z[:32], z[32:]
    pa, pb = out[:32], out[32:]
    for i in range(32):
        orbit_distance = min(np.linalg.norm(a[i] - np.roll(b[i], k, -1)) for k in range(N))
        assert np.linalg.norm(pa[i] - pb[i]) >= orbit_distance - 1e-5


def test_align_separates_orbits(head, z):
    out = head.apply("align", z).values
    for i, j in itertools.combinations(range(16), 2):
        assert not np.allclose(out[i], out[j])


def test_maxfilter_separates_orbits_with_enough_templates(head, z):
    out = head.apply("maxfilter", z).values
    d = np.linalg.norm(out[:, None] - out[None], axis=-1)
    assert np.min(d[np.triu_indices(len(z), 1)]) > 1e-3


def test_pooling_loses_relative_phase(head):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, C, N)).astype(np.float32)
    b = a.copy()
    b[0, 0] = np.roll(b[0, 0], 3)  # roll one field only: another orbit, same pooled values
    for name in ("mean", "max"):
        np.testing.assert_allclose(
            head.apply(name, a).values, head.apply(name, b).values, rtol=1e-6
        )
    assert not np.allclose(head.apply("align", a).values, head.apply("align", b).values)


def test_pose_follows_the_rotation(head, z):
    base = head.apply("align", z).poses
    for k in range(N):
        moved = head.apply("align", np.roll(z, k, -1)).poses
        np.testing.assert_allclose(np.mod(moved - base, 360), (k * 360 / N) % 360)


def test_pose_sign_follows_rotation_shift(z):
    h = CyclicProjectionHead.create(C, N, seed=7, rotation_shift=-1)
    base, moved = h.apply("align", z).poses, h.apply("align", np.roll(z, -1, -1)).poses
    np.testing.assert_allclose(np.mod(moved - base, 360), 360 / N)


def test_seed_pins_the_references_and_save_load_roundtrips(tmp_path, z):
    a = CyclicProjectionHead.create(C, N, seed=3)
    b = CyclicProjectionHead.create(C, N, seed=3)
    c = CyclicProjectionHead.create(C, N, seed=4)
    assert np.array_equal(a.reference, b.reference) and not np.array_equal(a.reference, c.reference)
    a.save(tmp_path / "p.npz")
    loaded = CyclicProjectionHead.load(tmp_path / "p.npz")
    for name in a.names():
        np.testing.assert_array_equal(a.apply(name, z).values, loaded.apply(name, z).values)


def test_dimensions_match_descriptions(head, z):
    for info in head.describe():
        assert head.apply(info.name, z).values.shape == (len(z), info.dimension)


def test_functions_agree_with_brute_force(z):
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((C, N)).astype(np.float32)
    templates = rng.standard_normal((5, C, N)).astype(np.float32)
    aligned, shifts = align(z, ref)
    for i in range(4):
        scores = [np.sum(np.roll(z[i], s, -1) * ref) for s in range(N)]
        assert shifts[i] == int(np.argmax(scores))
        np.testing.assert_array_equal(aligned[i], np.roll(z[i], shifts[i], -1))
        expected = [max(np.sum(np.roll(z[i], s, -1) * t) for s in range(N)) for t in templates]
        np.testing.assert_allclose(max_filter(z[i : i + 1], templates)[0], expected, rtol=1e-5)


def test_unknown_projection_and_bad_shape_are_clear_errors(head, z):
    with pytest.raises(KeyError, match="unknown projection 'nope'"):
        head.apply("nope", z)
    with pytest.raises(ValueError, match="does not match"):
        head.apply("align", z[:, :, :4])
