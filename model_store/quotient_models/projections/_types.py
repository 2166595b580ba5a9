"""Value types shared by every projection head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The distances a projection can name (quotient.v1.DistanceMetric): "cosine" (1 - cosine
# similarity), "l2" (Euclidean), "inner_product" (larger is nearer).
METRICS = ("cosine", "l2", "inner_product")


@dataclass(frozen=True)
class ProjectionInfo:
    """What a projection computes; mirrors quotient.v1.Projection. ``metric`` is the distance to
    compare (search, cluster) its embeddings with, chosen by measuring neighbour quality (the
    model card); ``normalized`` says whether the served vectors already have unit L2 norm."""

    name: str
    dimension: int
    invariant: bool
    description: str
    returns_pose: bool = False
    metric: str = "l2"
    normalized: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(
                f"projection {self.name!r}: metric must be one of {', '.join(METRICS)}, "
                f"got {self.metric!r}"
            )


@dataclass
class ProjectionOutput:
    """Embeddings of a batch: values [B, D] float32, and poses [B] in degrees when computed."""

    values: np.ndarray
    poses: np.ndarray | None = None
