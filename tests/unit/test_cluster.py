"""quotient_client.cluster on synthetic vectors whose clusters are known: k-means (FAISS) and the
density methods (scikit-learn) recover them under the metric the spec names, and bad input is
refused with the row and the reason."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from quotient_client._embeddings import Embeddings, EmbeddingSpec, SpecMismatchError
from quotient_client.cluster import Clustering, dbscan, hdbscan, kmeans


def blobs(n: int = 300, k: int = 4, d: int = 8, spread: float = 10.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * spread
    labels = rng.integers(0, k, n)
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def rays(n: int = 400, k: int = 4, d: int = 8, seed: int = 0):
    """k directions, each row one of them (plus a little noise) at a length between 0.1 and 10:
    clusters by angle that Euclidean k-means, which sees lengths, mixes up."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(k, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    unit = directions[labels] + 0.05 * rng.normal(size=(n, d))
    return (unit * rng.uniform(0.1, 10.0, (n, 1))).astype(np.float32), labels


def spec(metric: str, d: int = 8, normalized: bool = False, version: str = "1.0.0"):
    return EmbeddingSpec("m", version, "p", d, metric, normalized)


def test_kmeans_recovers_blobs_and_is_reproducible() -> None:
    x, truth = blobs()
    result = kmeans(x, 4)
    assert isinstance(result, Clustering) and result.metric == "l2" and result.spec is None
    assert result.labels.dtype == np.int64 and result.centroids.shape == (4, 8)
    assert adjusted_rand_score(truth, result.labels) > 0.99
    np.testing.assert_array_equal(kmeans(x, 4).labels, result.labels)  # same seed, same answer
    assert result.sizes().sum() == len(x) and result.n_clusters == 4
    # inertia is the sum of squared distances to the own centroid
    own = result.centroids[result.labels].astype(np.float64)
    assert result.inertia == pytest.approx(((x - own) ** 2).sum(), rel=1e-5)


def test_kmeans_follows_the_spec_metric() -> None:
    x, truth = rays()
    by_length = kmeans(x, 4)
    by_angle = kmeans(Embeddings(x, spec("cosine")), 4)  # the spec's metric, no metric=
    assert by_angle.metric == "cosine" and by_angle.spec == spec("cosine")
    assert adjusted_rand_score(truth, by_angle.labels) > 0.99
    assert adjusted_rand_score(truth, by_length.labels) < 0.8  # lengths mislead Euclidean
    np.testing.assert_allclose(np.linalg.norm(by_angle.centroids, axis=1), 1.0, rtol=1e-5)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = (unit * by_angle.centroids[by_angle.labels]).sum(1)
    assert by_angle.inertia == pytest.approx((1 - cos).sum(), rel=1e-4, abs=1e-4)
    inner = kmeans(Embeddings(x, spec("inner_product")), 4)  # unit centroids, largest <x, c>
    assert inner.metric == "inner_product"
    scores = x @ inner.centroids.T
    np.testing.assert_array_equal(inner.labels, scores.argmax(1))
    assert kmeans(Embeddings(x, spec("cosine")), 4, metric="l2").metric == "l2"  # override


def test_predict_assigns_the_nearest_centroid_and_checks_the_spec() -> None:
    x, _ = blobs()
    result = kmeans(Embeddings(x, spec("l2")), 4)
    np.testing.assert_array_equal(result.predict(Embeddings(x, spec("l2"))), result.labels)
    np.testing.assert_array_equal(result.predict(result.centroids), np.arange(4))
    with pytest.raises(SpecMismatchError, match="not comparable"):
        result.predict(Embeddings(x, spec("l2", version="2.0.0")))
    with pytest.raises(ValueError, match="vectors have 3 values, the centroids 8"):
        result.predict(np.zeros((2, 3), np.float32))


