"""Invariant projections of equivariant latents (Hansen, Calissano & Feragen, ICML 2024):
cyclic-group heads for images."""

from quotient_models.projections._cyclic import (
    CyclicProjectionHead,
    align,
    group_max,
    group_mean,
    max_filter,
)
from quotient_models.projections._types import METRICS, ProjectionInfo, ProjectionOutput

__all__ = [
    "METRICS",
    "CyclicProjectionHead",
    "ProjectionInfo",
    "ProjectionOutput",
    "align",
    "group_max",
    "group_mean",
    "max_filter",
]
