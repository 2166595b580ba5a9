"""Pieces of the molecule cards' measurements that need no model: the exact nearest-other search
behind "coinciding distinct molecules" and the sampling interval of a reconstruction rate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from quotient_models.molecules.evaluate import _coincidences, _nearest_other
from quotient_models.molecules.evaluate_druglike import refusal_kind, wilson_interval


def _brute(v: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(v[:, None, :] - v[None, :, :], axis=2)
    np.fill_diagonal(d, np.inf)
    return d.min(1)


@pytest.mark.parametrize(
    "n,chunk,dims", [(2, 1, 40), (3, 2, 40), (57, 8, 40), (300, 1024, 40), (300, 64, 16)]
)
def test_nearest_other_is_exact(n: int, chunk: int, dims: int) -> None:
    v = np.random.default_rng(n).normal(size=(n, dims)) * 30
    assert np.allclose(_nearest_other(v, chunk), _brute(v), rtol=1e-9, atol=0)


def test_a_near_coincidence_is_not_lost_to_float32_cancellation() -> None:
    # norms of 100: float32 squared distances carry errors of ~1e-2, the pair is 1e-6 apart
    v = np.random.default_rng(0).normal(size=(200, 64)) * 12
    v[17] = v[90] + 1e-6 / 8
    got = _nearest_other(v)
    assert got[17] == pytest.approx(np.linalg.norm(v[17] - v[90]), rel=1e-9)
    c = _coincidences(v, [f"m{k}" for k in range(200)], rtol=1e-5)
    assert c["coinciding"] == 2 and c["distinct"] == 200  # both molecules of the pair


@pytest.mark.parametrize("dims", [2, 48])
def test_a_duplicate_row_is_at_distance_zero(dims: int) -> None:
    v = np.random.default_rng(1).normal(size=(40, dims))
    v[3] = v[30]
    got = _nearest_other(v)
    assert got[3] == 0 and got[30] == 0 and (np.delete(got, [3, 30]) > 0).all()


def test_one_molecule_has_no_neighbour_and_duplicates_count_once() -> None:
    assert np.isinf(_nearest_other(np.ones((1, 3)))).all()
    v = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0]])
    # the same canonical SMILES twice is one molecule, not a coincidence
    assert _coincidences(v, ["C", "C", "N"], 1e-5)["coinciding"] == 0
    assert _coincidences(v, ["C", "O", "N"], 1e-5)["coinciding"] == 2


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)  # the textbook figures
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(1.0, 10)[0] < 0.75
    lo, hi = wilson_interval(0.962, 500)
    assert lo < 0.962 < hi and hi - lo < 0.04
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_acceptance_counts_refusals_by_kind_with_the_limit_they_broke() -> None:
    from quotient_models.errors import InputError
    from quotient_models.molecules.model import load_molecule_model
    from quotient_models.runtime import InputLimits, PrepareOptions

    model = load_molecule_model(Path("model_store/models/druglike-vae"))
    kinds = {}
    for text in ("C" * 70, "C" * 71 + ".O", "C" * 130, "[18F]C", "[19F]CC", "[B]"):
        with pytest.raises(InputError) as refused:
            model.prepare_noted(text.encode(), InputLimits(), PrepareOptions(standardize=True))
        kinds[text] = refusal_kind(refused.value.reason)
    assert kinds["C" * 70] == kinds["C" * 71 + ".O"] == "more than 64 heavy atoms"
    assert kinds["C" * 130] == "more than 128 heavy atoms as read, before standardisation"
    assert kinds["[18F]C"] == kinds["[19F]CC"] == "atom n (F) has an isotope label"
    assert kinds["[B]"].startswith("element B is outside this model's domain")


def test_downstream_figures_are_the_compared_feature_sets() -> None:
    from quotient_models.molecules.evaluate_druglike import DOWNSTREAM_FIGURES, figures

    row = {f: {"mae": 1.0 + k, "rmse": 2.0} for k, f in enumerate(DOWNSTREAM_FIGURES)}
    row |= {"predict_mean": {"mae": 9.0, "rmse": 9.0}, "raw": {"mae": 5.0, "rmse": 5.0}}
    doc = {
        "tasks": {
            "solubility": {"units": {"logS": "log10(mol/L)"}, "results": {"logS": row}},
            "freesolv": {"units": {}, "skipped": "too few molecules"},
            "neighbours": {
                "rows": {
                    "sorted (l2)": {"ecfp4_overlap": 0.25},
                    "random": {"ecfp4_overlap": 0.01},
                    "ECFP4 Tanimoto": {"ecfp4_overlap": None},
                }
            },
        }
    }
    got = {f["name"]: f for f in figures("downstream", doc, "CMD")}
    assert set(got) == {
        *(f"downstream.solubility.logS.{f}.mae" for f in DOWNSTREAM_FIGURES),
        "downstream.neighbours.sorted.ecfp4_overlap",
    }
    assert got["downstream.solubility.logS.ecfp4.mae"]["value"] == 2.0
    assert "log10(mol/L)" in got["downstream.solubility.logS.sorted.mae"]["description"]
    assert {f["command"] for f in got.values()} == {"CMD"}


def test_the_card_compares_latent_widths_with_this_models_current_figures(tmp_path: Path) -> None:
    """The latent-width table's row for this model comes from its metrics.json as it is now, not
    from the copy taken when the comparison ran (it once showed an older invariance figure)."""
    import json
    import shutil

    from quotient_models.molecules.evaluate import write_card

    source = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"
    model = tmp_path / "qm9-vae"
    model.mkdir()
    for name in ("model.json", "metrics.json", "projection.json", "training_history.json"):
        shutil.copy(source / name, model / name)
    metrics = json.loads((model / "metrics.json").read_text())
    width = next(m for m in metrics if m["name"] == "latent_width")
    width["models"][0]["max_relative_change_sorted"] = 0.123  # a stale copy
    invariance = next(m for m in metrics if m["name"] == "invariance")
    (model / "metrics.json").write_text(json.dumps(metrics))
    write_card(model)
    row = next(
        line
        for line in (model / "MODEL_CARD.md").read_text().splitlines()
        if line.startswith("| 8 | element")
    )
    assert f"| {invariance['max_relative_change_sorted']:.2e} |" in row
    assert "1.23e-01" not in row


def test_metrics_json_is_the_same_whatever_order_sections_ran_in(tmp_path: Path) -> None:
    """``evaluate all`` runs four sections and the others run on their own: metrics.json keeps
    its sections in one order, and the last digits BLAS's summation order moves are not stored,
    so a rerun rewrites the committed file byte for byte."""
    import json
    import shutil

    from quotient_models.molecules.evaluate import SECTIONS, _write

    source = Path(__file__).resolve().parents[2] / "model_store" / "models" / "qm9-vae"
    written = []
    for order in (("regression", "simplest"), ("simplest", "regression")):
        model = tmp_path / "-".join(order)
        model.mkdir()
        shutil.copy(source / "model.json", model / "model.json")
        for key in order:
            noise = 1e-15 if key == order[0] else -1e-15  # what a rerun's BLAS can move
            result = {"mae": {"krr": {"gap": {"unit": "eV", "sorted": 0.1234567890123 + noise}}}}
            if key == "simplest":
                result = {"counts": {"exact": 3, "refused": 1, "wrong": 0}, "molecules": [1] * 4}
            else:
                result |= {"regressors": {"krr": "kernel ridge"}, "train_molecules": 5}
            _write(model, key, result)
        written.append((model / "metrics.json").read_text().replace(str(model), "MODEL"))
    assert written[0] == written[1]
    metrics = json.loads(written[0])
    names = [m["name"] for m in metrics if "value" not in m]
    assert names == [s for s in SECTIONS if s in names] == ["simplest", "regression"]
    figure = next(m for m in metrics if m["name"] == "regression.krr.gap.sorted")
    assert figure["value"] == 0.123456789
