"""Clustering of embeddings under their model's metric: k-means (FAISS) and density-based
(scikit-learn's HDBSCAN and DBSCAN).

    from quotient_client.cluster import kmeans
    result = kmeans(client.embed(images), k=10)    # Clustering: labels, centroids, inertia, spec

Each function takes an ``Embeddings`` (its ``spec.metric`` decides the distance) or a plain
float array [n, d] (``metric`` then defaults to "l2"); ``metric=`` overrides either:

- "l2": Euclidean; k-means minimises squared distances, centroids are means.
- "cosine": rows are normalised to unit length first; k-means is spherical (unit centroids,
  assignment by the largest cosine), density methods use the cosine distance 1 - cos.
- "inner_product": k-means assigns each row to the unit centroid of largest inner product
  (FAISS's spherical k-means, rows not normalised). Density methods need a distance and refuse it
  unless the spec says the server normalised the vectors (then it is the cosine).

Needs ``quotient-client[faiss]`` for ``kmeans`` and ``quotient-client[sklearn]`` for ``hdbscan``
and ``dbscan``; both are imported only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from quotient_client._embeddings import METRICS, Embeddings, EmbeddingSpec

__all__ = ["Clustering", "dbscan", "hdbscan", "kmeans"]

NOISE = -1  # the label of rows a density method leaves out of every cluster


@dataclass(frozen=True)
class Clustering:
    """The result of a clustering.

    ``labels`` int64 [n]: each row's cluster, ``-1`` for noise (density methods only);
    ``centroids`` float32 [n_clusters, d]: cluster ``j``'s centroid in row ``j`` (unit length
    for "cosine" and "inner_product"); ``inertia``: the sum over clustered rows of the distance to
    their centroid (squared Euclidean for "l2", ``1 - cos`` for "cosine", minus the inner product
    for "inner_product"; lower is tighter); ``metric`` the metric used and ``spec`` what made the
    vectors (None for a plain array)."""

    labels: np.ndarray
    centroids: np.ndarray
    inertia: float
    metric: str
    spec: EmbeddingSpec | None = None

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    def sizes(self) -> np.ndarray:
        """int64 [n_clusters]: the number of rows in each cluster (noise not counted)."""
        return np.bincount(self.labels[self.labels >= 0], minlength=self.n_clusters)

    def predict(self, embeddings: Embeddings | np.ndarray) -> np.ndarray:
        """The nearest centroid (under ``metric``) of each row of ``embeddings`` → int64 [m].
        ``Embeddings`` of another model, version or projection raise ``SpecMismatchError``."""
        if self.n_clusters == 0:
            raise ValueError("this clustering has no clusters (every row was noise)")
        x, spec = _matrix(embeddings, "predict", allow_empty=True)
        if self.spec is not None and spec is not None:
            self.spec.check(spec, "the vectors to predict")
        if x.shape[1] != self.centroids.shape[1]:
            raise ValueError(
                f"predict: vectors have {x.shape[1]} values, "
                f"the centroids {self.centroids.shape[1]}"
            )
        return _assign(_prepare(x, self.metric, "predict"), self.centroids, self.metric)[0]


def kmeans(
    embeddings: Embeddings | np.ndarray,
    k: int,
    *,
    metric: str | None = None,
    seed: int = 0,
    niter: int = 25,
    nredo: int = 3,
    max_points_per_centroid: int = 256,
) -> Clustering:
    """k-means with FAISS (``faiss.Kmeans``): ``k`` clusters of the rows of ``embeddings``.

    ``niter`` iterations of Lloyd's algorithm, repeated ``nredo`` times from different seeded
    random starts, the best objective winning (FAISS starts from random rows, not k-means++: one
    start often ends in a poor local optimum); the same ``seed`` gives the same clusters. FAISS
    trains on a random sample of at most ``max_points_per_centroid * k`` rows, then assigns every
    row.
    Raises ``ValueError`` for empty input, a row that is not finite (or all zero, for "cosine"),
    a shape that is not [n, d] or ``k`` outside 1..n; ``ImportError`` without faiss."""
    x, spec = _matrix(embeddings, "kmeans")
    metric = _metric(metric, spec)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"kmeans: k must be a positive integer, got {k!r}")
    if k > len(x):
        raise ValueError(f"kmeans: k={k} clusters need at least {k} rows, got {len(x)}")
    for name, value in (
        ("niter", niter),
        ("nredo", nredo),
        ("max_points_per_centroid", max_points_per_centroid),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"kmeans: {name} must be a positive integer, got {value!r}")
    faiss = _import("faiss", "faiss", "kmeans")
    x = _prepare(x, metric, "kmeans")
    km = faiss.Kmeans(
        x.shape[1],
        int(k),
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=metric != "l2",
        verbose=False,
        min_points_per_centroid=1,  # no warning for small inputs; k <= n is checked above
        max_points_per_centroid=max_points_per_centroid,
    )
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, np.float32)
    labels, inertia = _assign(x, centroids, metric)
    return Clustering(labels, centroids, inertia, metric, spec)


def hdbscan(
    embeddings: Embeddings | np.ndarray,
    *,
    min_cluster_size: int = 5,
    min_samples: int | None = None,
    metric: str | None = None,
    **options: Any,
) -> Clustering:
    """HDBSCAN (``sklearn.cluster.HDBSCAN``): clusters of varying density, no ``k`` to choose;
    rows in no dense region are noise (label -1). ``options`` go to scikit-learn as they are
    (``cluster_selection_epsilon``, ``cluster_selection_method``, ...). Centroids are the means of
    the members (normalised for "cosine"). "cosine" is computed exactly, pairwise (memory grows
    with n²: subsample beyond some 20,000 rows). Errors as for ``kmeans``."""
    x, spec = _matrix(embeddings, "hdbscan")
    metric = _density_metric(metric, spec, "hdbscan")
    from_sklearn = _import("sklearn.cluster", "sklearn", "hdbscan")
    x = _prepare(x, metric, "hdbscan")
    if len(x) < 2:
        raise ValueError(f"hdbscan: needs at least 2 rows, got {len(x)}")
    model = from_sklearn.HDBSCAN(
        min_cluster_size=min_cluster_size,
        min_samples=min_samples,
        metric="euclidean" if metric == "l2" else "cosine",
        copy=True,
        **options,
    )
    return _from_labels(x, model.fit_predict(x), metric, spec)


def dbscan(
    embeddings: Embeddings | np.ndarray,
    eps: float,
    *,
    min_samples: int = 5,
    metric: str | None = None,
    **options: Any,
) -> Clustering:
    """DBSCAN (``sklearn.cluster.DBSCAN``): rows with at least ``min_samples`` neighbours within
    ``eps`` (in the metric's own unit: Euclidean distance for "l2", ``1 - cos`` for "cosine") are
    cores; clusters are the cores connected through them and their neighbours, the rest is noise
    (label -1). Centroids and errors as for ``hdbscan``."""
    x, spec = _matrix(embeddings, "dbscan")
    metric = _density_metric(metric, spec, "dbscan")
    if not np.isfinite(eps) or eps <= 0:
        raise ValueError(f"dbscan: eps must be a positive distance, got {eps!r}")
    from_sklearn = _import("sklearn.cluster", "sklearn", "dbscan")
    x = _prepare(x, metric, "dbscan")
    model = from_sklearn.DBSCAN(
        eps=eps,
        min_samples=min_samples,
        metric="euclidean" if metric == "l2" else "cosine",
        **options,
    )
    return _from_labels(x, model.fit_predict(x), metric, spec)


# ---------------------------------------------------------------- helpers


def _import(module: str, extra: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}: pip install 'quotient-client[{extra}]'"
        ) from exc


def _matrix(
    embeddings: Embeddings | np.ndarray, what: str, allow_empty: bool = False
) -> tuple[np.ndarray, EmbeddingSpec | None]:
    """The float32 [n, d] rows and the spec (None for a plain array), checked."""
    spec = embeddings.spec if isinstance(embeddings, Embeddings) else None
    raw = embeddings.vectors if isinstance(embeddings, Embeddings) else embeddings
    try:
        x = np.asarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what}: embeddings must be a float array [n, d]: {exc}") from None
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{what}: embeddings must be a float array [n, d], got shape {x.shape}")
    if len(x) == 0 and not allow_empty:
        raise ValueError(f"{what}: no embeddings (0 rows)")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if len(bad):
        raise ValueError(
            f"{what}: row {int(bad[0])} is not finite (NaN or infinity; {len(bad)} such rows)"
        )
    return np.ascontiguousarray(x), spec


def _metric(metric: str | None, spec: EmbeddingSpec | None) -> str:
    chosen = metric if metric is not None else (spec.metric if spec is not None else "l2")
    if chosen not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {chosen!r}")
    return chosen


def _density_metric(metric: str | None, spec: EmbeddingSpec | None, what: str) -> str:
    chosen = _metric(metric, spec)
    if chosen == "inner_product":
        if spec is not None and spec.normalized:
            return "cosine"  # unit vectors: the inner product is the cosine
        raise ValueError(
            f"{what} needs a distance, and an inner product of vectors that are not normalised is "
            "none: pass metric='cosine' (or 'l2')"
        )
    return chosen


def _prepare(x: np.ndarray, metric: str, what: str) -> np.ndarray:
    """Rows normalised to unit length for "cosine"; unchanged otherwise."""
    if metric != "cosine":
        return x
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    zero = np.flatnonzero(norms == 0)
    if len(zero):
        raise ValueError(f"{what}: row {int(zero[0])} is all zeros and has no cosine to anything")
    return np.ascontiguousarray(x / norms[:, None], dtype=np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, float]:
    """Nearest centroid of each row, and the summed distance to it (float64)."""
    x64, c64 = x.astype(np.float64), centroids.astype(np.float64)
    if metric == "l2":
        d = (x64**2).sum(1)[:, None] - 2 * x64 @ c64.T + (c64**2).sum(1)[None]
        labels = d.argmin(axis=1)
        cost = np.maximum(d[np.arange(len(x)), labels], 0.0).sum()
    else:
        score = x64 @ c64.T
        labels = score.argmax(axis=1)
        best = score[np.arange(len(x)), labels]
        cost = (1.0 - best).sum() if metric == "cosine" else -best.sum()
    return labels.astype(np.int64), float(cost)


def _from_labels(
    x: np.ndarray, labels: np.ndarray, metric: str, spec: EmbeddingSpec | None
) -> Clustering:
    labels = np.asarray(labels, np.int64)
    n_clusters = int(labels.max()) + 1 if (labels >= 0).any() else 0
    labels = np.where(labels < 0, NOISE, labels)
    centroids = np.zeros((n_clusters, x.shape[1]), np.float64)
    for j in range(n_clusters):
        centroids[j] = x[labels == j].astype(np.float64).mean(axis=0)
    if metric == "cosine" and n_clusters:
        centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-30)
    centroids32 = centroids.astype(np.float32)
    members = labels >= 0
    inertia = 0.0
    if members.any():
        x64, own = x[members].astype(np.float64), centroids[labels[members]]
        if metric == "l2":
            inertia = float(((x64 - own) ** 2).sum())
        else:
            inertia = float((1.0 - (x64 * own).sum(axis=1)).sum())
    return Clustering(labels, centroids32, inertia, metric, spec)
