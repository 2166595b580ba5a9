"""Image decoding and the input policy of image models (documented in docs/api.md).

Policy, in order:
1. size checks before decoding: at most ``max_input_bytes`` encoded bytes and ``max_pixels``
   pixels (read from the header, so a decompression bomb is refused without decoding it);
2. decode with Pillow (PNG, JPEG, BMP, GIF first frame, TIFF, WebP); apply the EXIF orientation;
3. transparency: composited onto a background of the opposite brightness to the opaque pixels;
4. grayscale (ITU-R 601-2 luma), scaled to [0, 1];
5. polarity: MNIST digits are light strokes on a dark background; if the 1-pixel border is on
   average lighter than 0.5, the image is inverted;
6. frame, for models whose ``model.json`` declares ``input.frame`` (rotmnist-c8 does, since
   1.1.0): the content is centred and scaled the way MNIST was prepared, but by a size that does
   not depend on its orientation (``quotient_models/images/framing.py``). The median of the
   1-pixel border becomes the background level 0; the ink (pixels above a quarter of the
   brightest, less that quarter) within 3 times its median radius of its geometric median is
   the content, so specks and marks away from it count for nothing; the image is resampled
   (separable bilinear, antialiased when shrinking, zero outside) so that the content's centre
   of mass lands on the frame's centre and the radius about it holding 95% of its ink measures
   ``frame.radius`` pixels (for rotmnist-c8 the median of the MNIST training digits, so that
   they keep their size in the median), enlarging at most 8 times (the numbers are
   rotmnist-c8's: ``threshold``, ``trim``, ``quantile``, ``radius``, ``max_magnification`` in
   ``input.frame``). A blank image (nothing brighter than its background) and models without
   ``input.frame`` get step 7 instead;
7. size: a ``size`` x ``size`` image is used as it is; any other is resized (bilinear, antialiased)
   so that its longest side is ``size`` and the other keeps the aspect ratio, rounded to the same
   parity as ``size``, then centred with equal zero padding on both sides.

Every step commutes with 90-degree rotations, so rotating the file by 90 degrees rotates the model
input exactly; with the frame, moving or scaling the content on a larger canvas leaves the model
input unchanged up to interpolation.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from quotient_models.errors import InputError
from quotient_models.images.framing import Framing, frame_content, levels

__all__ = ["FORMATS", "Framing", "decode_image", "header_pixels", "model_input"]

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")


def _open(data: bytes, max_input_bytes: int, max_pixels: int) -> Image.Image:
    if not data:
        raise InputError("empty image data")
    if len(data) > max_input_bytes:
        raise InputError(f"image is {len(data)} bytes, above the limit of {max_input_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"image has too many pixels (limit {max_pixels})") from None
    except Exception:  # Pillow's message names a memory address; ours names the formats
        raise InputError(f"not a decodable image (expected one of {', '.join(FORMATS)})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    try:
        image.seek(0)
        image.load()
        return ImageOps.exif_transpose(image) or image
    except Exception as exc:
        raise InputError(
            f"image data is corrupt or truncated ({image.format}): {_clean(exc)}"
        ) from None


def header_pixels(data: bytes) -> int:
    """Width x height from the image header, without decoding (0 when unreadable)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=FORMATS) as image:
                width, height = image.size
    except Exception:  # unreadable, or a bomb Pillow refuses outright: never decoded either
        return 0
    return max(0, width) * max(0, height)


def _clean(exc: Exception) -> str:
    """Exception text without object reprs (``<... at 0x...>``), which differ on every call."""
    import re

    return re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the data", str(exc))


def _floats(image: Image.Image) -> np.ndarray:
    """Pixels as float32, converted from the image's own dtype (``np.asarray(image,
    dtype=np.float32)`` takes Pillow's slow path: 0.14 s instead of 0.02 s for 4096x4096)."""
    return np.asarray(image).astype(np.float32)


def _grayscale(image: Image.Image) -> np.ndarray:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        # luma by Pillow (the same weights, as for opaque images), then two float planes in
        # place: a [H, W, 4] float array made a 4096x4096 RGBA image take 1.7 s
        luma = _floats(rgba.convert("L"))
        luma /= 255.0
        alpha = _floats(rgba.getchannel("A"))
        alpha /= 255.0
        total = float(alpha.sum(dtype=np.float64))
        ink = float(np.vdot(luma, alpha)) / total if total > 0 else 1.0
        background = 1.0 if ink < 0.5 else 0.0
        luma *= alpha
        if background:
            luma += 1.0 - alpha
        return luma
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = _floats(image)
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        if bad:  # a float TIFF may hold them; they would make the whole embedding NaN
            raise InputError(f"image has {bad} pixel values that are NaN or infinite")
        top = float(arr.max())
        return arr / top if top > 0 else arr
    try:
        return _floats(image.convert("L")) / 255.0
    except (ValueError, OSError) as exc:  # modes Pillow cannot convert (LAB, ...)
        raise InputError(
            f"image mode {image.mode} cannot be converted to grayscale ({_clean(exc)}); "
            "send grayscale, RGB or RGBA"
        ) from None


def _fit(gray: np.ndarray, size: int) -> np.ndarray:
    height, width = gray.shape
    if (height, width) == (size, size):
        return gray
    scale = size / max(height, width)

    def side(n: int) -> int:
        if n == max(height, width):
            return size
        s = max(1, round(n * scale))
        if (size - s) % 2:  # same parity as size, so the padding is symmetric
            s = s + 1 if s < size else s - 1
        return max(s, 2 - size % 2)

    new_h, new_w = side(height), side(width)
    resized = Image.fromarray(gray, mode="F").resize((new_w, new_h), Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = np.asarray(resized, dtype=np.float32)
    return out


def model_input(gray: np.ndarray, size: int, framing: Framing | None = None) -> np.ndarray:
    """A grayscale image [H, W] in [0, 1] → model input [size, size] float32 in [0, 1]: steps 5-7
    of the policy (polarity, frame, size)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if float(border.mean()) > 0.5:
        gray = 1.0 - gray
    framed = None
    if framing is not None:
        levelled = levels(gray)
        framed = None if levelled is None else frame_content(levelled, size, framing)
    out = _fit(gray, size) if framed is None else framed
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def decode_image(
    data: bytes,
    size: int,
    *,
    max_input_bytes: int,
    max_pixels: int,
    framing: Framing | None = None,
) -> np.ndarray:
    """Encoded image bytes → model input [size, size] float32 in [0, 1]; raises InputError."""
    image = _open(data, max_input_bytes, max_pixels)
    return model_input(_grayscale(image), size, framing)