def test_hdbscan_finds_the_clusters_and_calls_the_outliers_noise() -> None:
    x, truth = blobs(n=300, k=3, spread=20.0)
    far = np.random.default_rng(1).uniform(-400, 400, (6, 8)).astype(np.float32)
    result = hdbscan(np.concatenate([x, far]), min_cluster_size=10)
    assert result.n_clusters == 3
    assert (result.labels[-6:] == -1).all()  # the scattered points belong to no cluster
    members = result.labels[:-6] >= 0
    assert members.mean() > 0.9
    assert adjusted_rand_score(truth[members], result.labels[:-6][members]) > 0.99
    for j in range(3):  # centroids are the means of the members
        mean = np.concatenate([x, far])[result.labels == j].mean(0)
        np.testing.assert_allclose(result.centroids[j], mean, rtol=1e-4, atol=1e-4)
    assert result.sizes().sum() == members.sum()


def test_density_methods_use_the_cosine_distance() -> None:
    x, truth = rays(k=3)
    for result in (
        hdbscan(Embeddings(x, spec("cosine")), min_cluster_size=10),
        dbscan(Embeddings(x, spec("cosine")), eps=0.02, min_samples=5),  # eps in 1 - cos
    ):
        assert result.metric == "cosine"
        clustered = result.labels >= 0
        assert clustered.mean() > 0.9 and result.n_clusters == 3
        assert adjusted_rand_score(truth[clustered], result.labels[clustered]) > 0.99
        np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
    # by length (Euclidean, same eps) it is one cluster or noise, not three
    assert dbscan(x, eps=0.02).n_clusters != 3


def test_inner_product_needs_normalised_vectors_for_density_methods() -> None:
    x, _ = rays(k=3)
    with pytest.raises(ValueError, match="inner product of vectors that are not normalised"):
        hdbscan(Embeddings(x, spec("inner_product")))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    result = hdbscan(Embeddings(unit, spec("inner_product", normalized=True)), min_cluster_size=10)
    assert result.metric == "cosine" and result.n_clusters == 3


def test_no_cluster_at_all() -> None:
    x = np.eye(8, dtype=np.float32) * 100  # eight points, all far apart
    result = dbscan(x, eps=1.0, min_samples=2)
    assert result.n_clusters == 0 and (result.labels == -1).all()
    assert result.centroids.shape == (0, 8) and result.inertia == 0.0
    with pytest.raises(ValueError, match="no clusters"):
        result.predict(x)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: kmeans(np.zeros((0, 4)), 1), r"no embeddings \(0 rows\)"),
        (lambda: kmeans(np.zeros(4), 1), r"must be a float array \[n, d\], got shape \(4,\)"),
        (lambda: kmeans(np.zeros((2, 2, 2)), 1), r"got shape \(2, 2, 2\)"),
        (lambda: kmeans([["a", "b"]], 1), "must be a float array"),
        (lambda: kmeans(np.array([[0.0, 1.0], [np.nan, 1.0]]), 1), "row 1 is not finite"),
        (lambda: hdbscan(np.array([[0.0, np.inf], [1.0, 1.0]])), "row 0 is not finite"),
        (lambda: kmeans(np.ones((3, 2)), 4), "k=4 clusters need at least 4 rows, got 3"),
        (lambda: kmeans(np.ones((3, 2)), 0), "k must be a positive integer, got 0"),
        (lambda: kmeans(np.ones((3, 2)), True), "k must be a positive integer, got True"),
        (lambda: kmeans(np.ones((3, 2)), 2, niter=0), "niter must be a positive integer"),
        (lambda: kmeans(np.ones((3, 2)), 1, metric="manhattan"), "metric must be one of"),
        (
            lambda: kmeans(np.array([[1.0, 0.0], [0.0, 0.0]]), 1, metric="cosine"),
            "row 1 is all zeros",
        ),
        (lambda: dbscan(np.ones((3, 2)), eps=0.0), "eps must be a positive distance"),
        (lambda: hdbscan(np.ones((1, 2))), "needs at least 2 rows"),
    ],
)
def test_bad_input_is_refused_with_the_reason(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_missing_extras_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss-cpu were not installed
    with pytest.raises(
        ImportError, match=r"kmeans needs faiss: pip install 'quotient-client\[faiss\]'"
    ):
        kmeans(np.ones((3, 2)), 1)
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"hdbscan needs sklearn: .*quotient-client\[sklearn\]"):
        hdbscan(np.ones((3, 2)))
