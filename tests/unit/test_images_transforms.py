"""Rotations (direction, exactness at 90-degree multiples, batching) and the radial profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quotient_models.images.transforms import radial_profile, rotate, rotate_numpy


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("k", [1, 2, 3, -1])
def test_rotate_matches_rot90(images: torch.Tensor, k: int) -> None:
    expected = torch.rot90(images, k, dims=(-2, -1))
    assert torch.allclose(rotate(images, 90.0 * k), expected, atol=1e-5)


def test_rotate_is_counter_clockwise_as_displayed() -> None:
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 2] = 1.0  # top centre
    out = rotate(x, 90.0)[0, 0]
    assert out[2, 0] == pytest.approx(1.0, abs=1e-5)  # → left centre
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)


def test_rotate_non_square_180(images: torch.Tensor) -> None:
    x = images[:, :, :6, :10]
    assert torch.allclose(rotate(x, 180.0), torch.rot90(x, 2, dims=(-2, -1)), atol=1e-5)


def test_rotate_batched_angles(images: torch.Tensor) -> None:
    angles = torch.tensor([0.0, 90.0, 33.0, 180.0, 270.0])
    out = rotate(images, angles)
    for i, a in enumerate(angles.tolist()):
        assert torch.allclose(out[i : i + 1], rotate(images[i : i + 1], a), atol=1e-6)
    assert torch.allclose(out[0], images[0], atol=1e-5)


def test_rotate_composes_and_inverts() -> None:
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 4:24, 12:16] = 1.0  # a bar inside the inscribed disc
    mass = float(x.sum())
    back = float((rotate(rotate(x, 30.0), -30.0) - x).abs().sum()) / mass  # interpolation blur only
    moved = float((rotate(x, 30.0) - x).abs().sum()) / mass
    assert back < 0.3 < 1.0 < moved


def test_rotate_rejects_bad_shapes(images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        rotate(images[:, 0], 90.0)
    with pytest.raises(ValueError):
        rotate(images, torch.zeros(3))


def test_rotate_numpy_accepts_3d(images: torch.Tensor) -> None:
    x = images[:, 0].numpy()
    assert rotate_numpy(x, 90.0).shape == x.shape
    np.testing.assert_allclose(rotate_numpy(x, 90.0), np.rot90(x, 1, axes=(-2, -1)), atol=1e-5)


def test_radial_profile_shape_and_mean() -> None:
    x = np.ones((2, 28, 28), dtype=np.float32)
    prof = radial_profile(x)
    assert prof.shape == (2, 20)  # floor of the largest distance (19.09) + 1 rings
    np.testing.assert_allclose(prof, 1.0, rtol=1e-6)


def test_radial_profile_is_rotation_invariant_and_informative(images: torch.Tensor) -> None:
    x = images[:, 0].numpy()
    for k in (1, 2, 3):
        np.testing.assert_allclose(
            radial_profile(np.rot90(x, k, axes=(-2, -1))), radial_profile(x), atol=1e-6
        )
    ring = np.zeros((1, 28, 28), dtype=np.float32)
    ring[0, 13:15, 20:24] = 1.0
    prof = radial_profile(ring)[0]
    assert prof[:5].max() == 0 and prof[6:11].max() > 0  # energy only at radius ~6-10
