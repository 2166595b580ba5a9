"""The image input policy (docs/api.md): decoding, limits, polarity, fitting, exact 90° turns."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from quotient_models.errors import InputError
from quotient_models.images.preprocess import Framing, decode_image

LIMITS = {"max_input_bytes": 1 << 20, "max_pixels": 1 << 20}
FRAME = Framing(radius=10.25)  # rotmnist-c8's frame (tests/unit/test_image_framing.py)


def encode(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def digit(h: int = 28, w: int = 28, seed: int = 0) -> np.ndarray:
    """A dark image with an asymmetric bright blob, uint8."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.uint8)
    img[h // 4 : h // 2, w // 5 : (3 * w) // 5] = rng.integers(
        120, 255, (h // 2 - h // 4, (3 * w) // 5 - w // 5)
    )
    return img


def test_mnist_sized_png_is_used_as_is_without_a_frame():
    img = digit()
    out = decode_image(encode(img), 28, **LIMITS)
    assert out.shape == (28, 28) and out.dtype == np.float32
    np.testing.assert_allclose(out, img / 255.0, atol=1e-7)


@pytest.mark.parametrize("shape", [(28, 28), (56, 56), (40, 30), (31, 64), (200, 120), (5, 9)])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("framing", [None, FRAME], ids=["fitted", "framed"])
def test_policy_commutes_with_90_degree_rotations(shape, k, framing):
    img = digit(*shape)
    a = decode_image(encode(img), 28, framing=framing, **LIMITS)
    b = decode_image(encode(np.ascontiguousarray(np.rot90(img, k))), 28, framing=framing, **LIMITS)
    np.testing.assert_allclose(np.rot90(a, k), b, atol=1e-5)


@pytest.mark.parametrize("framing", [None, FRAME], ids=["fitted", "framed"])
def test_light_background_is_inverted(framing):
    img = digit()
    np.testing.assert_allclose(
        decode_image(encode(255 - img), 28, framing=framing, **LIMITS),
        decode_image(encode(img), 28, framing=framing, **LIMITS),
        atol=1e-6,
    )


def test_rgb_jpeg_and_transparent_png_are_accepted():
    rgb = np.stack([digit()] * 3, axis=-1)
    out = decode_image(encode(rgb, "JPEG"), 28, **LIMITS)
    assert out.shape == (28, 28) and out.min() >= 0 and out.max() <= 1
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 3] = digit()  # black ink drawn only through alpha, on a transparent background
    out = decode_image(encode(rgba, mode="RGBA"), 28, **LIMITS)
    np.testing.assert_allclose(out, digit() / 255.0, atol=1 / 255)


def test_non_square_is_fitted_and_centred_symmetrically():
    out = decode_image(encode(np.full((10, 40), 200, np.uint8)), 28, **LIMITS)
    rows = np.flatnonzero(out.sum(axis=1) > 0)
    assert rows[0] == 28 - 1 - rows[-1]  # same margin top and bottom
    assert np.all(out[:, 0] >= 0)


@pytest.mark.parametrize(
    ("data", "limits", "reason"),
    [
        (b"", LIMITS, "empty image data"),
        (b"not an image at all", LIMITS, "not a decodable image"),
        (
            b"x" * 2000,
            {"max_input_bytes": 1000, "max_pixels": 1 << 20},
            "above the limit of 1000 bytes",
        ),
        (
            encode(np.zeros((300, 300), np.uint8)),
            {"max_input_bytes": 1 << 20, "max_pixels": 10_000},
            "90000 pixels",
        ),
        (encode(digit())[:60], LIMITS, "corrupt or truncated"),
    ],
)
def test_bad_images_raise_input_error_with_reason(data, limits, reason):
    with pytest.raises(InputError, match=reason):
        decode_image(data, 28, **limits)


def test_decompression_bomb_is_refused_before_decoding():
    # a 20000 x 20000 blank PNG compresses to a few hundred kB; only its header is read
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG")
    with pytest.raises(InputError, match="pixels"):
        decode_image(buf.getvalue(), 28, max_input_bytes=1 << 30, max_pixels=16_777_216)


def _tiff(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_float_tiff_with_non_finite_pixels_is_refused(bad):
    pixels = digit().astype(np.float32)
    pixels[3, 4] = bad  # answered OK with an all-NaN embedding before
    with pytest.raises(InputError, match="1 pixel values that are NaN or infinite"):
        decode_image(_tiff(Image.fromarray(pixels, mode="F")), 28, **LIMITS)
    finite = decode_image(
        _tiff(Image.fromarray(digit().astype(np.float32), mode="F")), 28, **LIMITS
    )
    assert np.isfinite(finite).all()


def test_an_image_mode_without_a_grayscale_conversion_is_refused():
    with pytest.raises(InputError, match="image mode LAB cannot be converted"):  # was INTERNAL
        decode_image(_tiff(Image.new("LAB", (28, 28))), 28, **LIMITS)
