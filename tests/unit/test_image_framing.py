"""The frame of the image policy (quotient_models/images/framing.py): content centred by its
centre of mass and scaled by a rotation-invariant size, so that moving or scaling the content
changes nothing and rotating it rotates the model input."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from quotient_models.images.framing import MEASURE_PIXELS, Framing, find_content, levels
from quotient_models.images.preprocess import decode_image, model_input
from quotient_models.images.transforms import rotate_numpy

FRAME = Framing(radius=10.25)  # rotmnist-c8's calibrated radius
BOX = Framing(radius=10.0, size="box")
LIMITS = {"max_input_bytes": 1 << 24, "max_pixels": 1 << 24}


def stroke(side: int = 28, seed: int = 0) -> np.ndarray:
    """A digit-like asymmetric stroke (a hooked, thick polyline, antialiased), float32 [0, 1]."""
    rng = np.random.default_rng(seed)
    big = np.zeros((4 * side, 4 * side), np.float32)
    yy, xx = np.mgrid[0 : 4 * side, 0 : 4 * side]
    pts = [(0.25, 0.3), (0.2, 0.7), (0.55, 0.6), (0.8, 0.35 + 0.1 * rng.random())]
    for (y0, x0), (y1, x1) in itertools.pairwise(pts):
        for t in np.linspace(0, 1, 60):
            cy, cx = 4 * side * (y0 + t * (y1 - y0)), 4 * side * (x0 + t * (x1 - x0))
            big[(yy - cy) ** 2 + (xx - cx) ** 2 <= (0.05 * 4 * side) ** 2] = 1.0
    return np.asarray(Image.fromarray(big, mode="F").resize((side, side), Image.Resampling.BOX))


def place(content: np.ndarray, shape: tuple[int, int], top: int, left: int) -> np.ndarray:
    out = np.zeros(shape, np.float32)
    out[top : top + content.shape[0], left : left + content.shape[1]] = content
    return out


def resized(content: np.ndarray, side: int) -> np.ndarray:
    img = Image.fromarray(content, mode="F").resize((side, side), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img, np.float32), 0.0, 1.0)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).sum() / np.abs(b).sum())


def test_whole_pixel_moves_change_nothing() -> None:
    digit = stroke()
    ref = model_input(digit, 28, FRAME)
    for shape, top, left in [((28, 28), 0, 0), ((64, 64), 30, 2), ((90, 41), 61, 13)]:
        out = model_input(place(digit, shape, top, left), 28, FRAME)
        np.testing.assert_allclose(out, ref, atol=1e-5)


def test_centre_of_mass_lands_on_the_frame_centre_at_the_calibrated_size() -> None:
    out = model_input(place(stroke(40), (120, 80), 70, 5), 28, FRAME)
    found = find_content(out, FRAME)
    assert found is not None
    # re-measured on the resampled output (its threshold cuts other pixels): within 0.1 px
    assert abs(found.row - 13.5) < 0.1 and abs(found.col - 13.5) < 0.1
    assert found.size == pytest.approx(FRAME.radius, rel=0.03)


@pytest.mark.parametrize("side", [28, 40, 70, 84])
def test_scaled_copies_give_nearly_the_same_input(side: int) -> None:
    # resampling twice (copy, then frame) blurs: measured 0.03-0.12 for these sides
    ref = model_input(stroke(56), 28, FRAME)
    out = model_input(place(resized(stroke(56), side), (120, 120), 17, 33), 28, FRAME)
    assert rel(out, ref) < 0.15


@pytest.mark.parametrize(
    "shape", [(28, 28), (64, 64), (61, 90), (5, 9), (700, 1100)]
)  # the last is measured on an averaged copy first (above MEASURE_PIXELS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotating_by_90_degrees_rotates_the_input_exactly(shape: tuple[int, int], k: int) -> None:
    h, w = shape
    side = min(h, w, 28)
    canvas = place(stroke(side), shape, (h - side) // 3, (w - side) // 5)
    a = model_input(canvas, 28, FRAME)
    b = model_input(np.ascontiguousarray(np.rot90(canvas, k)), 28, FRAME)
    np.testing.assert_allclose(np.rot90(a, k), b, atol=1e-5)
    assert h * w <= MEASURE_PIXELS or shape == (700, 1100)


@pytest.mark.parametrize("angle", [30.0, 45.0, 135.0, 200.0])
def test_framing_then_rotating_is_rotating_then_framing(angle: float) -> None:
    canvas = place(stroke(28), (80, 80), 9, 40)
    turned = rotate_numpy(canvas[None], angle)[0]  # about the canvas centre
    a = rotate_numpy(model_input(canvas, 28, FRAME)[None], angle)[0]
    b = model_input(turned, 28, FRAME)
    assert rel(b, a) < 0.15  # bilinear interpolation, twice: measured 0.06-0.09


@pytest.mark.parametrize("angle", [45.0, 135.0])
def test_the_size_is_rotation_invariant_where_a_bounding_box_is_not(angle: float) -> None:
    bar = np.zeros((40, 40), np.float32)
    bar[10:30, 18:22] = 1.0  # an upright "1": its box shrinks by 1.25 at 45 degrees
    turned = levels(rotate_numpy(bar[None], angle)[0])
    assert turned is not None
    # measured: the radius 0.978 (the bilinear turn blurs the edges), the box 0.80
    for policy, low, high in [(FRAME, 0.95, 1.05), (BOX, 0.0, 0.85)]:
        upright, rotated = find_content(bar, policy), find_content(turned, policy)
        assert upright is not None and rotated is not None
        assert low <= rotated.size / upright.size <= high, policy.size


def test_noise_paper_and_jpeg_do_not_move_the_frame() -> None:
    rng = np.random.default_rng(3)
    canvas = place(stroke(36), (128, 128), 70, 20)
    clean = find_content(canvas, FRAME)
    noisy = 0.15 + 0.8 * canvas + rng.normal(0.0, 0.04, canvas.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy * 255, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=70)
    levelled = levels(np.asarray(Image.open(buf), np.float32) / 255.0)
    assert levelled is not None and clean is not None
    found = find_content(levelled, FRAME)
    assert found is not None
    assert abs(found.row - clean.row) < 0.3 and abs(found.col - clean.col) < 0.3
    assert found.size == pytest.approx(clean.size, rel=0.05)


def test_a_stray_mark_away_from_the_content_is_not_content() -> None:
    canvas = place(stroke(30), (160, 160), 10, 10)
    clean = model_input(canvas, 28, FRAME)
    canvas[140:146, 150:156] = 1.0  # a blot, 36 pixels of full ink, far from the digit
    np.testing.assert_allclose(model_input(canvas, 28, FRAME), clean, atol=1e-5)


def test_blank_and_uniform_images_are_fitted_as_before() -> None:
    for img in (np.zeros((64, 48), np.float32), np.full((40, 40), 0.3, np.float32)):
        np.testing.assert_array_equal(model_input(img, 28, FRAME), model_input(img, 28, None))


def test_light_background_and_the_decoded_file_give_the_same_input() -> None:
    canvas = place(stroke(30), (70, 50), 5, 12)
    u8 = np.round(canvas * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(255 - u8).save(buf, format="PNG")
    out = decode_image(buf.getvalue(), 28, framing=FRAME, **LIMITS)
    np.testing.assert_allclose(out, model_input(u8 / np.float32(255), 28, FRAME), atol=1e-5)


def test_tiny_content_is_enlarged_at_most_max_magnification() -> None:
    canvas = np.zeros((40, 40), np.float32)
    canvas[20, 20] = 1.0  # one pixel: size 0
    out = model_input(canvas, 28, FRAME)
    assert np.isfinite(out).all() and 0 < out.max() <= 1
    assert np.count_nonzero(out > 0) <= (2 * FRAME.max_magnification) ** 2


def test_policy_values_are_checked() -> None:
    assert Framing.from_spec(None) is None
    assert Framing.from_spec({"radius": 10.0}) == Framing(radius=10.0)
    with pytest.raises(ValueError, match="unknown keys \\['radii'\\]"):
        Framing.from_spec({"radii": 10.0})
    with pytest.raises(ValueError, match=r"input\.frame\.size 'hull'"):
        Framing(radius=10.0, size="hull")
    with pytest.raises(ValueError, match="out of range"):
        Framing(radius=-1.0)
