"""Exact nearest neighbours (``quotient_models.neighbours``) against brute force, per metric."""

from __future__ import annotations

import numpy as np
import pytest

from quotient_models.neighbours import label_agreement, mean_abs_difference, nearest


def brute(q: np.ndarray, g: np.ndarray, k: int, metric: str, self_gallery: bool) -> np.ndarray:
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
    d = np.linalg.norm(q[:, None] - g[None], axis=-1) if metric == "l2" else -(q @ g.T)
    if self_gallery:
        np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("metric", ["l2", "cosine", "inner_product"])
def test_matches_brute_force_in_any_chunking(metric: str) -> None:
    rng = np.random.default_rng(0)
    x, g = rng.normal(size=(300, 6)), rng.normal(size=(120, 6))
    for chunk in (7, 4096):
        np.testing.assert_array_equal(
            nearest(x, 5, metric, chunk=chunk), brute(x, x, 5, metric, True)
        )
        np.testing.assert_array_equal(
            nearest(x, 5, metric, gallery=g, chunk=chunk), brute(x, g, 5, metric, False)
        )


def test_the_metrics_disagree_where_norms_differ() -> None:
    """A long vector along a query's direction is nearest by cosine, not by L2."""
    x = np.array([[1.0, 0.0], [10.0, 0.5], [0.9, 0.6]])
    assert nearest(x, 1, "cosine")[0, 0] == 1 and nearest(x, 1, "l2")[0, 0] == 2


def test_refusals() -> None:
    x = np.ones((3, 2))
    with pytest.raises(ValueError, match="metric must be one of"):
        nearest(x, 1, "manhattan")
    with pytest.raises(ValueError, match="k = 3 neighbours asked of a gallery of 3"):
        nearest(x, 3)  # the query itself is never its own neighbour
    with pytest.raises(ValueError, match="row 1 has norm 0"):
        nearest(np.array([[1.0, 0.0], [0.0, 0.0]]), 1, "cosine")
    with pytest.raises(ValueError, match="queries have 2 values, the gallery 3"):
        nearest(x, 1, gallery=np.ones((4, 3)))


def test_scores() -> None:
    nn = np.array([[1, 2], [0, 2], [0, 1]])
    assert label_agreement(nn, np.array([0, 0, 1]), np.array([0, 0, 1])) == pytest.approx(1 / 3)
    assert mean_abs_difference(nn, np.array([0.0, 1.0, 3.0])) == pytest.approx(12 / 6)
