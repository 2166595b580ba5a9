"""Centring and scaling an image's content in the model's frame, as MNIST was prepared.

MNIST's digits were fitted into a 20x20 box (aspect kept) and placed in the 28x28 frame by their
centre of mass. A bounding box depends on the orientation (a digit turned by 45 degrees has a box
up to 1.41 times larger), and the service's point is that turning an image turns the model input
and nothing else, so the scale here comes from a rotation-invariant size instead: the radius
about the centre of mass that holds ``quantile`` of the ink, calibrated on the MNIST training
digits (``python -m quotient_models.images.evaluate calibrate``) so that they keep their size in
the median. The model card compares it with a bounding box and with centring alone.

Steps, on a grayscale image in [0, 1] with light content on a dark background (after the polarity
rule of ``preprocess``):

1. levels: the median of the 1-pixel border is the background level; it becomes 0, 1 stays 1; an
   image with nothing brighter than its background is blank (no frame: ``frame_content`` → None);
2. ink: a pixel weighs ``v - threshold * max(v)`` where that is positive, so faint noise, paper
   texture and JPEG ringing weigh nothing;
3. content: the ink within ``trim`` times its median radius of its geometric median (which a
   minority of the ink cannot move far), so that specks and marks away from the content count
   for nothing; its centre of mass c, and its size r, the radius about c holding ``quantile`` of it;
4. resampling: output pixel o of the ``size`` x ``size`` frame (centre o0 = (size - 1) / 2) takes
   the input at c + (o - o0) / s, s = ``radius`` / r (at most ``max_magnification``), through a
   separable triangle (bilinear) filter widened to 1 / s input pixels when shrinking
   (antialiased); outside the image is background (0).

Moving or scaling the content leaves the output unchanged up to interpolation; rotating it about
any point rotates the output about o0 (exactly for multiples of 90 degrees: every step commutes
with them, the mask, the medians and the moments included).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "MEASURE_PIXELS",
    "SIZES",
    "Content",
    "Framing",
    "find_content",
    "frame_content",
    "levels",
]

SIZES = ("mass_radius", "box", "none")
_BINS = 4096  # radius histogram bins: the size quantile's resolution is its range / 4096
# Larger images are measured on an area-averaged copy of at most this many pixels first, then at
# full resolution within the content's window: a 4096x4096 image takes 0.1 s, not 8 s.
MEASURE_PIXELS = 512 * 512


@dataclass(frozen=True)
class Framing:
    """A model's framing policy: ``model.json`` ``"input": {"frame": {...}}``.

    ``size`` is what is scaled to ``radius`` output pixels: ``mass_radius`` (the radius holding
    ``quantile`` of the ink; rotation-invariant, the policy served), ``box`` (half the longest
    side of the content's bounding box, as MNIST did; depends on the orientation) or ``none``
    (centring only); the last two are kept for the model card's comparison."""

    radius: float
    size: str = "mass_radius"
    quantile: float = 0.95
    threshold: float = 0.25
    trim: float = 3.0
    max_magnification: float = 8.0
    centre: str = "mass"

    def __post_init__(self) -> None:
        if self.centre != "mass":
            raise ValueError(f"input.frame.centre {self.centre!r}: only 'mass' is known")
        if self.size not in SIZES:
            raise ValueError(f"input.frame.size {self.size!r}: choose one of {SIZES}")
        ok = (
            self.radius > 0
            and 0 < self.quantile <= 1
            and 0 <= self.threshold < 1
            and self.trim > 1
            and self.max_magnification >= 1
        )
        if not ok:
            raise ValueError(f"input.frame: values out of range: {asdict(self)}")

    @classmethod
    def from_spec(cls, value: dict[str, Any] | None) -> Framing | None:
        """The policy of a ``model.json`` ``input.frame`` entry; None where there is none."""
        if value is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"input.frame: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**value)


@dataclass(frozen=True)
class Content:
    """Where the content of an image is, in its input pixels (row, col from the top left)."""

    row: float  # centre of mass
    col: float
    size: float  # what ``Framing.size`` measures (0 for ``none``)
    reach: float  # radius about the geometric median within which ink counts as content


def levels(gray: np.ndarray) -> np.ndarray | None:
    """Background (the median of the 1-pixel border) to 0, 1 kept; None for a blank image."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if float(gray.max()) - background <= 1.0 / 512:  # under half an 8-bit step: nothing there
        return None
    if background <= 0.0:
        return gray
    out = gray - np.float32(background)
    out *= np.float32(1.0 / (1.0 - background))
    np.maximum(out, 0.0, out=out)
    return out


def _geometric_median(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, iterations: int = 16
) -> tuple[float, float]:
    """Weighted geometric median by Weiszfeld's iteration, from the centre of mass."""
    cy = float(np.dot(rows, weights)) / float(weights.sum())
    cx = float(np.dot(cols, weights)) / float(weights.sum())
    for _ in range(iterations):
        w = weights / np.maximum(np.hypot(rows - cy, cols - cx), 0.5)
        total = float(w.sum())
        y, x = float(np.dot(rows, w)) / total, float(np.dot(cols, w)) / total
        moved = abs(y - cy) + abs(x - cx)
        cy, cx = y, x
        if moved < 1e-3:  # a thousandth of a pixel: settled
            break
    return cy, cx


def _radius(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, cy: float, cx: float, q: float
) -> float:
    """The radius about (cy, cx) holding ``q`` of the weights (a weighted histogram quantile,
    linear within a bin: one pass, where a sort of a large image's ink would take seconds)."""
    r = np.hypot(rows - cy, cols - cx)
    top = float(r.max())
    if top <= 0.0:
        return 0.0
    total = float(weights.sum())
    hist = np.bincount(np.minimum((r * (_BINS / top)).astype(np.int64), _BINS - 1), weights, _BINS)
    cdf = np.cumsum(hist) / total
    i = min(int(np.searchsorted(cdf, q)), _BINS - 1)
    below = float(cdf[i - 1]) if i > 0 else 0.0
    within = (q - below) * total / float(hist[i]) if hist[i] > 0 else 1.0
    return (i + min(max(within, 0.0), 1.0)) * top / _BINS


def _measure(image: np.ndarray, framing: Framing) -> Content | None:
    cut = framing.threshold * float(image.max())
    rows_i, cols_i = np.nonzero(image > cut)
    if len(rows_i) == 0:
        return None
    weights = image[rows_i, cols_i].astype(np.float64) - cut
    rows, cols = rows_i.astype(np.float64), cols_i.astype(np.float64)
    gy, gx = _geometric_median(rows, cols, weights)
    reach = framing.trim * max(_radius(rows, cols, weights, gy, gx, 0.5), 0.5)
    near = np.hypot(rows - gy, cols - gx) <= reach
    rows, cols, weights = rows[near], cols[near], weights[near]
    total = float(weights.sum())
    cy, cx = float(np.dot(rows, weights)) / total, float(np.dot(cols, weights)) / total
    if framing.size == "mass_radius":
        size = _radius(rows, cols, weights, cy, cx, framing.quantile)
    elif framing.size == "box":
        size = (float(max(np.ptp(rows), np.ptp(cols))) + 1.0) / 2.0
    else:
        size = 0.0
    return Content(cy, cx, size, reach)


def find_content(image: np.ndarray, framing: Framing) -> Content | None:
    """Centre and size of the content of a levelled image (``levels``), steps 2 and 3; None when
    no pixel weighs anything. An image above ``MEASURE_PIXELS`` is measured on an area-averaged
    copy, then again at full resolution within the content's window where that is smaller."""
    h, w = image.shape
    if h * w <= MEASURE_PIXELS:
        return _measure(image, framing)
    f = float(np.sqrt(h * w / MEASURE_PIXELS))
    small_h, small_w = max(1, round(h / f)), max(1, round(w / f))
    small = Image.fromarray(np.asarray(image, np.float32), mode="F")
    coarse = _measure(np.asarray(small.resize((small_w, small_h), Image.Resampling.BOX)), framing)
    if coarse is None:
        return None
    sy, sx = h / small_h, w / small_w
    step = (sy + sx) / 2.0
    mapped = Content(
        (coarse.row + 0.5) * sy - 0.5,
        (coarse.col + 0.5) * sx - 0.5,
        coarse.size * step,
        coarse.reach * step,
    )
    margin = mapped.reach + 2.0 * step  # the averaging spreads the content by a cell
    top, bottom = max(0, int(np.floor(mapped.row - margin))), int(np.ceil(mapped.row + margin))
    left, right = max(0, int(np.floor(mapped.col - margin))), int(np.ceil(mapped.col + margin))
    crop = image[top : bottom + 1, left : right + 1]
    if crop.size > h * w // 2:  # the content spans the image: the copy's measure is as good
        return mapped
    fine = find_content(crop, framing)
    if fine is None:
        return mapped
    return Content(fine.row + top, fine.col + left, fine.size, fine.reach)


def _kernel(n_in: int, n_out: int, centre: float, scale: float) -> tuple[np.ndarray, int]:
    """One axis of the resampling: weights [n_out, window] and the window's first input index.

    Output o takes the input at u = centre + (o - o0) / scale through a triangle of half-width
    a = max(1, 1/scale) input pixels, normalised over all integers (outside the image is 0)."""
    o0 = (n_out - 1) / 2.0
    u = centre + (np.arange(n_out) - o0) / scale
    a = max(1.0, 1.0 / scale)
    first = max(0, int(np.floor(u.min() - a)) + 1)
    last = min(n_in - 1, int(np.ceil(u.max() + a)) - 1)
    if last < first:  # the frame sees none of the image
        return np.zeros((n_out, 1)), 0
    k = np.arange(first, last + 1, dtype=np.float64)
    w = np.maximum(0.0, 1.0 - np.abs(k[None, :] - u[:, None]) / a)
    span = np.arange(-np.ceil(a), np.ceil(a) + 1)
    full = np.maximum(0.0, 1.0 - np.abs(np.round(u)[:, None] + span[None, :] - u[:, None]) / a)
    return w / full.sum(axis=1, keepdims=True), first


def frame_content(image: np.ndarray, size: int, framing: Framing) -> np.ndarray | None:
    """A levelled image (``levels``) → [size, size] float32 with its content centred and scaled
    (step 4); None when nothing weighs anything."""
    content = find_content(image, framing)
    if content is None:
        return None
    scale = 1.0
    if framing.size != "none":
        scale = min(framing.radius / max(content.size, 1e-6), framing.max_magnification)
    ky, top = _kernel(image.shape[0], size, content.row, scale)
    kx, left = _kernel(image.shape[1], size, content.col, scale)
    window = image[top : top + ky.shape[1], left : left + kx.shape[1]].astype(np.float32)
    return np.asarray(ky.astype(np.float32) @ window @ kx.T.astype(np.float32), np.float32)
