"""Exact nearest neighbours under a projection's metric, and the figures the model cards use to
choose that metric (how alike an item's neighbours are to it).

``nearest(x, k, metric)`` is brute force in float64 chunks (exact, no index), for evaluation on a
few tens of thousands of embeddings; serving-side search lives in the SDK's vector stores.
"""

from __future__ import annotations

import numpy as np

from quotient_models.projections import METRICS

__all__ = ["label_agreement", "mean_abs_difference", "nearest"]


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected embeddings [n, D], got {list(x.shape)}")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        if (norms == 0).any():
            raise ValueError(f"row {int(np.flatnonzero(norms == 0)[0])} has norm 0: no cosine")
        x = x / norms
    return x


def nearest(
    queries: np.ndarray,
    k: int,
    metric: str = "l2",
    gallery: np.ndarray | None = None,
    chunk: int = 2048,
) -> np.ndarray:
    """Indices [n, k] of the ``k`` nearest gallery rows of each query, nearest first.

    Without ``gallery`` the queries are their own gallery and each query's own row is left out.
    ``metric``: "l2" (Euclidean), "cosine" (1 - cosine similarity) or "inner_product" (larger is
    nearer). Exact ties at the k-th place are broken arbitrarily (but deterministically)."""
    q = _prepared(queries, metric)
    g = q if gallery is None else _prepared(gallery, metric)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have {q.shape[1]} values, the gallery {g.shape[1]}")
    if not 0 < k <= len(g) - (gallery is None):
        raise ValueError(f"k = {k} neighbours asked of a gallery of {len(g)}")
    g_sq = (g * g).sum(1)
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        block = q[s : s + chunk]
        score = -(block @ g.T)  # inner product and cosine: larger similarity is nearer
        if metric == "l2":
            score = (block * block).sum(1)[:, None] + g_sq[None] + 2 * score
        if gallery is None:
            score[np.arange(len(block)), np.arange(s, s + len(block))] = np.inf
        part = np.argpartition(score, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(score, part, 1), axis=1, kind="stable")
        out[s : s + chunk] = np.take_along_axis(part, order, 1)
    return out


def label_agreement(neighbours: np.ndarray, labels: np.ndarray, query_labels: np.ndarray) -> float:
    """Fraction of (query, neighbour) pairs whose labels agree: neighbours [n, k] index
    ``labels``; ``query_labels`` [n]."""
    return float((np.asarray(labels)[neighbours] == np.asarray(query_labels)[:, None]).mean())


def mean_abs_difference(neighbours: np.ndarray, values: np.ndarray) -> float:
    """Mean |values[query] - values[neighbour]| over every query and its neighbours (the queries
    are the gallery: neighbours [n, k] index ``values`` [n])."""
    v = np.asarray(values, dtype=np.float64)
    return float(np.abs(v[neighbours] - v[:, None]).mean())
