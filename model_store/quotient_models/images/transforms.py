"""Image rotations for training and evaluation, and the radial-profile baseline.

Conventions: images are [B, 1, H, W] (or [B, H, W]) with row 0 at the top, as displayed. A positive
angle rotates counter-clockwise *as displayed*, about the centre ((H-1)/2, (W-1)/2), the same
direction as ``torch.rot90(x, 1, dims=(-2, -1))`` and ``np.rot90``. Rotations by multiples of 90
degrees are exact on the pixel grid (``rotate`` reproduces ``rot90`` to float precision); other
angles use bilinear interpolation with zero fill.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["radial_profile", "rotate", "rotate_numpy"]


def rotate(images: torch.Tensor, degrees: torch.Tensor | float) -> torch.Tensor:
    """Rotate [B, C, H, W] counter-clockwise (as displayed) by ``degrees`` (scalar or [B])."""
    if images.ndim != 4:
        raise ValueError(f"expected [B, C, H, W], got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    angle = torch.as_tensor(degrees, dtype=torch.float64, device=images.device)
    angle = angle.expand(b) if angle.ndim == 0 else angle
    if angle.shape != (b,):
        raise ValueError(f"degrees must be a scalar or have shape [{b}], got {tuple(angle.shape)}")
    rad = angle * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)
    # The output pixel at (x, y) (x right, y down) samples the input at R^-1 (x, y); with y pointing
    # down, a CCW-as-displayed rotation has R^-1 = [[cos, -sin], [sin, cos]]. affine_grid works in
    # coordinates normalised per axis, so conjugate by the half-sizes for non-square images.
    sx, sy = (w - 1) / 2.0, (h - 1) / 2.0
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=images.device)
    theta[:, 0, 0] = cos
    theta[:, 0, 1] = -sin * (sy / sx if sx else 1.0)
    theta[:, 1, 0] = sin * (sx / sy if sy else 1.0)
    theta[:, 1, 1] = cos
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=True)
    return F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=True
    )


def rotate_numpy(images: np.ndarray, degrees: np.ndarray | float) -> np.ndarray:
    """``rotate`` for numpy float32 [B, 1, H, W] or [B, H, W] arrays."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    squeeze = x.ndim == 3
    if squeeze:
        x = x[:, None]
    d = torch.as_tensor(np.asarray(degrees, dtype=np.float64))
    out = rotate(x, d).numpy()
    return out[:, 0] if squeeze else out


def radial_profile(images: np.ndarray) -> np.ndarray:
    """Mean intensity per integer-radius ring about the centre: [B, H, W] → [B, R] float32.

    Ring r holds the pixels whose distance d to ((H-1)/2, (W-1)/2) has floor(d) = r (on an even
    grid no pixel centre is closer than 0.7, so rounding would leave ring 0 empty); invariant to
    rotations up to interpolation. The hand-crafted rotation-invariant baseline.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    _, h, w = images.shape
    yy, xx = np.mgrid[0:h, 0:w]
    ring = np.floor(np.hypot(yy - (h - 1) / 2.0, xx - (w - 1) / 2.0)).astype(np.int64).ravel()
    n_rings = int(ring.max()) + 1
    one_hot = np.zeros((h * w, n_rings))
    one_hot[np.arange(h * w), ring] = 1.0
    one_hot /= one_hot.sum(axis=0, keepdims=True)
    return (images.reshape(len(images), -1) @ one_hot).astype(np.float32)
