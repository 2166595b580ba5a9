"""The drug-like pipeline end to end on a small plan: MOSES from molsets → moses.npz → training
→ an exported model directory with a dynamic atom axis → served ONNX and TorchScript that agree,
batches padded to their largest molecule, and the domain wider than the training data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")


@pytest.fixture(scope="module")
def pilot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from quotient_models.molecules import moses, train

    root = tmp_path_factory.mktemp("druglike")
    manifest = moses.prepare(root / "data", n_train=400, n_val=64, seed=3, test_limit=64)
    assert manifest["counts"]["train"] + sum(manifest["counts"]["dropped"]["train"].values()) == 400
    assert manifest["domain"] == moses.DOMAIN.to_json()
    train.main(
        [
            "--data", str(root / "data"), "--out", str(root / "pilot"), "--latent-dim", "4",
            "--hidden", "32", "--enc-layers", "2", "--dec-layers", "2", "--epochs", "1",
        ]
    )  # fmt: skip
    return root / "pilot"


def test_the_split_is_checked_and_reproducible(pilot: Path, tmp_path: Path) -> None:
    from quotient_models.molecules import moses
    from quotient_models.molecules.data import load

    data = load(pilot.parent / "data")
    again = moses.prepare(tmp_path, n_train=400, n_val=64, seed=3, test_limit=64)
    assert again["split_sha256"] == data.manifest["split_sha256"]
    assert set(np.unique(data.arrays["split"])) == {0, 1, 2}


def test_the_export_takes_any_number_of_atoms(pilot: Path) -> None:
    from quotient_models.runtime import load_model

    spec = json.loads((pilot / "model.json").read_text())
    assert spec["encoder"]["dynamic_atoms"] is True
    assert spec["domain"]["max_atoms"] == 64 and spec["group"]["order"] == 0
    assert spec["input"]["standardize"] == ["largest_fragment", "neutralize"]
    head = json.loads((pilot / "projection.json").read_text())  # colours of as many rounds as
    assert head["key"] == ["element", "degree", "hydrogens", "colour"]  # the encoder has layers
    assert head["colour_rounds"] == spec["latent"]["config"]["enc_layers"] == 2
    onnx, torch = load_model(pilot), load_model(pilot, engine="torch")
    big = "C" * 40 + "(=O)N" + "C" * 21 + "O"  # 64 heavy atoms, MOSES has at most 27
    small = ["CCO", "c1ccc(P(=O)(O)O)cc1I", big]
    items = [onnx.item(onnx.graph(s)) for s in small]
    batch = onnx.collate(items)
    assert len(items[2]) == 64 and batch["atoms"].shape[1] == 64  # the largest in the batch
    assert onnx.collate(items[:2])["atoms"].shape[1] == max(len(i) for i in items[:2])
    together = onnx.embed_batch(batch).values
    alone = np.concatenate([onnx.embed_batch(onnx.collate([i])).values for i in items])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(torch.embed_batch(batch).values, together, rtol=1e-4, atol=1e-5)
    assert together.shape == (3, 64 * 4)
    decoded = onnx.decode(together)  # barely trained: refused with reasons, never wrong
    assert all(
        d.smiles is None or d.smiles == onnx.graph(s).smiles
        for d, s in zip(decoded, small, strict=True)
    )
