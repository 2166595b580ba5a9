"""``Embeddings``: vectors together with what made them (model, version, projection, metric).

Embeddings of different models, versions or projections are not comparable, and each projection
has its own distance. Everything that stores or compares vectors (the vector stores, clustering,
exports) takes an ``Embeddings`` or an ``EmbeddingSpec`` and refuses to mix specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from quotient_client._notes import InputNote

__all__ = ["METRICS", "EmbeddingSpec", "Embeddings", "SpecMismatchError"]

# Distances a projection can name (ProjectionInfo.metric): "cosine" (1 - cos; vectors may be
# normalised first), "l2" (Euclidean), "inner_product" (larger is nearer).
METRICS = ("cosine", "l2", "inner_product")


class SpecMismatchError(ValueError):
    """Vectors of one model/version/projection given to a store, index or estimator built for
    another."""


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a vector is: the model ``name`` and ``version`` that made it, the ``projection``, its
    ``dimension``, the ``metric`` to compare it with and whether the server ``normalized`` it."""

    model: str
    version: str
    projection: str
    dimension: int
    metric: str = "l2"
    normalized: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.dimension < 1:
            raise ValueError(f"dimension must be at least 1, got {self.dimension}")

    def label(self) -> str:
        return (
            f"{self.model} {self.version} / {self.projection} ({self.dimension}-d, {self.metric})"
        )

    def check(self, other: EmbeddingSpec, what: str = "these vectors") -> None:
        """Raise ``SpecMismatchError`` unless ``other`` is the same model, version, projection
        and dimension (the metric follows from them)."""
        mine = (self.model, self.version, self.projection, self.dimension)
        theirs = (other.model, other.version, other.projection, other.dimension)
        if mine != theirs:
            raise SpecMismatchError(
                f"{what} come from {other.label()}, but this holds {self.label()}: embeddings of "
                "different models, versions or projections are not comparable"
            )

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "version": self.version,
            "projection": self.projection,
            "dimension": self.dimension,
            "metric": self.metric,
            "normalized": self.normalized,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> EmbeddingSpec:
        return cls(
            model=str(raw["model"]),
            version=str(raw["version"]),
            projection=str(raw["projection"]),
            dimension=int(raw["dimension"]),  # type: ignore[call-overload]
            metric=str(raw.get("metric", "l2")),
            normalized=bool(raw.get("normalized", False)),
        )


@dataclass(frozen=True)
class Embeddings:
    """``vectors`` float32 [n, spec.dimension], one row per input in the caller's order;
    ``poses`` float64 [n] in degrees (NaN where the projection computes none); ``spec`` says what
    made them; ``notes`` [n] what the server changed in each input, or ignored of it, before
    embedding it (``InputNote``s; an empty tuple for an input embedded as sent)."""

    vectors: np.ndarray
    spec: EmbeddingSpec
    poses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))
    notes: tuple[tuple[InputNote, ...], ...] = ()

    def __post_init__(self) -> None:
        v = np.asarray(self.vectors, np.float32)
        if v.ndim != 2 or v.shape[1] != self.spec.dimension:
            raise ValueError(
                f"vectors must be [n, {self.spec.dimension}] for {self.spec.label()}, got "
                f"{list(v.shape)}"
            )
        object.__setattr__(self, "vectors", v)
        if len(self.poses) == 0 and len(v):
            object.__setattr__(self, "poses", np.full(len(v), np.nan))
        if not self.notes:
            object.__setattr__(self, "notes", ((),) * len(v))
        elif len(self.notes) != len(v):
            raise ValueError(f"{len(self.notes)} notes for {len(v)} vectors; one per row")

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, rows: slice | list[int] | np.ndarray) -> Embeddings:
        picked = np.arange(len(self))[rows]
        notes = tuple(self.notes[i] for i in np.atleast_1d(picked))
        return Embeddings(self.vectors[rows], self.spec, self.poses[rows], notes)

    @property
    def noted(self) -> list[int]:
        """The rows whose inputs have notes (the server changed or ignored something)."""
        return [i for i, n in enumerate(self.notes) if n]
