"""Downstream baselines (``quotient_models.molecules.downstream``): the scaffold split, the feature
builders, and small end-to-end runs with the served qm9-vae model (most molecules refused)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from quotient_models.errors import InputError
from quotient_models.molecules import downstream as ds
from quotient_models.molecules.model import MoleculeModel, load_molecule_model

QM9_VAE = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"


@cache
def qm9_vae() -> MoleculeModel:
    return load_molecule_model(QM9_VAE, threads=1)


def scaffold(smiles: str) -> str:
    from rdkit import Chem
    from rdkit.Chem.Scaffolds import MurckoScaffold

    return MurckoScaffold.MurckoScaffoldSmiles(mol=Chem.MolFromSmiles(smiles))


def test_scaffold_split_is_deterministic_and_keeps_scaffolds_together() -> None:
    task = ds.freesolv()
    split = ds.scaffold_split(task.smiles)
    np.testing.assert_array_equal(split, ds.scaffold_split(task.smiles))
    np.testing.assert_array_equal(split, task.split)
    where: dict[str, set[int]] = {}
    for s, k in zip(task.smiles, split, strict=True):
        where.setdefault(scaffold(s), set()).add(int(k))
    assert all(len(v) == 1 for v in where.values()), "a scaffold in two splits"
    n = len(split)
    sizes = np.bincount(split, minlength=3)
    assert sizes[0] <= 0.8 * n and sizes[0] + sizes[1] <= 0.9 * n and sizes.min() > 0
    assert sizes[0] > 0.7 * n  # FreeSolv has enough small scaffold groups to fill train
    largest = max(where, key=lambda s: sum(scaffold(x) == s for x in task.smiles))
    assert where[largest] == {0} and largest == ""  # acyclic molecules: the largest group


def test_scaffold_split_rule_on_a_small_case() -> None:
    # 8 acyclic, 1 benzene, 1 cyclohexane: the acyclic group fills train exactly (8 <= 0.8 * 10);
    # of the two groups of one, the one with the larger first index comes first (DeepChem's
    # reverse sort) and goes to validation
    smiles = ["C" * (k + 1) for k in range(8)] + ["c1ccccc1O", "OC1CCCCC1"]
    np.testing.assert_array_equal(ds.scaffold_split(smiles), [0] * 8 + [2, 1])


def test_feature_builders() -> None:
    counts = ds.ecfp4_counts(["CCCCCC", "c1ccccc1"])
    assert counts.shape == (2, 2048) and counts.dtype == np.float32
    assert counts[0].max() > 1  # counts, not bits: hexane repeats its CH2 environments
    names, d = ds.rdkit_descriptors(["CCO", "[Se]"])
    assert d.shape == (2, len(names)) and d.dtype == np.float64
    assert np.isfinite(d[0]).all()
    assert np.isnan(d[1, names.index("BCUT2D_MWHI")])  # fails for a single atom: missing
    less, d2 = ds.rdkit_descriptors(["CCO"], exclude=ds.MOSES_TARGETS)
    assert len(less) == len(names) - 4 and not set(ds.MOSES_TARGETS) & set(less)
    np.testing.assert_array_equal(d2[0], d[0, [names.index(n) for n in less]])


def test_constant_columns_with_nan_are_told_apart() -> None:
    x = np.array([[1.0, np.nan, np.nan, 2.0], [1.0, np.nan, 3.0, 2.0]])
    np.testing.assert_array_equal(ds._varying(x), [False, False, True, False])
    np.testing.assert_array_equal(ds._varying(np.ones((3, 2))), [True, False])  # keeps one


def accepted_freesolv(n: int) -> list[int]:
    task, keep = ds.freesolv(), []
    for k, s in enumerate(task.smiles):
        try:
            qm9_vae().graph(s)
        except InputError:
            continue
        keep.append(k)
    return keep[:n]


def test_end_to_end_on_50_molecules_is_deterministic() -> None:
    full = ds.freesolv()
    keep = accepted_freesolv(50)
    smiles = [full.smiles[i] for i in keep] + ["CCBr", "c1ccccc1" * 3]  # two refused
    y = np.concatenate([full.targets["expt"][keep], [0.0, 0.0]])
    task = ds.Task(
        "freesolv",
        smiles,
        {"expt": y},
        ds.scaffold_split(smiles),
        {"expt": "kcal/mol"},
        {"note": "test subset"},
        ds.SCAFFOLD_RULE,
    )
    first = ds.evaluate_task(qm9_vae(), task, seed=0)
    assert json.dumps(first) == json.dumps(ds.evaluate_task(qm9_vae(), task, seed=0))
    assert first["refused"] == 2 and "skipped" not in first
    assert sum(m["accepted"] for m in first["molecules"].values()) == 50
    assert set(first["results"]["expt"]) == {"predict_mean", *ds.FEATURE_SETS}
    dims = first["features"]["dims"]
    assert dims["sorted"] == 9 * 8 and dims["mean"] == 8 and dims["ecfp4"] == 2048
    assert dims["sorted+descriptors"] == dims["sorted"] + dims["descriptors"]
    for scores in first["results"]["expt"].values():
        assert scores["rmse"] >= scores["mae"] > 0
    lines = ds.card_lines(
        {"model": {"name": "qm9-vae", "version": "x"}, "seed": 0, "tasks": {"freesolv": first}}
    )
    text = "\n".join(lines)
    assert text.count("**") >= 2 and "| sorted (default projection) |" in text
    assert "ECFP4" in text and "descriptors" in text.split("| sorted + RDKit descriptors |")[-1]


def test_neighbours_on_small_molecules() -> None:
    full = ds.freesolv()
    smiles = [full.smiles[i] for i in accepted_freesolv(30)]
    r = ds.neighbours(qm9_vae(), [*smiles, "CCCl"], seed=0, k=5)
    assert r["accepted"] == 30 and r["refused"] == 1
    assert set(r["rows"]) == {"sorted (l2)", "mean (l2)", "random", "ECFP4 Tanimoto"}
    assert r["rows"]["ECFP4 Tanimoto"]["ecfp4_overlap"] is None
    assert 0 <= r["rows"]["sorted (l2)"]["ecfp4_overlap"] <= 1
    tiny = ds.neighbours(qm9_vae(), smiles[:5], seed=0, k=5)
    assert "skipped" in tiny


def test_cli_all_with_a_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "downstream.json"
    args = ["all", "--model", str(QM9_VAE), "--out", str(out), "--limit", "60", "--threads", "1"]
    ds.main(args)
    doc = json.loads(out.read_text())
    assert list(doc["tasks"]) == list(ds.TASKS)
    assert doc["tasks"]["moses"]["refused"] == 60  # MOSES molecules are larger than QM9's
    assert "skipped" in doc["tasks"]["moses"] and "skipped" in doc["tasks"]["neighbours"]
    assert "### Downstream baselines (qm9-vae" in capsys.readouterr().out
    ds.main(["card", str(out)])
    assert "Not fitted: too few molecules" in capsys.readouterr().out
