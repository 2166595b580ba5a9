"""The committed rotmnist-c8 model reproduces its model card through the serving path.

Loads model_store/models/rotmnist-c8 with ``quotient_models.runtime.load_model`` (ONNX and
TorchScript, no escnn), re-measures on 200 of the test digits (every fifth) the figures that
``quotient_models.images.evaluate`` wrote into metrics.json, and checks them within sampling
tolerance. Needs the data (``make data-images``); skipped with that reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quotient_models.images.data import eval_angles, load_mnist
from quotient_models.images.model import ImageModel
from quotient_models.images.transforms import radial_profile, rotate_numpy
from quotient_models.invariance import invariance_report
from quotient_models.runtime import load_model

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "model_store" / "models" / "rotmnist-c8"
DATA = ROOT / "data" / "mnist"

pytestmark = [
    pytest.mark.skipif(
        not (MODEL / "metrics.json").exists(),
        reason=f"{MODEL}/metrics.json absent (not trained yet)",
    ),
    pytest.mark.skipif(
        not (DATA / "mnist10k.npz").exists(), reason="data/mnist absent: run `make data-images`"
    ),
]


@pytest.fixture(scope="module")
def model() -> ImageModel:
    m = load_model(MODEL, engine="onnx")
    assert isinstance(m, ImageModel)
    return m


@pytest.fixture(scope="module")
def metrics() -> dict[str, float]:
    return {m["name"]: m["value"] for m in json.loads((MODEL / "metrics.json").read_text())}


@pytest.fixture(scope="module")
def test_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1000 test digits, the indices of the 200 used as queries, and their rotated copies."""
    x = load_mnist(DATA)["test"][0]
    idx = np.arange(0, len(x), 5)
    rotated = rotate_numpy(x[idx], eval_angles("test", len(x))[idx])
    return x, idx, rotated


def _embed(model: ImageModel, name: str, x: np.ndarray) -> np.ndarray:
    """Embeddings of grayscale images through the served policy (model.json's frame)."""
    return model.embed(np.ascontiguousarray(model.frame(x)[:, None]), name).values


def _recall(queries: np.ndarray, gallery: np.ndarray, truth: np.ndarray) -> float:
    d = ((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1)
    return float((d.argmin(axis=1) == truth).mean())


def test_spec_and_files_are_consistent(model: ImageModel, metrics: dict[str, float]) -> None:
    spec = model.spec.raw
    assert spec["latent"]["fields"] == model.head.fields and spec["latent"]["group_order"] == 8
    assert spec["latent"]["rotation_shift"] == model.head.rotation_shift
    assert len(model.head.templates) == spec["projection_head"]["maxfilter_templates"]
    rows = json.loads((MODEL / "metrics.json").read_text())
    assert all(r["command"].startswith("python -m quotient_models.images.evaluate") for r in rows)
    assert model.spec.default_projection in model.spec.model_card()


def test_default_follows_the_retention_rule(model: ImageModel, metrics: dict[str, float]) -> None:
    invariant = [p.name for p in model.projections() if p.invariant]
    score = {
        n: (metrics[f"retention.knn.{n}"] + metrics[f"retention.linear.{n}"]) / 2 for n in invariant
    }
    assert model.spec.default_projection == max(score, key=lambda n: score[n])


def test_rot90_invariance_of_default_and_not_of_raw(
    model: ImageModel, metrics: dict[str, float], test_digits
) -> None:
    x, idx, _ = test_digits
    default = model.spec.default_projection
    transforms = {
        f"rot{90 * k}": (lambda a, k=k: np.rot90(a, k, axes=(-2, -1)).copy()) for k in (1, 2, 3)
    }
    rep = invariance_report(lambda a: _embed(model, default, a), x[idx], transforms)
    assert (
        rep.median <= 1e-5 and metrics[f"invariance.rot90.{default}.median_relative_change"] <= 1e-5
    )
    raw = invariance_report(lambda a: _embed(model, "raw", a), x[idx], transforms)
    recorded = metrics["invariance.rot90.raw.median_relative_change"]
    assert raw.per_transform["rot90"]["median"] == pytest.approx(recorded, rel=0.3)
    assert raw.median > 0.1


def test_continuous_angle_change_matches_card(
    model: ImageModel, metrics: dict[str, float], test_digits
) -> None:
    x, idx, rotated = test_digits
    default = model.spec.default_projection
    base = _embed(model, default, x[idx])
    rel = np.linalg.norm(_embed(model, default, rotated) - base, axis=1) / np.linalg.norm(
        base, axis=1
    )
    recorded = metrics[f"invariance.continuous.{default}.median_relative_change"]
    assert float(np.median(rel)) == pytest.approx(recorded, rel=0.3)


@pytest.mark.parametrize("name", ["default", "radial_profile", "mean"])
def test_retrieval_recall_matches_card(
    model: ImageModel, metrics: dict[str, float], test_digits, name: str
) -> None:
    x, idx, rotated = test_digits
    proj = model.spec.default_projection if name == "default" else name
    if proj == "radial_profile":
        queries, gallery = radial_profile(model.frame(rotated)), radial_profile(model.frame(x))
    else:
        queries, gallery = _embed(model, proj, rotated), _embed(model, proj, x)
    recall = _recall(queries, gallery, idx)  # 200 queries against the full 1000-digit gallery
    assert recall == pytest.approx(metrics[f"retrieval.recall_at_1.{proj}"], abs=0.05)


@pytest.mark.parametrize("canvas", ["canvas64_rotated", "canvas256"])
def test_off_centre_copies_retrieval_matches_card(
    model: ImageModel, metrics: dict[str, float], test_digits, canvas: str
) -> None:
    from quotient_models.images.evaluate import COPY_SETS, make_copies

    x, idx, _ = test_digits
    _, side, rotated, kind = next(c for c in COPY_SETS if c[0] == canvas)
    copies = make_copies(x, side, rotated, kind)[idx]  # the card's copies of the 200 digits
    default = model.spec.default_projection
    recall = _recall(_embed(model, default, copies), _embed(model, default, x), idx)
    assert recall == pytest.approx(metrics[f"framing.served.{canvas}.rank1"], abs=0.05)
    assert metrics[f"framing.before.{canvas}.rank1"] < 0.05  # what the frame fixes


def test_default_beats_the_baselines_on_the_card(
    model: ImageModel, metrics: dict[str, float]
) -> None:
    d = model.spec.default_projection
    assert metrics[f"retrieval.recall_at_1.{d}"] > metrics["retrieval.recall_at_1.radial_profile"]
    assert metrics[f"retention.knn.{d}"] > metrics["retention.knn.raw"]
    assert metrics[f"retention.linear.{d}"] > metrics["retention.linear.raw"]


def test_torchscript_and_onnx_agree(model: ImageModel, test_digits) -> None:
    x, idx, _ = test_digits
    batch = np.ascontiguousarray(x[idx[:16], None], dtype=np.float32)
    scripted = load_model(MODEL, engine="torch")
    assert isinstance(scripted, ImageModel)
    a, b = model.latent(batch), scripted.latent(batch)
    assert float(np.abs(a - b).max()) <= 1e-4 * float(np.abs(b).max())
    r = model.latent(np.rot90(batch, 1, axes=(-2, -1)).copy())  # the recorded roll direction holds
    np.testing.assert_allclose(
        r, np.roll(a, 2 * model.head.rotation_shift, axis=-1), atol=1e-4 * float(np.abs(a).max())
    )
