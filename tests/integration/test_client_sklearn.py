"""QuotientEmbedder against the real service (in-process, the tiny C4 model): scikit-learn's
estimator rules, a Pipeline that pickles without its channel or its API key, the refusal of a
model version other than the one it was fitted on, and exports of served embeddings."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.utils import estimator_checks

import quotient_client as qc
from quotient_client._embeddings import SpecMismatchError
from quotient_client.export import load_embeddings, save_embeddings
from quotient_client.sklearn import QuotientEmbedder

KEY = "sklearn-test-key-5b1f"


@pytest.fixture(scope="module")
def service(start_service: Callable[..., Any], tiny_model_store: Path, tmp_path_factory) -> Any:
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(KEY + "\n")
    return start_service(model_store=str(tiny_model_store), api_key_file=str(keys))


def images(digits: Callable[[int], np.ndarray], n: int, start: int = 0) -> list[np.ndarray]:
    return [digits(seed) for seed in range(start, start + n)]


@pytest.mark.parametrize(
    "check",
    [
        "check_no_attributes_set_in_init",
        "check_parameters_default_constructible",
        "check_get_params_invariance",
        "check_set_params",
        "check_estimator_cloneable",
        "check_estimator_repr",
        "check_do_not_raise_errors_in_init_or_set_params",
    ],
)
def test_sklearn_estimator_checks(check: str) -> None:
    """The checks that apply to a transformer of images or SMILES (the others feed it random
    numeric matrices, which are not items)."""
    getattr(estimator_checks, check)("QuotientEmbedder", QuotientEmbedder())


def test_fit_records_the_served_model_and_transform_embeds(service: Any, digits) -> None:
    embedder = QuotientEmbedder(service.target, projection="mean", api_key=KEY)
    assert clone(embedder).get_params() == embedder.get_params()
    assert "sklearn-test-key" not in repr(embedder) and "api_key='***'" in repr(embedder)
    with pytest.raises(NotFittedError):
        embedder.transform(images(digits, 2))
    assert embedder.fit() is embedder  # X is not needed (nor embedded) to fit
    with qc.Client(service.target, api_key=KEY) as client:
        info = client.get_model("tiny-c4")
        expected = client.embed(images(digits, 5), modality="image", projection="mean")
    assert embedder.model_version_ == info.version
    assert embedder.spec_.model == "tiny-c4" and embedder.spec_.projection == "mean"
    out = embedder.transform(images(digits, 5))
    assert out.dtype == np.float32 and out.shape == (5, info.projection("mean").dimension)
    np.testing.assert_allclose(out, expected.vectors, rtol=1e-6, atol=1e-6)
    stack = np.stack(images(digits, 5))  # a 3-D array is a stack of images
    np.testing.assert_allclose(embedder.transform(stack), out, rtol=1e-6, atol=1e-6)
    names = embedder.get_feature_names_out()
    assert list(names[:2]) == ["mean0", "mean1"] and len(names) == out.shape[1]
    frame = embedder.set_output(transform="pandas").transform(images(digits, 3))
    assert list(frame.columns) == list(names) and frame.shape == (3, out.shape[1])
    embedder.close()


def test_a_pipeline_trains_pickles_and_reconnects(service: Any, digits, monkeypatch) -> None:
    x = images(digits, 24)
    y = np.array([int(a.sum() > np.median([b.sum() for b in x])) for a in x])  # bright or not
    pipe = Pipeline(
        [
            ("embed", QuotientEmbedder(service.target, api_key=KEY)),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    )
    pipe.fit(x, y)
    before = pipe.predict_proba(x)
    blob = pickle.dumps(pipe)  # while connected: the channel is not pickled
    assert KEY.encode() not in blob  # nor the API key
    restored = pickle.loads(blob)
    embedder = restored.named_steps["embed"]
    assert "_client" not in vars(embedder) and embedder.api_key is None
    with pytest.raises(qc.UnauthenticatedError):
        restored.predict(x)  # the key is not in the pickle: it must come from somewhere
    monkeypatch.setenv(qc.API_KEY_ENV, KEY)
    np.testing.assert_allclose(restored.predict_proba(x), before, rtol=1e-6, atol=1e-6)
    assert embedder.model_version_ == pipe.named_steps["embed"].model_version_
    copy = clone(pipe)  # unfitted, same parameters
    assert copy.named_steps["embed"].get_params()["target"] == service.target
    assert not hasattr(copy.named_steps["embed"], "spec_")


def test_set_params_reconnects(start_service, tiny_model_store: Path, digits) -> None:
    first = start_service(model_store=str(tiny_model_store))
    second = start_service(model_store=str(tiny_model_store))
    embedder = QuotientEmbedder(first.target).fit()
    a = embedder.transform(images(digits, 2))
    first.stop()
    embedder.set_params(target=second.target)  # a fitted embedder pointed at another server
    np.testing.assert_allclose(embedder.transform(images(digits, 2)), a, rtol=1e-6, atol=1e-6)


def versioned_stores(tiny_model_store: Path, root: Path) -> list[str]:
    stores = []
    for version in ("1.2.0", "1.3.0"):
        target = root / version / "tiny-c4"
        shutil.copytree(tiny_model_store / "tiny-c4", target)
        spec = json.loads((target / "model.json").read_text())
        spec["version"] = version
        (target / "model.json").write_text(json.dumps(spec))
        stores.append(str(root / version))
    return stores


def test_transform_refuses_another_model_version(
    start_service, tiny_model_store: Path, tmp_path: Path, digits, pick_port
) -> None:
    """Trained on 1.2.0; the server at the same address is upgraded to 1.3.0: the pipeline
    refuses to run, instead of classifying embeddings it was not trained on."""
    old, new = versioned_stores(tiny_model_store, tmp_path)
    port = pick_port()
    served = start_service(model_store=old, port=port)
    x, y = images(digits, 12), np.arange(12) % 2
    pipe = Pipeline([("embed", QuotientEmbedder(served.target)), ("clf", LogisticRegression())])
    pipe.fit(x, y)
    assert pipe.named_steps["embed"].model_version_ == "1.2.0"
    served.stop()
    start_service(model_store=new, port=port)
    with pytest.raises(
        SpecMismatchError, match=r"fitted on tiny-c4 1\.2\.0.*now serves tiny-c4 1\.3\.0"
    ):
        pipe.predict(x)
    pipe.fit(x, y)  # refitting moves to the new version
    assert pipe.named_steps["embed"].model_version_ == "1.3.0"
    assert pipe.predict(x).shape == (12,)
    with pytest.raises(SpecMismatchError, match=r"served at version 1\.3\.0, not '1\.2\.0'"):
        QuotientEmbedder(served.target, model_version="1.2.0").fit()


def test_bad_parameters_and_items(service: Any, digits) -> None:
    with pytest.raises(ValueError, match="modality must be one of image, molecule, got 'text'"):
        QuotientEmbedder(service.target, modality="text", api_key=KEY).fit()
    with pytest.raises(ValueError, match=r"has no projection 'nope' \(it has .*maxfilter"):
        QuotientEmbedder(service.target, projection="nope", api_key=KEY).fit()
    with pytest.raises(qc.ModelNotFoundError, match="serves no molecule model"):
        QuotientEmbedder(service.target, modality="molecule", api_key=KEY).fit()
    embedder = QuotientEmbedder(service.target, api_key=KEY).fit()
    with pytest.raises(ValueError, match=r"input 1: an array of shape \(5,\) is not an image"):
        embedder.transform([digits(0), np.zeros(5, np.uint8), digits(1)])
    with pytest.raises(TypeError, match="sequence of items, got str"):
        embedder.transform("digit.png")
    with pytest.raises(ValueError, match="one column of items, got 2 columns"):
        embedder.transform(np.array([["a.png", "b.png"]], dtype=object))


@pytest.mark.parametrize("suffix", [".npy", ".parquet"])
def test_export_of_served_embeddings(service: Any, digits, tmp_path: Path, suffix: str) -> None:
    with qc.Client(service.target, api_key=KEY) as client:
        emb = client.embed(images(digits, 6), modality="image", projection="align")
    ids = [f"digit-{i}.png" for i in range(6)]
    save_embeddings(tmp_path / f"digits{suffix}", ids, emb, [{"seed": i} for i in range(6)])
    got_ids, got, meta = load_embeddings(tmp_path / f"digits{suffix}")
    assert got_ids == ids and got.spec == emb.spec and meta == [{"seed": i} for i in range(6)]
    np.testing.assert_array_equal(got.vectors, emb.vectors)
    np.testing.assert_array_equal(got.poses, emb.poses)
    assert np.isfinite(got.poses).all()  # align computes a pose for each digit
