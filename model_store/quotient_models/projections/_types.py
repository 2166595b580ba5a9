"""Value types shared by every projection head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProjectionInfo:
    """What a projection computes; mirrors quotient.v1.Projection."""

    name: str
    dimension: int
    invariant: bool
    description: str
    returns_pose: bool = False


@dataclass
class ProjectionOutput:
    """Embeddings of a batch: values [B, D] float32, and poses [B] in degrees when computed."""

    values: np.ndarray
    poses: np.ndarray | None = None
