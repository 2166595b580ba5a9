"""Clustering and scikit-learn pipelines on the served models (rotmnist-c8, qm9-vae; in-process,
embedded backend) with real data: the 1,000 MNIST test digits, randomly rotated, and QM9
molecules with their HOMO-LUMO gap. The figures are printed (``pytest -s``) and bounded below
with a margin from what was measured; each is compared with a baseline that does not use the
service (raw pixels, chance, the majority class)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.pipeline import Pipeline

import quotient_client as qc
from quotient_client.cluster import hdbscan, kmeans
from quotient_client.sklearn import QuotientEmbedder

pytest.importorskip("rdkit", reason="the molecule model needs RDKit (make install-molecules)")

DATA = Path(__file__).resolve().parents[2] / "data" / "mnist"
pytestmark = pytest.mark.skipif(
    not (DATA / "mnist10k.npz").exists(), reason="data/mnist absent: run `make data-images`"
)
IMAGES = "rotmnist-c8"


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any]) -> Any:
    return start_service()  # the committed model store: rotmnist-c8 and qm9-vae


@pytest.fixture(scope="module")
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from quotient_models.images.data import load_mnist

    return load_mnist(DATA)


@pytest.fixture(scope="module")
def rotated_test(mnist) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 1,000 test digits (float [0, 1]), their labels and copies rotated by the card's fixed
    random evaluation angles."""
    from quotient_models.images.data import eval_angles
    from quotient_models.images.transforms import rotate_numpy

    x, y = mnist["test"]
    return x, y, rotate_numpy(x, eval_angles("test", len(x)))


@pytest.fixture(scope="module")
def rotated_embeddings(service: Any, rotated_test) -> qc.Embeddings:
    with qc.Client(service.target) as client:
        return client.embed(list(rotated_test[2]), model=IMAGES)


def test_kmeans_groups_rotated_digits_by_class(service, rotated_test, rotated_embeddings) -> None:
    """k=10 on the served embeddings of rotated digits beats chance and k-means on the pixels
    (which rotation scatters), and assigns an upright digit to its rotated copy's cluster."""
    x, y, rotated = rotated_test
    result = kmeans(rotated_embeddings, 10)
    assert result.spec == rotated_embeddings.spec and result.labels.shape == (1000,)
    ari = adjusted_rand_score(y, result.labels)
    pixels = adjusted_rand_score(y, kmeans(rotated.reshape(len(x), -1), 10).labels)
    shuffled = adjusted_rand_score(np.random.default_rng(0).permutation(y), result.labels)
    print(f"ARI k-means k=10, rotated test digits: embeddings {ari:.3f}, pixels {pixels:.3f}")
    assert abs(shuffled) < 0.02 < 0.08 < ari  # measured 0.131; chance is 0
    assert ari > pixels + 0.03  # measured 0.060 on the pixels
    with qc.Client(service.target) as client:
        upright = client.embed(list(x[:300]), model=IMAGES)
    agreement = float((result.predict(upright) == result.labels[:300]).mean())
    print(f"upright digit in its rotated copy's cluster: {agreement:.3f}")
    assert agreement > 0.9  # the embeddings are invariant; measured 0.97 (cluster borders)


def test_density_clustering_of_rotated_digits(rotated_test, rotated_embeddings) -> None:
    _, y, _ = rotated_test
    result = hdbscan(rotated_embeddings, metric="cosine", min_cluster_size=5)
    clustered = result.labels >= 0
    assert set(np.unique(result.labels)) <= {-1, *range(result.n_clusters)}
    assert result.n_clusters >= 2 and 0.05 < clustered.mean() < 0.95
    ari = adjusted_rand_score(y[clustered], result.labels[clustered])
    print(
        f"HDBSCAN (cosine, min_cluster_size 5): {result.n_clusters} clusters, "
        f"{clustered.mean():.2f} of the digits clustered, ARI on them {ari:.3f}"
    )
    chance = adjusted_rand_score(
        np.random.default_rng(0).permutation(y[clustered]), result.labels[clustered]
    )
    # measured 0.230 on 31% of the digits: dense cores lean to one class, but the classes are
    # not density-separated in this space (k-means does better; see the card's kNN figures)
    assert abs(chance) < 0.03 < 0.1 < ari
    unit = rotated_embeddings.vectors / np.linalg.norm(
        rotated_embeddings.vectors, axis=1, keepdims=True
    )
    mean = unit[result.labels == 0].mean(0)
    np.testing.assert_allclose(result.centroids[0], mean / np.linalg.norm(mean), atol=1e-5)


def test_pipeline_trains_on_images(service, mnist, rotated_test, tmp_path: Path) -> None:
    """Trained on 500 random upright training digits (arrays), tested on 300 rotated test digits
    given as PNG files: the invariant embedding carries the classifier across rotations."""
    from PIL import Image

    x_train, y_train = mnist["train"]
    _, y, rotated = rotated_test
    paths = []
    for i in range(300):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.round(rotated[i] * 255).astype(np.uint8)).save(paths[-1])
    pipe = Pipeline(
        [
            ("embed", QuotientEmbedder(service.target, model=IMAGES)),
            ("clf", LogisticRegression(max_iter=2000)),
        ]
    )
    pick = np.random.default_rng(0).choice(len(x_train), 500, replace=False)  # sorted by class
    pipe.fit(list(x_train[pick]), y_train[pick])
    accuracy = pipe.score([str(p) for p in paths], y[:300])
    print(f"rotated test digits from PNG files, accuracy {accuracy:.3f}")
    assert accuracy > 0.8  # ten classes: chance is 0.1


def test_pipeline_trains_on_smiles(service) -> None:
    """Is a QM9 molecule's HOMO-LUMO gap above the median? 800 random molecules of qm9pack
    train, 400 others test, from their SMILES alone."""
    import pandas as pd

    from quotient_models.molecules.data import qm9pack_dir

    table = pd.read_csv(qm9pack_dir() / "qm9_part2.csv", usecols=["SMILES", "HOMO_LUMO_gap_au"])
    table = table.sample(1200, random_state=0).reset_index(drop=True)
    smiles, gap = table["SMILES"].tolist(), table["HOMO_LUMO_gap_au"].to_numpy()
    y = (gap > np.median(gap[:800])).astype(int)
    pipe = Pipeline(
        [
            ("embed", QuotientEmbedder(service.target, modality="molecule")),
            ("clf", LogisticRegression(max_iter=2000)),
        ]
    )
    pipe.fit(smiles[:800], y[:800])
    accuracy = pipe.score(smiles[800:], y[800:])
    majority = max(y[800:].mean(), 1 - y[800:].mean())
    print(f"QM9 gap above the median from SMILES: accuracy {accuracy:.3f}, majority {majority:.3f}")
    assert pipe.named_steps["embed"].spec_.model == "qm9-vae"
    assert accuracy > majority + 0.2  # measured 0.858 against 0.523
