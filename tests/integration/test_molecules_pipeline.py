"""QM9 end to end on a small slice: prepare (qm9pack) → train one epoch → export → evaluate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("qm9pack") is None
    or importlib.util.find_spec("torch_geometric") is None,
    reason="needs requirements/molecules.txt (qm9pack, torch-geometric, rdkit)",
)


def test_prepare_train_evaluate(tmp_path: Path) -> None:
    from quotient_models.molecules import data, evaluate, train

    manifest = data.prepare(tmp_path / "qm9", seed=0, limit=400)
    assert (
        manifest["counts"]["kept"] == 400 and sum(manifest["counts"][s] for s in data.SPLITS) == 400
    )
    again = data.prepare(tmp_path / "qm9b", seed=0, limit=400)
    assert again["split_sha256"] == manifest["split_sha256"]  # deterministic split
    assert data.load(tmp_path / "qm9").manifest["domain"]["elements"] == ["C", "N", "O", "F"]

    out = tmp_path / "model"
    train.main(
        [
            "--data",
            str(tmp_path / "qm9"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--hidden",
            "32",
            "--enc-layers",
            "2",
            "--dec-layers",
            "1",
            "--latent-dim",
            "4",
            "--threads",
            "1",
        ]
    )
    spec = json.loads((out / "model.json").read_text())
    assert (
        spec["modality"] == "molecule"
        and spec["domain"]["max_atoms"] == manifest["domain"]["max_atoms"]
    )

    evaluate.main(
        ["invariance", "--data", str(tmp_path / "qm9"), "--model", str(out), "--numberings", "5"]
    )
    # the figures do not depend on how many processes measure them (chunks are seeded alone)
    one, two = (
        evaluate.invariance(
            evaluate.load_molecule_model(out, threads=1),
            data.load(tmp_path / "qm9"),
            None,
            3,
            0,
            1e-5,
            jobs=jobs,
        )
        for jobs in (1, 2)
    )
    assert one == two and one["molecules"] > 0
    evaluate.main(["reconstruction", "--data", str(tmp_path / "qm9"), "--model", str(out)])
    one, two = (  # decoding in processes changes nothing
        evaluate.reconstruction(
            evaluate.load_molecule_model(out, threads=1), data.load(tmp_path / "qm9"), 30, 0, jobs
        )
        for jobs in (1, 2)
    )
    assert one == two and one["molecules"] == 30
    evaluate.main(
        ["regression", "--data", str(tmp_path / "qm9"), "--model", str(out), "--krr-rows", "200"]
    )
    qm9_args = ["--data", str(tmp_path / "qm9"), "--model", str(out), "--krr-rows", "200"]
    evaluate.main(["spread", *qm9_args, "--seeds", "0,1"])
    evaluate.main(["neighbours", "--data", str(tmp_path / "qm9"), "--model", str(out)])
    metrics = {m["name"]: m for m in json.loads((out / "metrics.json").read_text())}
    near = {(r["feature"], r["padding"], r["metric"]): r for r in metrics["neighbours"]["rows"]}
    assert (
        near[("sorted", "marker", "l2")]["served"] and not near[("sorted", "fill", "l2")]["served"]
    )
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Distance and neighbours" in card and "Before (cosine / L2)" in card
    assert metrics["invariance"]["max_relative_change_sorted"] <= 1e-5
    spread = metrics["spread"]
    assert spread["seeds"] == [0, 1] and set(spread["mae"]) == {"0", "1"}
    for seed in ("0", "1"):
        assert set(spread["mae"][seed]["krr"]["alpha"]) >= {"sorted", "raw", "raw_canonical_ranks"}
    figures = {m["name"]: m for m in metrics.values() if "value" in m}
    for name, value in (
        (
            "invariance.max_relative_change.sorted",
            metrics["invariance"]["max_relative_change_sorted"],
        ),
        ("reconstruction.exact_rate.sorted", metrics["reconstruction"]["exact_rate_sorted"]),
        ("regression.krr.alpha.raw", metrics["regression"]["mae"]["krr"]["alpha"]["raw"]),
        (
            "neighbours.sorted.fill.l2.same_atom_count",
            near[("sorted", "fill", "l2")]["same_atom_count"],
        ),
    ):
        assert figures[name]["value"] == value and figures[name]["command"].startswith("python -m")
    assert len(figures) > 40  # every projection, regressor, target and feature set
    # seed 0 of the spread is the regression itself, feature set by feature set
    assert (
        spread["mae"]["0"]["hgb"]["gap"]["sorted"]
        == metrics["regression"]["mae"]["hgb"]["gap"]["sorted"]
    )
    assert metrics["reconstruction"]["agreement_sorted_raw"] == 1.0
    misses = metrics["reconstruction"]["misses_sorted"]  # one epoch on a slice: many misses
    assert 0 < len(misses) <= evaluate.MISS_EXAMPLES
    assert all(m["decoded"] != m["input"] and (m["decoded"] or m["reason"]) for m in misses)
    # decoded as Decode serves (verified): misses are refused, never another molecule, per split
    rec = metrics["reconstruction"]
    assert rec["verified"] and rec["wrong_rate_sorted"] == 0.0
    assert list(rec["splits"]) == list(data.SPLITS)
    assert all(
        s["wrong"] == 0 and len(s["misses"]) <= evaluate.MISS_EXAMPLES
        for s in rec["splits"].values()
    )
    assert all(m["returned"] is None and m["reason"] for m in misses)
    assert "Misses by split" in card
    evaluate.main(["simplest", "--data", str(tmp_path / "qm9"), "--model", str(out)])
    simple = {m["name"]: m for m in json.loads((out / "metrics.json").read_text())}["simplest"]
    assert simple["counts"]["wrong"] == 0 and len(simple["molecules"]) == sum(
        len(g) for _, g in evaluate.SIMPLEST
    )
    assert "## Simplest molecules" in (out / "MODEL_CARD.md").read_text()
    for reg in ("hgb", "krr"):
        row = metrics["regression"]["mae"][reg]["gap"]
        assert set(row) >= {
            *("sorted", "sum", "mean", "raw", "raw_renumbered", "predict_mean"),
            *("raw_canonical", "raw_canonical_ranks"),
        }
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Limits" in card and "## Acceptance checks" in card and "raw (renumbered)" in card
    assert "raw (canonical)" in card and "raw (ranks)" in card and "fixed plan of 1 epochs" in card
    assert misses[0]["input"] in card.split("## Limits")[1]
    assert "Seed spread" in card and "Seeds in which the MAE is below raw (QM9 order)" in card
