"""The molecule model card's figures, one command each (issue 3, item 5):

    python -m quotient_models.molecules.evaluate invariance     --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate reconstruction --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate regression     --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate neighbours     --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate all            --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate spread         --data data/qm9 --model DIR
    python -m quotient_models.molecules.evaluate simplest       --data data/qm9 --model DIR

- invariance: every test molecule is written as SMILES with ``--numberings`` random atom
  numberings (RDKit ``RenumberAtoms``, then non-canonical SMILES) and embedded through the serving
  path; the largest relative change of each projection, and the number of distinct test molecules
  (by canonical SMILES) whose default embedding coincides with another's (relative distance
  ≤ ``--coincide-rtol``); also how often QM9's own SMILES atom order is RDKit's canonical one.
- reconstruction: exact reconstruction rate (decoded canonical SMILES == input's) from the sorted
  embedding and from the raw latent (QM9's SMILES order), and their agreement, decoded as Decode
  serves (verified: a decode that does not re-embed to its embedding is refused); the rate of
  wrong SMILES returned (0 by construction); as a diagnostic, the agreement when the raw rows are
  decoded in their own order (no canonical reordering); and for every split (train, val, test)
  its exact rate and the smallest molecules that do not come back, with the decoder's guess.
- regression: test MAE for the HOMO-LUMO gap and the isotropic polarizability from every
  projection, from the raw latent in QM9's SMILES order and in a random atom order, with two
  regressors (gradient boosting on all training embeddings; RBF kernel ridge on standardized
  features), each with the same settings for every feature set.
- neighbours: how alike each test molecule's 10 nearest test molecules are to it (mean |Δ| of
  the gap and polarizability, overlap with its ECFP4 Tanimoto neighbours, share with its atom
  count) for every projection under L2 and cosine, and for ``sorted``/``raw`` with both paddings
  (``molecules/neighbours.py``): what each projection's metric and the padding were chosen by.
- spread (not part of ``all``): the regression repeated with ``--seeds`` for ``sorted``, ``raw``
  and the canonical-rank control, to set their differences against seed-to-seed variation.
- simplest: the ``SIMPLEST`` molecules (single atoms, ions, small rings, multiple bonds) embedded
  and decoded as the service does: each comes back, or is refused with the reason (never another
  molecule), with the decoder's guess and whether QM9 holds it. Needs no evaluation data beyond
  the split membership, and takes seconds: it runs on its own and rewrites the card.
Results are merged into the model directory's metrics.json (sections in ``SECTIONS`` order,
floats to ``STORED_DIGITS`` significant digits, so a rerun rewrites it byte for byte) and
MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from quotient_models.errors import InputError
from quotient_models.invariance import relative_change
from quotient_models.molecules.data import QM9, SPLITS, load
from quotient_models.molecules.featurize import DecodedMolecule, featurize
from quotient_models.molecules.model import MoleculeModel, load_molecule_model
from quotient_models.molecules.neighbours import neighbour_quality
from quotient_models.molecules.projections import SortedProjectionHead
from quotient_models.molecules.train import dense_arrays

__all__ = ["invariance", "main", "neighbours", "reconstruction", "regression", "simplest"]

PROJECTIONS = ("sorted", "sum", "mean", "raw")
FEATURES = (
    *PROJECTIONS,
    "sorted_latent_only",
    "raw_renumbered",
    "raw_canonical",
    "raw_canonical_ranks",
)
SPREAD_FEATURES = ("sorted", "raw", "raw_canonical_ranks")
SPREAD_SEEDS = (0, 1, 2)
MISS_EXAMPLES = 8
DECODE_CHUNK = 512  # molecules per decode call: bounds the memory of verifying 64-atom rows
# The simplest molecules, by kind, for the card's "Simplest molecules" section (``simplest``).
SIMPLEST: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("single atoms", ("C", "N", "O", "F")),
    ("ions", ("[NH4+]", "[OH-]", "C[NH3+]", "C[O-]", "[C-]#N", "CC(=O)[O-]", "C[N+](=O)[O-]")),
    ("small rings", ("C1CC1", "C1CO1", "C1CN1", "C1CCC1", "C1COC1", "c1ccoc1", "c1ccccc1")),
    (
        "multiple bonds",
        ("C=C", "C#C", "C#N", "O=C=O", "N#N", "C=O", "C=N", "N=N", "O=O", "C=C=C", "N=C=O"),
    ),
    ("two or three atoms", ("CC", "CO", "CN", "CF", "OO", "NN", "FF", "CCC", "CC#N", "OC=O")),
)
TARGETS = ("gap", "alpha")


PAPER = "Hansen, Calissano & Feragen, *Interpreting Equivariant Representations*, ICML 2024"


def _embed_arrays(
    model: MoleculeModel, arrays: dict[str, np.ndarray], batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    if model.dynamic_atoms:
        # the encoder's pair tensors grow with N²: smaller batches of molecules of similar size,
        # each cut to its largest molecule (the latent pads back to max_atoms), in input order
        sizes = (arrays["atoms"][..., 0] >= 0).sum(axis=1)
        order = np.argsort(sizes, kind="stable")
        zs, masks = [], []
        for s in range(0, len(order), 512):
            idx = order[s : s + 512]
            n = max(int(sizes[idx].max(initial=0)), 1)
            z, m = model.latent(
                {"atoms": arrays["atoms"][idx, :n], "bonds": arrays["bonds"][idx, :n, :n]}
            )
            zs.append(z)
            masks.append(m)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return np.concatenate(zs)[inverse], np.concatenate(masks)[inverse]
    zs, masks = [], []
    for s in range(0, len(arrays["atoms"]), batch):
        z, m = model.latent({k: v[s : s + batch] for k, v in arrays.items()})
        zs.append(z)
        masks.append(m)
    return np.concatenate(zs), np.concatenate(masks)


def source_smiles(data: QM9) -> np.ndarray:
    """The data set's own SMILES (its atom order): QM9's, or MOSES's for drug-like data."""
    return data.arrays["qm9_smiles" if "qm9_smiles" in data.arrays else "source_smiles"]


def _rows(data: QM9, split: str, limit: int | None, seed: int) -> np.ndarray:
    rows = data.rows(split)
    if limit and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    return rows


INVARIANCE_CHUNK = 1024  # molecules per task: the renumbered graphs are never all in memory
KEPT = ("sorted", "sum", "mean")  # projections checked for coinciding distinct molecules
INVARIANCE_TOLERANCE = 1e-5  # relative change above which a molecule counts as not invariant
_WORKER: dict[str, MoleculeModel] = {}


def _renumbered_chunk(
    model: MoleculeModel, smiles: Sequence[str], numberings: int, seed: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str], int]:
    """One chunk of ``invariance``: each SMILES and ``numberings`` renumberings of it (seeded by
    ``seed``, so that a chunk's result does not depend on which process runs it) featurised and
    embedded as the service does. Returns the relative changes per projection, the base
    embeddings of ``KEPT``, the canonical SMILES and how many molecules have symmetric atoms."""
    from rdkit import Chem

    rng = np.random.default_rng(list(seed))
    base_graphs, variant_graphs = [], []
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi)
        base_graphs.append(featurize(smi, model.domain))
        for _ in range(numberings):
            perm = rng.permutation(mol.GetNumAtoms()).tolist()
            variant = Chem.MolToSmiles(Chem.RenumberAtoms(mol, perm), canonical=False)
            variant_graphs.append(featurize(variant, model.domain))
    zb, mb = _embed_arrays(model, model.collate_graphs(base_graphs))
    zv, mv = _embed_arrays(model, model.collate_graphs(variant_graphs))
    rel, kept = {}, {}
    for name in PROJECTIONS:
        eb = model.head.apply(name, zb, mb).values
        ev = model.head.apply(name, zv, mv).values
        # each molecule's largest change over its renumberings: which molecules break it
        change = relative_change(np.repeat(eb, numberings, axis=0), ev)
        rel[name] = change.reshape(len(smiles), numberings).max(axis=1)
        if name in KEPT:
            kept[name] = eb
    symmetric = sum(int(g.symmetry.max() > 0) for g in base_graphs)
    return rel, kept, [g.smiles for g in base_graphs], symmetric


def _worker_init(model_dir: str, engine: str) -> None:
    _WORKER["model"] = load_molecule_model(model_dir, engine, threads=1)


def _worker_chunk(
    smiles: Sequence[str], numberings: int, seed: Sequence[int]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str], int]:
    return _renumbered_chunk(_WORKER["model"], smiles, numberings, seed)


def invariance(
    model: MoleculeModel,
    data: QM9,
    limit: int | None,
    numberings: int,
    seed: int,
    coincide_rtol: float,
    jobs: int = 1,
    engine: str = "onnx",
) -> dict[str, Any]:
    """The invariance figures (module docstring), in chunks of ``INVARIANCE_CHUNK`` molecules;
    ``jobs`` > 1 runs the chunks in that many processes, each loading the model (``engine``) with
    one thread (the figures do not depend on it: chunk k's renumberings are seeded by (seed, k))."""
    from tqdm import tqdm

    rows = _rows(data, "test", limit, seed)
    smiles_of = source_smiles(data)
    chunks = [
        ([str(smiles_of[r]) for r in rows[s : s + INVARIANCE_CHUNK]], (seed, k))
        for k, s in enumerate(range(0, len(rows), INVARIANCE_CHUNK))
    ]
    bar = tqdm(total=len(rows), desc="renumber and embed", mininterval=5)
    parts = []
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            jobs, initializer=_worker_init, initargs=(str(model.spec.directory), engine)
        ) as pool:
            for part in pool.map(
                _worker_chunk,
                [c for c, _ in chunks],
                [numberings] * len(chunks),
                [sd for _, sd in chunks],
            ):
                parts.append(part)
                bar.update(len(part[2]))
    else:
        for smiles, sd in chunks:
            parts.append(_renumbered_chunk(model, smiles, numberings, sd))
            bar.update(len(smiles))
    bar.close()
    result: dict[str, Any] = {"molecules": len(rows), "numberings": numberings}
    canonical = [smi for part in parts for smi in part[2]]
    for name in PROJECTIONS:
        worst = np.concatenate([part[0][name] for part in parts])  # per molecule
        result[f"max_relative_change_{name}"] = float(worst.max())
        result[f"median_relative_change_{name}"] = float(np.median(worst))
        above = np.nonzero(worst > INVARIANCE_TOLERANCE)[0]
        result[f"molecules_above_tolerance_{name}"] = len(above)
        if name != "raw":  # the molecules an invariant projection fails, worst first
            top = above[np.argsort(-worst[above], kind="stable")][:MISS_EXAMPLES]
            result[f"above_tolerance_examples_{name}"] = [
                {"smiles": canonical[i], "relative_change": float(worst[i])} for i in top
            ]
        if name == "sorted":
            result["relative_change_quantiles_sorted"] = {
                q: float(np.quantile(worst, float(q))) for q in ("0.5", "0.99", "0.9999")
            }
    result["invariance_tolerance"] = INVARIANCE_TOLERANCE
    result["coincident_distinct_molecules"] = {
        name: _coincidences(
            np.concatenate([part[1][name] for part in parts]), canonical, coincide_rtol
        )
        for name in KEPT
    }
    result["coincide_rtol"] = coincide_rtol
    result["molecules_with_symmetric_atoms"] = sum(part[3] for part in parts)
    result["qm9_order_is_rdkit_canonical"] = _canonical_order_fraction(
        [str(smiles_of[r]) for r in rows]
    )
    return result


def _canonical_orders(smiles: Sequence[str], by: str = "smiles") -> list[list[int]]:
    """For each SMILES, its atoms in a canonical order: ``by="smiles"`` the order in which RDKit's
    canonical SMILES writes them (a depth-first walk), ``by="ranks"`` ascending RDKit canonical
    atom ranks (ties broken)."""
    from rdkit import Chem

    orders = []
    for s in smiles:
        mol = Chem.MolFromSmiles(str(s))
        if by == "ranks":
            ranks = Chem.CanonicalRankAtoms(mol, breakTies=True, includeChirality=False)
            orders.append([int(k) for k in np.argsort(list(ranks))])
            continue
        Chem.MolToSmiles(mol, isomericSmiles=False)
        orders.append(
            [int(k) for k in mol.GetProp("_smilesAtomOutputOrder").strip("[],").split(",")]
        )
    return orders


def _canonical_order_fraction(smiles: list[str]) -> float:
    """Fraction of SMILES whose atom order is RDKit's canonical atom order (then ``raw`` in that
    order is itself a canonical, i.e. invariant, ordering for these strings)."""
    orders = _canonical_orders(smiles)
    return sum(o == list(range(len(o))) for o in orders) / max(len(smiles), 1)


def _canonical_rows(
    z: np.ndarray, mask: np.ndarray, smiles: Sequence[str], by: str = "smiles"
) -> tuple[np.ndarray, np.ndarray]:
    """Each molecule's latent rows in a canonical atom order (``_canonical_orders``; padding
    stays last): an invariant, lossless ordering that is chemically aligned across molecules."""
    order = np.tile(np.arange(z.shape[1]), (len(z), 1))
    for k, o in enumerate(_canonical_orders(smiles, by)):
        order[k, : len(o)] = o
    return np.take_along_axis(z, order[..., None], axis=1), np.take_along_axis(mask, order, axis=1)


def _nearest_other(v: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Distance [n] from each row of v [n, D] to its nearest other row (inf when alone), in
    float64. The candidate is the nearest by float32 squared distances in chunks (BLAS; memory
    chunk × n) and its distance is recomputed in float64, so that a near-coincidence is not lost
    to cancellation (float32 can only pick the wrong one of two neighbours whose distances differ
    by its rounding)."""
    out = np.full(len(v), np.inf)
    if len(v) < 2:
        return out
    v32 = np.ascontiguousarray(v, dtype=np.float32)
    sq = (v32**2).sum(1)
    for s in range(0, len(v), chunk):
        rows = np.arange(s, min(s + chunk, len(v)))
        g = v32[rows] @ v32.T  # ‖a − b‖² − ‖a‖² = ‖b‖² − 2 a·b, ranked per row
        g *= -2.0
        g += sq[None, :]
        g[np.arange(len(rows)), rows] = np.inf  # not itself
        best = g.argmin(axis=1)
        out[rows] = np.linalg.norm(v[best] - v[rows], axis=1)
    return out


def _coincidences(values: np.ndarray, smiles: list[str], rtol: float) -> dict[str, Any]:
    """Distinct molecules (by canonical SMILES) whose embedding is within rtol·‖e‖ of another's."""
    first = {s: k for k, s in reversed(list(enumerate(smiles)))}
    keep = np.array(sorted(first.values()))
    v = values[keep].astype(np.float64)
    rel = _nearest_other(v) / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
    return {
        "distinct": len(keep),
        "coinciding": int((rel <= rtol).sum()),
        "min_relative_nn_distance": float(rel.min()),
    }


def _reason_kind(reason: str | None) -> str:
    """A refusal's kind, for counting: the text before its first colon, the distance left out."""
    text = reason or ""
    if " re-embeds " in text:
        return "decoded molecule does not re-embed to the embedding (another molecule)"
    if text.startswith("decoded ") and " is no molecule this model embeds" in text:
        return "decoded molecule is outside what this model embeds"
    return text.split(":")[0]


def _decode_all(
    model: MoleculeModel, values: np.ndarray, pool: Executor | None = None
) -> list[DecodedMolecule]:
    """``model.decode`` in chunks of DECODE_CHUNK, in ``pool``'s processes when given
    (``_worker_init``), in input order."""
    from tqdm import tqdm

    chunks = [values[s : s + DECODE_CHUNK] for s in range(0, len(values), DECODE_CHUNK)]
    parts = pool.map(_worker_decode, chunks) if pool else (model.decode(c) for c in chunks)
    out: list[DecodedMolecule] = []
    with tqdm(total=len(values), desc="decode", mininterval=5, disable=len(chunks) < 8) as bar:
        for part in parts:
            out += part
            bar.update(len(part))
    return out


def _worker_decode(values: np.ndarray) -> list[DecodedMolecule]:
    return _WORKER["model"].decode(values)


def _worker_decode_own(z: np.ndarray, mask: np.ndarray) -> list[DecodedMolecule]:
    return _WORKER["model"].decode_latent(z, mask, canonical=False)


def _misses(
    model: MoleculeModel,
    values: np.ndarray,
    n_atoms: np.ndarray,
    truth: Sequence[str],
    decoded: Sequence[DecodedMolecule],
) -> list[dict[str, Any]]:
    """The smallest molecules (atoms, then SMILES) that do not come back, for the card: what
    Decode answers (``reason``) and what the decoder made of them (``decoded``, ``distance``:
    its unverified guess, ``allow_inexact``)."""
    missed = [k for k, (d, t) in enumerate(zip(decoded, truth, strict=True)) if d.smiles != t]
    shown = sorted(missed, key=lambda k: (int(n_atoms[k]), truth[k]))[:MISS_EXAMPLES]
    guesses = model.decode(values[shown], allow_inexact=True) if shown else []
    return [
        {
            "input": truth[k],
            "decoded": g.smiles,
            "distance": g.distance,
            "returned": decoded[k].smiles,
            "reason": decoded[k].reason,
        }
        for k, g in zip(shown, guesses, strict=True)
    ]


def _split_summary(
    model: MoleculeModel,
    values: np.ndarray,
    n_atoms: np.ndarray,
    truth: Sequence[str],
    decoded: Sequence[DecodedMolecule],
) -> dict[str, Any]:
    pairs = list(zip(decoded, truth, strict=True))
    return {
        "molecules": len(truth),
        "exact": sum(d.smiles == t for d, t in pairs),
        "wrong": sum(d.smiles is not None and d.smiles != t for d, t in pairs),
        "refused": dict(Counter(_reason_kind(d.reason) for d, _ in pairs if d.smiles is None)),
        "misses": _misses(model, values, n_atoms, truth, decoded),
    }


def reconstruction(
    model: MoleculeModel,
    data: QM9,
    limit: int | None,
    seed: int,
    jobs: int = 1,
    engine: str = "onnx",
    split_limit: int | str | None = "limit",
) -> dict[str, Any]:
    """Decoded as the service decodes (verified); ``limit`` test molecules (default all) and
    ``split_limit`` of each other split (None: all; default: ``limit``), seeded samples.
    ``jobs`` > 1 decodes in that many processes, each loading the model (``engine``) with one
    thread (decoding is deterministic: the figures do not depend on it)."""
    others = limit if isinstance(split_limit, str) else split_limit  # "limit": the same
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(
            jobs, initializer=_worker_init, initargs=(str(model.spec.directory), engine)
        ) as pool:
            return _reconstruction(model, data, limit, others, seed, pool)
    return _reconstruction(model, data, limit, others, seed, None)


def _reconstruction(
    model: MoleculeModel,
    data: QM9,
    limit: int | None,
    split_limit: int | None,
    seed: int,
    pool: Executor | None,
) -> dict[str, Any]:
    atoms, bonds = dense_arrays(data, model.domain, pad_to_domain=not model.dynamic_atoms)
    rows = _rows(data, "test", limit, seed)
    z, mask = _embed_arrays(model, {"atoms": atoms[rows], "bonds": bonds[rows]})
    truth = [str(s) for s in data.arrays["smiles"][rows]]
    out: dict[str, Any] = {
        "molecules": len(rows),
        "verified": True,  # decodes refused beyond decode_tolerance (card: "Reconstruction")
        "decode_tolerance": model.decode_tolerance,
    }
    decoded, values = {}, {}
    for name in ("sorted", "raw"):
        values[name] = model.head.apply(name, z, mask).values
        decoded[name] = _decode_all(model, values[name], pool)
        hits = [d.smiles == t for d, t in zip(decoded[name], truth, strict=True)]
        out[f"exact_rate_{name}"] = float(np.mean(hits))
        out[f"invalid_rate_{name}"] = float(np.mean([d.smiles is None for d in decoded[name]]))
        returned = [d.smiles is not None for d in decoded[name]]
        out[f"wrong_rate_{name}"] = float(  # a SMILES returned that is not the input's
            np.mean([r and not h for r, h in zip(returned, hits, strict=True)])
        )
        reasons = Counter(_reason_kind(d.reason) for d in decoded[name] if d.smiles is None)
        out[f"invalid_reasons_{name}"] = dict(reasons.most_common(5))
    n_atoms = mask.sum(axis=1)
    splits = {"test": _split_summary(model, values["sorted"], n_atoms, truth, decoded["sorted"])}
    out["misses_sorted"] = splits["test"]["misses"]
    for split in SPLITS:
        if split in splits:
            continue
        r = _rows(data, split, split_limit, seed)
        zs, ms = _embed_arrays(model, {"atoms": atoms[r], "bonds": bonds[r]})
        v = model.head.apply("sorted", zs, ms).values
        t = [str(x) for x in data.arrays["smiles"][r]]
        splits[split] = _split_summary(model, v, ms.sum(axis=1), t, _decode_all(model, v, pool))
    out["splits"] = {split: splits[split] for split in SPLITS if split in splits}
    symmetric = atoms[rows][..., 3].max(axis=1) > 0  # some atoms share a symmetry class
    hits_sorted = np.array([d.smiles == t for d, t in zip(decoded["sorted"], truth, strict=True)])
    out["molecules_with_symmetric_atoms"] = int(symmetric.sum())
    out["exact_rate_sorted_symmetric"] = float(hits_sorted[symmetric].mean())
    out["exact_rate_sorted_no_symmetric"] = float(hits_sorted[~symmetric].mean())
    # diagnostic: the raw rows decoded in their own order, without the canonical reordering
    starts = range(0, len(z), DECODE_CHUNK)
    rows_of = [z[s : s + DECODE_CHUNK, :, model.n_type :] for s in starts]
    masks_of = [mask[s : s + DECODE_CHUNK] for s in starts]
    own = (
        pool.map(_worker_decode_own, rows_of, masks_of)
        if pool
        else (
            model.decode_latent(r, m, canonical=False)
            for r, m in zip(rows_of, masks_of, strict=True)
        )
    )
    raw_own = [d for part in own for d in part]
    out["agreement_uncanonicalised"] = float(
        np.mean([a.smiles == b.smiles for a, b in zip(decoded["sorted"], raw_own, strict=True)])
    )
    out["agreement_sorted_raw"] = float(  # same SMILES, or invalid both times
        np.mean(
            [a.smiles == b.smiles for a, b in zip(decoded["sorted"], decoded["raw"], strict=True)]
        )
    )
    return out


def simplest(model: MoleculeModel, data: QM9 | None = None) -> dict[str, Any]:
    """Each ``SIMPLEST`` molecule embedded (``sorted``) and decoded as Decode serves it:
    ``outcome`` "exact", "refused" (no SMILES, ``reason``) or "wrong" (another molecule: never,
    decodes are verified), the decoder's own guess (``decoded``, ``distance``: unverified), and
    the QM9 splits holding it (``data``; None without it). One that the model does not embed at
    all has ``outcome`` "not embedded" and its reason."""
    where: dict[str, list[str]] = {}
    if data is not None:
        split = data.arrays["split"]
        for k, smi in enumerate(data.arrays["smiles"]):
            where.setdefault(str(smi), []).append(SPLITS[int(split[k])])
    rows = []
    for kind, group in SIMPLEST:
        for text in group:
            row: dict[str, Any] = {"kind": kind, "input": text}
            try:
                graph = model.graph(text)
            except InputError as exc:
                rows.append({**row, "outcome": "not embedded", "reason": exc.reason})
                continue
            values = model.embed_batch(model.collate([model.item(graph)]), "sorted").values
            [served] = model.decode(values)
            [guess] = model.decode(values, allow_inexact=True)
            outcome = (
                "exact"
                if served.smiles == graph.smiles
                else ("refused" if served.smiles is None else "wrong")
            )
            rows.append(
                {
                    **row,
                    "canonical": graph.smiles,
                    "outcome": outcome,
                    "returned": served.smiles,
                    "reason": served.reason,
                    "decoded": guess.smiles,
                    "distance": guess.distance,
                    "qm9_splits": sorted(set(where.get(graph.smiles, [])))
                    if data is not None
                    else None,
                }
            )
    counts = Counter(r["outcome"] for r in rows)
    return {
        "molecules": rows,
        "counts": {k: counts.get(k, 0) for k in ("exact", "refused", "wrong", "not embedded")},
        "decode_tolerance": model.decode_tolerance,
    }


def neighbours(model: MoleculeModel, data: QM9, limit: int | None, seed: int) -> dict[str, Any]:
    """``neighbour_quality`` on the test split (``limit`` molecules, seeded sample)."""
    atoms, bonds = dense_arrays(data, model.domain, pad_to_domain=not model.dynamic_atoms)
    rows = _rows(data, "test", limit, seed)
    z, mask = _embed_arrays(model, {"atoms": atoms[rows], "bonds": bonds[rows]})
    smiles = [str(s) for s in data.arrays["smiles"][rows]]
    props = {t: data.prop(t)[rows] for t in TARGETS}
    return neighbour_quality(model, z, mask, smiles, props, seed)


def _renumber(
    z: np.ndarray, mask: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each molecule's real rows in a random order (padding stays last)."""
    keys = np.where(mask, rng.random(mask.shape), np.inf)
    order = np.argsort(keys, axis=1)
    return np.take_along_axis(z, order[..., None], axis=1), np.take_along_axis(mask, order, axis=1)


KRR_GRID = {"gamma_scale": (0.5, 1.0, 2.0), "alpha": (1e-3, 1e-2, 1e-1)}


def _standardize(x_tr: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = x_tr.mean(0), x_tr.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    return [((x - mu) / sd).astype(np.float64) for x in (x_tr, *others)]


def _rbf(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-gamma * np.maximum(sq, 0.0))


def _krr_predict(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_va: np.ndarray,
    y_va: np.ndarray,
    x_te: np.ndarray,
    fit_rows: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, dict[str, float]]:
    """Kernel ridge regression (RBF) on standardized features, targets standardized; the same
    procedure for every feature set: gamma = scale / median squared distance, (scale, alpha)
    chosen on the validation split by the mean standardized MAE over the targets, then refit on
    ``fit_rows`` training molecules. Returns test predictions [n_te, n_targets] and the choice."""
    from scipy.linalg import cho_factor, cho_solve

    x_tr, x_va, x_te = _standardize(x_tr, x_va, x_te)
    y_mu, y_sd = y_tr.mean(0), y_tr.std(0)
    ys = (y_tr - y_mu) / y_sd
    sub = rng.choice(len(x_tr), min(2000, len(x_tr)), replace=False)
    sq = (x_tr[sub] ** 2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * x_tr[sub] @ x_tr[sub].T
    median = float(np.median(d2[np.triu_indices(len(sub), 1)]))
    sel = rng.choice(len(x_tr), min(fit_rows // 2, len(x_tr)), replace=False)
    best: tuple[float, float, float] | None = None
    for scale in KRR_GRID["gamma_scale"]:
        gamma = scale / median
        k = _rbf(x_tr[sel], x_tr[sel], gamma)
        k_va = _rbf(x_va, x_tr[sel], gamma)
        for alpha in KRR_GRID["alpha"]:
            c = cho_factor(k + alpha * np.eye(len(sel)))
            pred = k_va @ cho_solve(c, ys[sel]) * y_sd + y_mu
            score = float((np.abs(pred - y_va).mean(0) / y_sd).mean())
            if best is None or score < best[0]:
                best = (score, scale, alpha)
    assert best is not None
    _, scale, alpha = best
    fit = rng.choice(len(x_tr), min(fit_rows, len(x_tr)), replace=False)
    gamma = scale / median
    c = cho_factor(_rbf(x_tr[fit], x_tr[fit], gamma) + alpha * np.eye(len(fit)))
    coef = cho_solve(c, ys[fit])
    pred = np.concatenate(
        [_rbf(x_te[s : s + 4096], x_tr[fit], gamma) @ coef for s in range(0, len(x_te), 4096)]
    )
    return pred * y_sd + y_mu, {"gamma_scale": scale, "alpha": alpha}


def regression(
    model: MoleculeModel,
    data: QM9,
    train_limit: int | None,
    seed: int,
    krr_rows: int = 12000,
    regressors: tuple[str, ...] = ("hgb", "krr"),
    features: Sequence[str] = FEATURES,
) -> dict[str, Any]:
    """Test MAE per target and feature set for each regressor (the same settings for every
    feature set; nothing is tuned per projection). ``seed`` drives gradient boosting's
    early-stopping split, kernel ridge's training subsets and the random renumbering.

    Feature sets: the projections (``raw`` = per-atom latents in the atom order of QM9's own
    SMILES, which is close to a canonical order), ``raw_renumbered`` = the same latents with
    each molecule's atoms in a random order (what ``raw`` means for SMILES written by anyone), and
    ``raw_canonical`` / ``raw_canonical_ranks`` = the same latents in RDKit's canonical SMILES
    atom order / in ascending canonical atom rank (controls: invariant orderings by a graph
    canonicalisation, to tell whether ``raw``'s edge comes from the latent or from QM9's
    near-canonical order); ``sorted_latent_only`` = the lexicographic order of the latent rows
    without the model's sort key (the default before qm9-vae 1.2.0)."""
    tr, va, te = _rows(data, "train", train_limit, seed), data.rows("val"), data.rows("test")
    descriptions = {
        "hgb": "HistGradientBoostingRegressor(max_iter=300, early_stopping) on all features",
        "krr": f"RBF kernel ridge on standardized features, {min(krr_rows, len(tr))} training "
        "molecules, gamma = s / median squared distance, (s, alpha) from "
        f"{KRR_GRID['gamma_scale']} x {KRR_GRID['alpha']} by validation MAE (same rule for all)",
    }
    out: dict[str, Any] = {
        "train_molecules": len(tr),
        "test_molecules": len(te),
        "regressors": {r: descriptions[r] for r in regressors},
    }
    feats = _regression_features(model, data, (tr, va, te), seed, features)
    return out | _fit_regressors(data, feats, (tr, va, te), seed, krr_rows, regressors)


Splits = tuple[np.ndarray, np.ndarray, np.ndarray]  # training, validation, test rows


def _regression_features(
    model: MoleculeModel, data: QM9, rows: Splits, seed: int, features: Sequence[str]
) -> dict[str, tuple[np.ndarray, ...]]:
    """Each feature set (``FEATURES``) for the training, validation and test rows; ``seed``
    drives the random renumbering of ``raw_renumbered``."""
    unknown = set(features) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown feature sets {sorted(unknown)}; choose from {FEATURES}")
    atoms, bonds = dense_arrays(data, model.domain, pad_to_domain=not model.dynamic_atoms)
    rng = np.random.default_rng(seed)
    smiles = source_smiles(data)
    splits = [(*_embed_arrays(model, {"atoms": atoms[r], "bonds": bonds[r]}), r) for r in rows]

    def rows_of(name: str, z: np.ndarray, m: np.ndarray, rows: np.ndarray) -> np.ndarray:
        if name in PROJECTIONS:
            return model.head.apply(name, z, m).values
        if name == "sorted_latent_only":  # lexicographic order of the latent rows alone
            learned = replace(model.head, key=())
            return learned.apply("sorted", z[..., model.n_type :], m).values
        if name == "raw_renumbered":
            return model.head.apply("raw", *_renumber(z, m, rng)).values
        by = "smiles" if name == "raw_canonical" else "ranks"
        return model.head.apply("raw", *_canonical_rows(z, m, smiles[rows], by)).values

    return {name: tuple(rows_of(name, *split) for split in splits) for name in features}


def _fit_regressors(
    data: QM9,
    feats: dict[str, tuple[np.ndarray, ...]],
    rows: Splits,
    seed: int,
    krr_rows: int,
    regressors: tuple[str, ...],
) -> dict[str, Any]:
    """Test MAE of every regressor for every target and feature set (``mae``), and kernel
    ridge's validation choice per feature set (``krr_choice``); ``seed`` drives gradient
    boosting's early-stopping split and kernel ridge's training subsets."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    tr, va, te = rows
    out: dict[str, Any] = {"mae": {r: {} for r in regressors}}
    units = {"gap": "eV", "alpha": "bohr^3"}
    y = np.stack([data.prop(t) for t in TARGETS], axis=1)
    for reg_name in regressors:
        table = out["mae"][reg_name]
        for j, target in enumerate(TARGETS):
            table[target] = {
                "unit": units[target],
                "predict_mean": float(np.abs(y[te, j] - y[tr, j].mean()).mean()),
            }
        for name, (x_tr, x_va, x_te) in feats.items():
            if reg_name == "hgb":
                for j, target in enumerate(TARGETS):
                    reg = HistGradientBoostingRegressor(
                        max_iter=300, early_stopping=True, random_state=seed
                    )
                    reg.fit(x_tr, y[tr, j])
                    table[target][name] = float(np.abs(reg.predict(x_te) - y[te, j]).mean())
            else:
                pred, choice = _krr_predict(
                    x_tr, y[tr], x_va, y[va], x_te, krr_rows, np.random.default_rng(seed)
                )
                for j, target in enumerate(TARGETS):
                    table[target][name] = float(np.abs(pred[:, j] - y[te, j]).mean())
                out.setdefault("krr_choice", {})[name] = choice
            print(
                f"{reg_name} {name}: " + ", ".join(f"{t} {table[t][name]:.4f}" for t in TARGETS),
                flush=True,
            )
    return out


def spread(
    model: MoleculeModel,
    data: QM9,
    seeds: Sequence[int] = SPREAD_SEEDS,
    krr_rows: int = 12000,
    regressors: tuple[str, ...] = ("hgb", "krr"),
    features: Sequence[str] = SPREAD_FEATURES,
) -> dict[str, Any]:
    """``regression``'s fits repeated with several seeds for a few feature sets (default:
    ``sorted``, ``raw`` in QM9's order and the canonical-rank control), to tell a difference
    between two feature sets from the regressors' own seed-to-seed variation. The features are
    built once (with the first seed, which only ``raw_renumbered`` would use), on all training
    molecules."""
    rows = (data.rows("train"), data.rows("val"), data.rows("test"))
    feats = _regression_features(model, data, rows, seeds[0], features)
    runs = {
        str(s): _fit_regressors(data, feats, rows, s, krr_rows, regressors)["mae"] for s in seeds
    }
    return {"seeds": list(seeds), "features": list(features), "mae": runs}


def _spread_lines(m: dict[str, Any]) -> list[str]:
    """The card's seed-spread table: per regressor/target and feature set, the test MAE of every
    seed and their mean; then, per pair of feature sets, in how many seeds the first is lower."""
    seeds = [str(s) for s in m["seeds"]]
    feats = m["features"]
    first = m["mae"][seeds[0]]
    lines = [
        "| regressor | target | "
        + " | ".join(f"{LABELS.get(f, f)}: seeds {', '.join(seeds)} (mean)" for f in feats)
        + " |",
        "|---|---|" + "---|" * len(feats),
    ]
    wins = []
    for reg, table in first.items():
        for t in table:
            cells = []
            for f in feats:
                vals = [m["mae"][s][reg][t][f] for s in seeds]
                cells.append(", ".join(_f(v) for v in vals) + f" ({_f(float(np.mean(vals)))})")
            lines.append(f"| {reg} | {t} | " + " | ".join(cells) + " |")
            for f in feats:
                if f != "raw" and "raw" in feats:
                    k = sum(m["mae"][s][reg][t][f] < m["mae"][s][reg][t]["raw"] for s in seeds)
                    wins.append(f"{reg} {t} {LABELS.get(f, f)} {k}/{len(seeds)}")
    if not wins:
        return lines
    return [*lines, "", "Seeds in which the MAE is below raw (QM9 order): " + "; ".join(wins) + "."]


LABELS = {
    "sorted_latent_only": "sorted (latent only)",
    "raw": "raw (QM9 order)",
    "raw_renumbered": "raw (renumbered)",
    "raw_canonical": "raw (canonical)",
    "raw_canonical_ranks": "raw (ranks)",
}


def _width_row(model_dir: Path, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's row of the latent-width comparison, from its model.json and ``metrics``
    (its metrics.json by name)."""
    spec = json.loads((model_dir / "model.json").read_text())
    tr = spec.get("training", {})
    row: dict[str, Any] = {
        "dir": str(model_dir),
        "latent_dim": spec["latent"]["dim"],
        "sort_key": spec["latent"].get("sort_key", []),
        "epochs": tr.get("epochs"),
        "train_minutes": tr.get("minutes"),
        "best_val_exact_graph": tr.get("best_val_exact_graph"),
        "train_args": tr.get("args", {}),
    }
    if "invariance" in metrics:
        row["max_relative_change_sorted"] = metrics["invariance"]["max_relative_change_sorted"]
        row["coinciding_sorted"] = metrics["invariance"]["coincident_distinct_molecules"]["sorted"][
            "coinciding"
        ]
    if "reconstruction" in metrics:
        row["exact_rate_sorted"] = metrics["reconstruction"]["exact_rate_sorted"]
    if "regression" in metrics:
        row["hgb_mae"] = metrics["regression"]["mae"].get("hgb")
    return row


def compare(model_dir: Path, other: Path) -> dict[str, Any]:
    """Figures of another model directory (e.g. the d = 1 isometric-sort model trained with the
    same command and ``--latent-dim 1``), already measured by this module, next to this one's.
    The card shows this model's row from its current metrics.json (``_width_row``), so a later
    evaluation of this model never leaves the comparison showing older figures."""
    rows = [
        _width_row(d, {x["name"]: x for x in json.loads((d / "metrics.json").read_text())})
        for d in (model_dir, other)
    ]
    return {"models": rows}


# metrics.json's results in this order whatever order they were measured in, so a rerun of any
# subset rewrites the file identically.
SECTIONS = (
    "invariance",
    "reconstruction",
    "simplest",
    "neighbours",
    "regression",
    "spread",
    "latent_width",
)
STORED_DIGITS = 10  # significant digits stored: BLAS's summation order moves the 15th


def _stored(x: Any) -> Any:
    """``x`` with every float rounded to ``STORED_DIGITS`` significant digits (nested dicts and
    lists too): kernel ridge's Cholesky and matrix products on several threads sum in an order
    that can differ run to run, which moves the last digits of an MAE and nothing a reader uses."""
    if isinstance(x, float):
        return float(f"{x:.{STORED_DIGITS}g}")
    if isinstance(x, dict):
        return {k: _stored(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_stored(v) for v in x]
    return x


def _write(model_dir: Path, key: str, result: dict[str, Any]) -> None:
    """Store one evaluation's result under its name in metrics.json (what the card is written
    from), then refresh the flat figures derived from it (what ``GetModel`` serves)."""
    path = model_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else []
    metrics = [m for m in metrics if m.get("name") != key]
    metrics.append({"name": key, **result})  # no timestamps: a rerun rewrites it identically
    path.write_text(json.dumps(_with_figures(metrics, model_dir), indent=2) + "\n")


def figures(key: str, r: dict[str, Any], model_dir: Path) -> list[dict[str, Any]]:
    """The headline numbers of one evaluation's result as flat entries ``{name, value,
    description, command}``, the form every model's metrics.json offers to ``GetModel``."""
    command = (
        f"python -m quotient_models.molecules.evaluate {key} --data data/qm9 --model {model_dir}"
    )
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, description: str) -> None:
        out.append(
            {
                "name": f"{key}.{name}",
                "value": float(value),
                "description": description,
                "command": command,
            }
        )

    if key == "invariance":
        for p in PROJECTIONS:
            add(
                f"max_relative_change.{p}",
                r[f"max_relative_change_{p}"],
                f"largest ||p(x)-p(x renumbered)||/||p(x)|| of projection '{p}' over "
                f"{r['numberings']} random atom numberings of each of {r['molecules']} test "
                "molecules",
            )
            if f"molecules_above_tolerance_{p}" in r:
                add(
                    f"molecules_above_tolerance.{p}",
                    r[f"molecules_above_tolerance_{p}"],
                    f"test molecules (of {r['molecules']}) whose '{p}' embedding changes by more "
                    f"than {r['invariance_tolerance']:g} (relative) under a renumbering",
                )
        for p, c in r["coincident_distinct_molecules"].items():
            add(
                f"coinciding.{p}",
                c["coinciding"],
                f"distinct test molecules whose '{p}' embedding coincides with another's "
                f"(relative distance <= {r['coincide_rtol']:g})",
            )
    elif key == "reconstruction":
        for p in ("sorted", "raw"):
            add(
                f"exact_rate.{p}",
                r[f"exact_rate_{p}"],
                f"fraction of {r['molecules']} test molecules decoded from '{p}' to their own "
                "canonical SMILES",
            )
        add(
            "agreement_sorted_raw",
            r["agreement_sorted_raw"],
            "fraction of test molecules decoded to the same result from 'sorted' and 'raw'",
        )
        if "wrong_rate_sorted" in r:
            add(
                "wrong_rate.sorted",
                r["wrong_rate_sorted"],
                f"fraction of {r['molecules']} test molecules for which Decode returned a "
                "SMILES other than theirs (decodes are verified by re-embedding)",
            )
    elif key == "simplest":
        for outcome in ("exact", "refused", "wrong"):
            add(
                outcome,
                r["counts"][outcome],
                f"of {len(r['molecules'])} of the simplest molecules (single atoms, ions, small "
                f"rings, multiple bonds), those Decode returned {outcome}"
                + (" (another molecule)" if outcome == "wrong" else ""),
            )
    elif key == "regression":
        for reg, table in r["mae"].items():
            for t, row in table.items():
                for f, v in row.items():
                    if f != "unit":
                        add(
                            f"{reg}.{t}.{f}",
                            v,
                            f"test MAE ({row['unit']}) for {t} from '{LABELS.get(f, f)}' by "
                            f"{r['regressors'][reg]}; {r['train_molecules']} training molecules",
                        )
    elif key == "neighbours":
        for row in r["rows"]:
            if row["padding"] != r["served_padding"]["padding"] and row["feature"] != "sorted":
                continue
            name = f"{row['feature']}.{row['padding']}.{row['metric']}"
            what = (
                f"the {r['k']} nearest other test molecules ({r['molecules']}) by "
                f"'{row['feature']}' with {row['padding']} padding under {row['metric']}"
            )
            add(
                f"{name}.gap_mean_abs_diff",
                row["mean_abs_diff_gap"],
                f"mean |gap difference| (eV) to {what}",
            )
            add(
                f"{name}.ecfp4_overlap",
                row["ecfp4_overlap"],
                f"fraction of {what} that are "
                "among its ECFP4 Tanimoto neighbours (ties at the k-th place count)",
            )
            add(
                f"{name}.same_atom_count",
                row["same_atom_count"],
                f"fraction of {what} with its number of heavy atoms",
            )
    elif key == "spread":
        seeds = [str(s) for s in r["seeds"]]
        for reg, table in r["mae"][seeds[0]].items():
            for t, row in table.items():
                for f in r["features"]:
                    add(
                        f"{reg}.{t}.{f}.mean",
                        float(np.mean([r["mae"][s][reg][t][f] for s in seeds])),
                        f"mean test MAE ({row['unit']}) for {t} from '{LABELS.get(f, f)}' by "
                        f"{reg} over seeds {', '.join(seeds)}",
                    )
    return out


def _with_figures(metrics: list[dict[str, Any]], model_dir: Path) -> list[dict[str, Any]]:
    """metrics.json's evaluation results in ``SECTIONS`` order, floats as stored (``_stored``),
    followed by the flat figures derived from them (any older flat figures dropped)."""
    order = {k: i for i, k in enumerate(SECTIONS)}
    results = sorted(
        (_stored(m) for m in metrics if "value" not in m),
        key=lambda m: order.get(m["name"], len(order)),
    )
    return results + [f for m in results for f in figures(m["name"], m, model_dir)]


def refresh_figures(model_dir: Path) -> None:
    """Rewrite metrics.json's flat figures from the evaluation results it holds."""
    path = model_dir / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(_with_figures(metrics, model_dir), indent=2) + "\n")


TRAIN_COMMAND = (
    "make train-molecules  # = python -m quotient_models.molecules.train --data data/qm9 "
    "--out model_store/models/qm9-vae"
)


def _f(x: float) -> str:
    return f"{x:.4f}" if abs(x) >= 1e-3 else f"{x:.2e}"


def add_measure_arguments(parser: argparse.ArgumentParser, parallel: str) -> None:
    """The options of the measurements both molecule cards share: --seed (of every sample),
    --numberings and --coincide-rtol (invariance), --jobs (processes of ``parallel``)."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--numberings", type=int, default=5)
    parser.add_argument("--coincide-rtol", type=float, default=1e-5)
    parser.add_argument(
        "--jobs",
        type=int,
        default=2,
        help=f"{parallel}: processes (the figures do not change)",
    )


def invariance_failure_lines(m: dict[str, Any]) -> list[str]:
    """Card lines naming the molecules whose invariant embedding a renumbering changes by more
    than the tolerance, and why that happens (nothing when there are none)."""
    failed = [p for p in PROJECTIONS if p != "raw" and m.get(f"molecules_above_tolerance_{p}")]
    if not failed:
        return []
    lines = [
        "",
        "**Not invariant for every molecule.** "
        + "; ".join(
            f"`{p}` changes by more than {m['invariance_tolerance']:g} for "
            f"{m[f'molecules_above_tolerance_{p}']} of {m['molecules']:,} molecules"
            for p in failed
        )
        + ". The rows are put in order by comparing float32 latents with a tolerance; where two "
        "different atoms' values lie within float noise of a tie (or of the tolerance), two "
        "numberings of one molecule can order them differently, and the flattened vector "
        "changes although the set of rows does not (`sum` and `mean` stay within float noise; "
        "decoding is unaffected, it does not depend on the order). Worst molecules:",
        "",
    ]
    for p in failed:
        for e in m.get(f"above_tolerance_examples_{p}", []):
            lines.append(f"- `{p}`: `{e['smiles']}` ({e['relative_change']:.3g})")
    return lines


def requirements(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 3's acceptance checks, computed from metrics.json (None where not measured)."""
    out: dict[str, Any] = {}
    if "invariance" in metrics:
        m = metrics["invariance"]
        out["a_invariance_max_rel_change_le_1e-5"] = (
            m["max_relative_change_sorted"] <= INVARIANCE_TOLERANCE
        )
        out["a_no_coinciding_molecules"] = (
            m["coincident_distinct_molecules"]["sorted"]["coinciding"] == 0
        )
    if "reconstruction" in metrics:
        out["b_sorted_raw_agreement_100pct"] = (
            metrics["reconstruction"]["agreement_sorted_raw"] == 1.0
        )
        if "wrong_rate_sorted" in metrics["reconstruction"]:
            out["b_decode_returns_no_wrong_smiles"] = (
                metrics["reconstruction"]["wrong_rate_sorted"] == 0.0
            )
    if "simplest" in metrics:
        out["b_simplest_molecules_exact_or_refused"] = metrics["simplest"]["counts"]["wrong"] == 0
    if "regression" in metrics:
        for reg, table in metrics["regression"]["mae"].items():
            for target, row in table.items():
                out[f"c_{reg}_{target}_sorted_beats_pooling"] = row["sorted"] < min(
                    row["sum"], row["mean"]
                )
                out[f"c_{reg}_{target}_sorted_beats_raw_qm9_order"] = row["sorted"] < row["raw"]
                if "raw_renumbered" in row:
                    out[f"c_{reg}_{target}_sorted_beats_raw_renumbered"] = (
                        row["sorted"] < row["raw_renumbered"]
                    )
    return out


def _canonical_control(mae: dict[str, dict[str, dict[str, Any]]]) -> str:
    """'hgb gap 0.34 / 0.33 (raw in QM9 order 0.35, sorted 0.38); ...' for every
    regressor/target with canonical-order figures."""
    parts = [
        f"{reg} {t} {_f(r['raw_canonical'])} / {_f(r['raw_canonical_ranks'])} (raw in QM9 order "
        f"{_f(r['raw'])}, sorted {_f(r['sorted'])})"
        for reg, table in mae.items()
        for t, r in table.items()
        if "raw_canonical" in r and "raw_canonical_ranks" in r
    ]
    return "; ".join(parts)


def _padding_words(head: SortedProjectionHead) -> str:
    if head.padding == "fill":
        return f"padding rows all {head.pad_value:g}"
    return f"padding rows ({head.pad_value:g}{', 0' * (head.dim - 1)})"


def _miss_text(m: dict[str, Any]) -> str:
    """'C1CO1 → COC (refused: 3.19 away)', or 'X → invalid (reason)'; entries written before
    decodes were verified have no distance."""
    if m.get("decoded") is None:
        return f"{m['input']} → invalid ({m['reason']})"
    if m.get("distance") is None:
        return f"{m['input']} → {m['decoded']}"
    return f"{m['input']} → {m['decoded']} (refused: {m['distance']:.3g} away)"


def _split_lines(splits: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "Misses by split (`sorted`, decoded as Decode serves; each miss as input → the "
        "decoder's guess, refused with its distance, or why the graph is not a molecule; the "
        f"{MISS_EXAMPLES} smallest):",
        "",
        "| split | molecules | exact | refused | wrong SMILES | smallest misses |",
        "|---|---|---|---|---|---|",
    ]
    for split, r in splits.items():
        refused = sum(r["refused"].values())
        lines.append(
            f"| {split} | {r['molecules']} | {r['exact'] / max(r['molecules'], 1):.2%} | "
            f"{refused} | {r['wrong']} | "
            + ("; ".join(_miss_text(m) for m in r["misses"]) or "none")
            + " |"
        )
    return lines


def _simplest_lines(
    m: dict[str, Any],
    command: str = "python -m quotient_models.molecules.evaluate simplest",
    data_name: str = "QM9",
) -> list[str]:
    """The card's table of the simplest molecules: each input, what Decode returns and the
    decoder's guess; ``data_name`` the training data whose splits are listed (a "-" column when
    the result holds none)."""
    c = m["counts"]
    lines = [
        "## Simplest molecules",
        "",
        f"The simplest molecules embedded and decoded as the service does (`{command}`): "
        f"{c['exact']} come back exactly, {c['refused']} are refused with a reason, "
        f"{c['wrong']} return another molecule"
        + (f", {c['not embedded']} are not embedded" if c.get("not embedded") else "")
        + f" (a decode is returned only when it re-embeds within {m['decode_tolerance']:g} of "
        "the embedding). "
        "Decoder's guess: what the decoder made of the embedding, unverified, and how far its "
        f"embedding is; {data_name}: the splits that hold the molecule. Molecule: the input, "
        "then its canonical form as embedded where that differs (after standardisation).",
        "",
        f"| kind | molecule | Decode returns | decoder's guess (distance) | {data_name} |",
        "|---|---|---|---|---|",
    ]
    for r in m["molecules"]:
        if r["outcome"] == "not embedded":
            lines.append(f"| {r['kind']} | {r['input']} | not embedded: {r['reason']} | - | - |")
            continue
        returned = r["returned"]
        if returned is None:  # the distance is in the guess column
            why = r["reason"] or ""
            returned = "refused: " + ("re-embeds beyond it" if " re-embeds " in why else why)
        guess = (
            f"{r['decoded']} ({r['distance']:.2g})" if r["decoded"] is not None else "no molecule"
        )
        splits = r.get("qm9_splits")
        held = "-" if splits is None else (", ".join(splits) or "not in QM9")
        shown = r["input"] if r["canonical"] == r["input"] else f"{r['input']} → {r['canonical']}"
        lines.append(f"| {r['kind']} | {shown} | {returned} | {guess} | {held} |")
    return lines


def _neighbour_lines(m: dict[str, Any]) -> list[str]:
    """The card's neighbour section: the table, then what was chosen, before and after."""
    k, served = m["k"], m["served_padding"]
    pads = {**m["compared_paddings"], served["padding"]: served["pad_value"]}
    words = {
        "fill": f"fill ({pads.get('fill', 2.0):g} everywhere)",
        "marker": f"marker ({pads.get('marker', 1.25):g}, 0, ..., 0)",
    }
    lines = [
        "## Distance and neighbours (since v1.3.0)",
        "",
        f"Each of the {m['molecules']} test molecules against its {k} nearest other test "
        "molecules by an embedding (exact search): mean |Δ| of the HOMO-LUMO gap and of the "
        f"polarizability, overlap@{k} with its ECFP4 neighbours (the share of the {k} whose "
        "Tanimoto similarity, Morgan radius 2 / 2048 bits, is at least the query's "
        f"{k}-th highest; ties count), and the share with the query's number of heavy atoms. "
        "`python -m "
        "quotient_models.molecules.evaluate neighbours --data data/qm9 --model DIR`. Served: "
        "**bold**.",
        "",
        f"| projection | padding | metric | Δ gap (eV) | Δ alpha (bohr^3) | ECFP4 overlap@{k} | "
        "same atom count |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {f: i for i, f in enumerate(("sorted", "raw", "sum", "mean"))}
    rows = sorted(
        m["rows"],
        key=lambda r: (order.get(r["feature"], 9), r["padding"] != served["padding"], r["metric"]),
    )

    def cells(r: dict[str, Any]) -> str:
        overlap = r["ecfp4_overlap"]
        return (
            f"{r['mean_abs_diff_gap']:.4f} | {r['mean_abs_diff_alpha']:.3f} | "
            + (f"{overlap:.4f}" if overlap is not None else "-")
            + f" | {r['same_atom_count']:.3f}"
        )

    for r in rows:
        pad = words[r["padding"]] if r["feature"] in ("sorted", "raw") else "-"
        b = "**" if r["served"] else ""
        lines.append(f"| {b}{r['feature']}{b} | {pad} | {b}{r['metric']}{b} | {cells(r)} |")
    for name, r in m["references"].items():
        label = "random neighbours" if name == "random" else "ECFP4 Tanimoto neighbours"
        lines.append(f"| {label} | - | - | {cells(r)} |")
    pick = {(r["feature"], r["padding"], r["metric"]): r for r in m["rows"]}
    before, after = pick.get(("sorted", "fill", "cosine")), pick.get(("sorted", "marker", "l2"))
    if before and after:
        before_l2 = pick[("sorted", "fill", "l2")]
        lines += [
            "",
            "Chosen: padding rows (pad value, 0, ..., 0) with the pad value "
            f"{pads['marker']:g} just above the latent bound, instead of every value "
            f"{pads['fill']:g} (v1.2.0), and L2 for every projection. A missing atom then costs "
            "about pad² + ‖z‖² in squared distance, close to what two atoms with different "
            "latents cost, instead of d·4 + ‖z‖²; the first value still lies outside the box "
            "|z| < 1 of real rows, so "
            "padding is recognised by decoding, never equals a real row and sorts last. "
            "Before (cosine / L2): "
            f"Δ gap {before['mean_abs_diff_gap']:.4f} / {before_l2['mean_abs_diff_gap']:.4f} eV, "
            f"ECFP4 overlap {before['ecfp4_overlap']:.4f} / {before_l2['ecfp4_overlap']:.4f}, "
            f"same atom count {before['same_atom_count']:.3f} / "
            f"{before_l2['same_atom_count']:.3f}: the padding decided the neighbours. After "
            f"(L2): Δ gap {after['mean_abs_diff_gap']:.4f} eV, ECFP4 overlap "
            f"{after['ecfp4_overlap']:.4f}, same atom count {after['same_atom_count']:.3f}. "
            "The polarizability, which grows with the number of atoms, had "
            + (
                "closer"
                if before_l2["mean_abs_diff_alpha"] < after["mean_abs_diff_alpha"]
                else "no closer"
            )
            + " neighbours when the padding sorted them by atom count (Δ alpha "
            f"{before_l2['mean_abs_diff_alpha']:.3f} before, {after['mean_abs_diff_alpha']:.3f} "
            "after, bohr^3): the atom count still counts, but no longer decides. "
            "`sum` and `mean` point the same way, so their cosine figures are equal. "
            "The padding and the metric were chosen on the validation split by Δ gap, in an "
            "exploratory run, among marker values 1.05 to 3, fill values 1.05 to 2 and "
            "standardised latents (the latents' means are within 0.05 of 0 and their standard "
            "deviations alike, so centring alone changes little); 1.25 was among the best and "
            "leaves a margin of 0.125 around the decoder's threshold. The invariance, "
            "reconstruction and regression figures of this card are those of this padding.",
        ]
    ecfp = m["references"].get("ecfp4")
    if after and ecfp:
        lines += [
            "",
            f"Neighbours by `sorted` are less alike in gap than ECFP4 Tanimoto neighbours "
            f"(Δ gap {after['mean_abs_diff_gap']:.4f} vs {ecfp['mean_abs_diff_gap']:.4f} eV) and "
            + ("more" if after["mean_abs_diff_alpha"] < ecfp["mean_abs_diff_alpha"] else "less")
            + f" alike in polarizability ({after['mean_abs_diff_alpha']:.3f} vs "
            f"{ecfp['mean_abs_diff_alpha']:.3f} bohr^3).",
        ]
    return lines


def write_card(model_dir: Path) -> None:
    """MODEL_CARD.md from model.json, training_history.json and metrics.json (regenerated after
    every evaluation)."""
    spec = json.loads((model_dir / "model.json").read_text())
    path = model_dir / "metrics.json"
    metrics = {m["name"]: m for m in (json.loads(path.read_text()) if path.exists() else [])}
    lat, dom, tr = spec["latent"], spec["domain"], spec.get("training", {})
    head = SortedProjectionHead.load(model_dir / spec["projection_head"]["file"])
    args = tr.get("args", {})
    data = spec.get("data", {})
    counts = data.get("counts", {})
    arch = spec["architecture"]
    cfg = lat.get("config", {})
    lines = [
        f"# {spec['name']} ({arch}, v{spec['version']})",
        "",
        spec["description"],
        "",
        "## Model",
        f"- Permutation-equivariant graph VAE (`quotient_models/molecules/arch_{arch}.py`): "
        f"{cfg.get('enc_layers', '?')} message-passing encoder layers, "
        f"{cfg.get('dec_layers', '?')} self-attention decoder blocks, width "
        f"{cfg.get('hidden', '?')}; {lat['dim']} latent dimensions per heavy atom, "
        f"|z| < {lat['bound']}.",
        f"- Domain: at most {dom['max_atoms']} heavy atoms; elements "
        f"{', '.join(dom['elements'])}; charges {dom['charges']}; at most "
        f"{dom['max_hydrogens']} H per atom. Stereo is ignored.",
        "- Symmetric atoms get canonical symmetry slots from RDKit's canonical ranking so that "
        "an equivariant decoder can rebuild them (featurize.py).",
        "- Projections: `sorted` (default; rows in tolerance-grouped lexicographic order"
        + (
            f" of (atom {', '.join(lat['sort_key'])}, latent), see below"
            if lat.get("sort_key")
            else ""
        )
        + f"; {_padding_words(head)}; decodable), `sum`, `mean` (pooling baselines), `raw` "
        "(input atom order, not invariant, same layout as `sorted`). Distance: "
        + ", ".join(f"`{p.name}` {p.metric}" for p in head.describe())
        + " (none normalised; chosen by the neighbour figures below).",
    ]
    if lat.get("sort_key"):
        lines += [
            "- Sort key (since v1.2.0): before sorting, each atom's row is prefixed with its "
            f"{', '.join(lat['sort_key'])} written as coordinates in (-1, 1) "
            "(`featurize.type_coordinates`, read from the input graph; local to the atom, so "
            "invariant under renumbering). `sorted` therefore orders atoms by type first, with "
            "no float near-ties there, and by the learned latent within a type; the prefix is not "
            "output, so every projection carries only the learned latent values, and `sorted` "
            "and `raw` hold the same numbers in different orders. The networks and weights are "
            "those of v1.1.0. The key was chosen on the validation split, in exploratory runs, "
            "among lexicographic orders of the latent alone (each column first, columns by "
            "variance, principal axes, an element-discriminant axis) and atom-type prefixes "
            "(element; element and degree; element, degree and hydrogens): this one had the "
            "lowest validation MAE. `sorted (latent only)` in the regression tables is the "
            "v1.1.0 order.",
        ]
    lines += [
        "",
        "## Data, split, training",
        f"- QM9 from the PyPI package qm9pack 1.0.3: {counts.get('kept', '?')} molecules; "
        f"split 80/10/10 by `numpy.random.default_rng(0).permutation` (train "
        f"{counts.get('train', '?')}, val {counts.get('val', '?')}, test "
        f"{counts.get('test', '?')}); split sha256 `{data.get('manifest_split_sha256', '?')}`.",
        f"- Command: `{TRAIN_COMMAND}` (CPU, seed {args.get('seed', '?')}, "
        f"{args.get('threads', '?')} torch thread(s)): a fixed plan of "
        f"{tr.get('planned_epochs', tr.get('epochs', '?'))} epochs, so a rerun gives the same "
        "weights (checked for v1.1.0: two runs of the full plan on this machine, one of them "
        "sharing the CPU with an evaluation, gave bit-identical checkpoints and ONNX files); only "
        "the wall clock depends on the machine's load"
        + (
            f". THIS RUN STOPPED EARLY at the {args.get('budget_min', '?')}-minute guard after "
            f"{tr.get('epochs', '?')} epochs and does not follow the plan."
            if tr.get("stopped_early_by_budget")
            else "."
        ),
        f"- {tr.get('epochs', '?')} epochs over {tr.get('train_molecules', '?')} molecules "
        f"(batch {args.get('batch_size', '?')}, AdamW lr {args.get('lr', '?')} cosine, KL weight "
        f"{args.get('beta', '?')}), {float(tr.get('minutes', 0)):.1f} min wall clock for the "
        "training loop; the checkpoint with the best validation exact-graph rate "
        f"({float(tr.get('best_val_exact_graph', 0)):.4f}, decoding mu) is exported "
        "(training_history.json).",
        "",
        "## Figures (test split)",
        "",
        "Each by one command: `python -m quotient_models.molecules.evaluate "
        "{invariance|reconstruction|regression} --data data/qm9 --model " + str(model_dir) + "` "
        "(or `all`).",
    ]
    if "invariance" in metrics:
        m = metrics["invariance"]
        co = m["coincident_distinct_molecules"]
        lines += [
            "",
            f"Invariance: each of {m['molecules']} test molecules written with {m['numberings']} "
            "random atom numberings (RDKit RenumberAtoms, non-canonical SMILES), embedded through "
            f"the serving path (ONNX); {m['molecules_with_symmetric_atoms']} molecules have "
            "symmetric atoms. Per molecule, its largest change over the numberings (max and "
            "median over the molecules).",
            "",
            "| projection | max relative change | median | molecules above "
            f"{m.get('invariance_tolerance', 1e-5):g} | distinct molecules | coinciding "
            f"(rtol {m['coincide_rtol']:g}) | min relative NN distance |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in PROJECTIONS:
            c = co.get(name, {})
            lines.append(
                f"| {name} | {m[f'max_relative_change_{name}']:.2e} | "
                f"{m[f'median_relative_change_{name}']:.2e} | "
                f"{m.get(f'molecules_above_tolerance_{name}', '-')} | {c.get('distinct', '-')} | "
                f"{c.get('coinciding', '-')} | "
                + (f"{c['min_relative_nn_distance']:.3g}" if c else "- (not invariant)")
                + " |"
            )
        lines += invariance_failure_lines(m)
    if "reconstruction" in metrics:
        m = metrics["reconstruction"]
        verified = (
            f"decoded as Decode serves: the argmax of every head, rows in canonical order, "
            "hydrogens of non-aromatic atoms from valence, fragments joined by their most "
            "probable bonds, and a decode returned only when its molecule re-embeds within "
            f"{m['decode_tolerance']:g} of the embedding"
            if m.get("verified")
            else "decoding takes the argmax of every head, rows in canonical order; measured "
            "before decodes were verified, derived hydrogens and joined fragments (run "
            "`evaluate reconstruction` again)"
        )
        lines += [
            "",
            f"Reconstruction ({m['molecules']} test molecules; exact = decoded canonical SMILES "
            f"equals the input's; {verified}):",
            "",
            "| from | exact | no SMILES | wrong SMILES | main reasons |",
            "|---|---|---|---|---|",
        ]
        for name in ("sorted", "raw"):
            reasons = "; ".join(f"{k} ({v})" for k, v in m[f"invalid_reasons_{name}"].items())
            wrong = m.get(f"wrong_rate_{name}")
            lines.append(
                f"| {name} | {m[f'exact_rate_{name}']:.2%} | {m[f'invalid_rate_{name}']:.2%} | "
                + ("not measured" if wrong is None else f"{wrong:.2%}")
                + f" | {reasons} |"
            )
        lines.append("")
        if "splits" in m:
            lines += [*_split_lines(m["splits"]), ""]
        if "exact_rate_sorted_symmetric" in m:
            lines.append(
                f"Exact from sorted: {m['exact_rate_sorted_symmetric']:.2%} of the "
                f"{m['molecules_with_symmetric_atoms']} molecules with symmetry-equivalent atoms, "
                f"{m['exact_rate_sorted_no_symmetric']:.2%} of the others."
            )
            lines.append("")
        lines.append(
            f"Agreement sorted vs raw (same SMILES, or invalid both times): "
            f"{m['agreement_sorted_raw']:.2%}"
            + (
                f"; decoding the raw rows in their own order without canonicalisation (diagnostic "
                f"of float equivariance): {m['agreement_uncanonicalised']:.2%}."
                if "agreement_uncanonicalised" in m
                else "."
            )
        )
    if "simplest" in metrics:
        lines += ["", *_simplest_lines(metrics["simplest"])]
    if "neighbours" in metrics:
        lines += ["", *_neighbour_lines(metrics["neighbours"])]
    if "regression" in metrics:
        m = metrics["regression"]
        lines += [
            "",
            f"Regression: test MAE ({m['test_molecules']} molecules), regressors trained on "
            f"{m['train_molecules']} training embeddings, identical settings for every feature "
            "set. `raw (QM9 order)` = per-atom latents in the atom order of QM9's own SMILES "
            "(close to a canonical order); `raw (renumbered)` = the same with each molecule's "
            "atoms randomly renumbered; `raw (canonical)` / `raw (ranks)` = the same in RDKit's "
            "canonical SMILES atom order / in ascending RDKit canonical atom rank (controls: "
            "invariant, lossless orderings by graph canonicalisation; they need the input graph, "
            "which an embedding alone does not carry).",
        ]
        cols = (
            "sorted",
            "sorted_latent_only",
            "sum",
            "mean",
            "raw",
            "raw_renumbered",
            "raw_canonical",
            "raw_canonical_ranks",
            "predict_mean",
        )
        for reg, table in m["mae"].items():
            lines += [
                "",
                f"{reg}: {m['regressors'][reg]}",
                "",
                "| target | sorted | sorted (latent only) | sum | mean | raw (QM9 order) | "
                "raw (renumbered) | raw (canonical) | raw (ranks) | predict mean |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for t, r in table.items():
                lines.append(
                    f"| {t} ({r['unit']}) | "
                    + " | ".join(_f(r[k]) if k in r else "-" for k in cols)
                    + " |"
                )
    if "spread" in metrics:
        m = metrics["spread"]
        lines += [
            "",
            "Seed spread: the regressions above repeated with seeds "
            f"{', '.join(map(str, m['seeds']))} (gradient boosting's early-stopping split, kernel "
            "ridge's training subsets) for a few feature sets, test MAE. `python -m "
            "quotient_models.molecules.evaluate spread --data data/qm9 --model "
            + str(model_dir)
            + "` (not part of `all`).",
            "",
            *_spread_lines(m),
        ]
    if "latent_width" in metrics:
        lines += [
            "",
            f"Latent width ({PAPER}, case 1: permutation-equivariant node latents): a model "
            "trained with the same settings and epoch "
            "count but one latent per atom (`--latent-dim 1 --epochs 6`; sorting is then "
            "isometric) against this one; test split, regression with hgb as above. "
            "`python -m quotient_models.molecules.evaluate latent_width --other DIR`.",
            "",
            "| d | sort key | epochs | train min | val exact | test exact (sorted) | max rel. "
            "change | coinciding | gap sorted / raw / raw renumbered / sum | alpha sorted / raw / "
            "raw renumbered / sum |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        this, *others = metrics["latent_width"]["models"]
        current = {**_width_row(model_dir, metrics), "dir": this["dir"]}
        for r in [current, *others]:
            mae = r.get("hgb_mae") or {}
            cells = []
            for t in ("gap", "alpha"):
                row = mae.get(t, {})
                cells.append(
                    " / ".join(
                        _f(row[k]) if k in row else "-"
                        for k in ("sorted", "raw", "raw_renumbered", "sum")
                    )
                )
            lines.append(
                f"| {r['latent_dim']} | {', '.join(r.get('sort_key') or []) or 'none'} | "
                f"{r['epochs']} | {float(r['train_minutes'] or 0):.1f} | "
                f"{float(r['best_val_exact_graph'] or 0):.4f} | "
                f"{r.get('exact_rate_sorted', float('nan')):.2%} | "
                f"{r.get('max_relative_change_sorted', float('nan')):.2e} | "
                f"{r.get('coinciding_sorted', '-')} | {cells[0]} | {cells[1]} |"
            )
    checks = requirements(metrics)
    if checks:
        lines += ["", "## Acceptance checks (computed from metrics.json)", ""]
        lines += [f"- {k}: {'yes' if v else 'NO'}" for k, v in checks.items()]
        lost = [k for k, v in checks.items() if k.endswith("raw_qm9_order") and not v]
        n_pairs = sum(k.endswith("raw_qm9_order") for k in checks)
        mae = metrics.get("regression", {}).get("mae", {})
        lost_latent = [
            (reg, t)
            for reg, table in mae.items()
            for t, r in table.items()
            if "sorted_latent_only" in r and r["sorted_latent_only"] >= r["raw"]
        ]
        frac = metrics.get("invariance", {}).get("qm9_order_is_rdkit_canonical")
        why = (
            "That order is not arbitrary: QM9's SMILES are a toolkit's output, not a random "
            "numbering"
            + (
                f" (for {frac:.1%} of the test molecules their atom order is exactly RDKit's "
                "canonical atom order)"
                if frac is not None
                else ""
            )
            + ", so `raw` in that order is itself close to a canonical cross-section, one whose "
            "positions are chemically aligned across molecules. For SMILES written any other way "
            "`raw` is not invariant, and with the atoms renumbered (`raw (renumbered)`) it is "
            "worse than `sorted`."
        )
        if lost:
            lines += [
                "",
                "The default projection does NOT beat the raw latent in the order QM9's SMILES "
                f"give ({len(lost)} of {n_pairs} regressor/target pairs). " + why,
            ]
        elif lost_latent:
            lines += [
                "",
                f"The default projection beats the raw latent in the order QM9's SMILES give in "
                f"all {n_pairs} regressor/target pairs; the lexicographic order of the latent "
                "alone (`sorted (latent only)`, the default before v1.2.0) does not (it loses in "
                f"{len(lost_latent)} of {n_pairs}). " + why + " Ordering atoms by type first "
                "gives `sorted` that kind of alignment from the atoms themselves, without a "
                "canonicalisation algorithm. Set the margins against the regressors' "
                "seed-to-seed variation (seed-spread table above).",
            ]
        control = _canonical_control(mae)
        if control and (lost or lost_latent):
            lines += [
                "",
                "Control: the same latents in RDKit's canonical SMILES atom order / in "
                "ascending canonical atom rank, invariant orderings by graph canonicalisation, "
                "give " + control + ": the edge of `raw` in QM9's order over a lexicographic "
                "sort of latents is the edge of a chemically aligned order, not information that "
                "the invariant projection loses (`sorted` decodes back to the molecule, "
                "reconstruction above).",
            ]
    misses = metrics.get("reconstruction", {}).get("misses_sorted")
    lines += [
        "",
        "## Limits",
        f"- Only the training data's domain: up to {dom['max_atoms']} heavy atoms of "
        f"{', '.join(dom['elements'])}; other inputs are rejected with a reason. Stereochemistry "
        "is ignored (and lost on decoding).",
        "- Reconstruction is not perfect (see the table), but Decode never returns another "
        "molecule: every decoded molecule is embedded again, and one that does not land within "
        "the tolerance of the embedding is refused with the distance in the reason "
        "(`DecodeRequest.allow_inexact` returns the decoder's guess anyway). Embeddings that no "
        "molecule made (interpolations, perturbed or generated points) are therefore refused "
        "unless they lie next to a molecule's. Decoding derives the hydrogens of non-aromatic "
        "atoms from valence and joins disconnected fragments by their most probable bonds; "
        "nothing else is repaired. The model was not evaluated as a generative model (sampling "
        "from the prior)."
        + (
            (
                " The smallest test molecules that do not come back from `sorted`: "
                if metrics["reconstruction"].get("verified")
                else " The smallest test molecules that did not come back from `sorted` when "
                "last measured, before decodes were verified (run `evaluate reconstruction` "
                "again): "
            )
            + "; ".join(_miss_text(m) for m in misses)
            + "."
            if misses
            else ""
        ),
        "- The sorted/raw agreement holds by construction: decoding always puts the rows in the "
        "canonical sorted order first, so both reach the decoder bit-identically.",
        f"- With d > 1 the lexicographic sort is lossless but not isometric ({PAPER}, case 1): "
        "distances between sorted embeddings can exceed the orbit distance, and a small change "
        "of a first coordinate can reorder rows. Sorted embeddings of one molecule under "
        "renumbering agree to float precision (table above).",
        "- The regression figures depend on the regressor; both regressors are reported with "
        "the same settings for every feature set.",
        f"- Trained for a fixed {tr.get('planned_epochs', tr.get('epochs', '?'))}-epoch plan on "
        f"CPU (guard: {args.get('budget_min', '?')} minutes); more training would likely improve "
        "the figures.",
    ]
    (model_dir / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "what",
        choices=(
            "invariance",
            "reconstruction",
            "regression",
            "neighbours",
            "all",
            "latent_width",
            "spread",
            "simplest",
        ),
        help="spread and simplest are not part of all: spread repeats the regression for "
        "--seeds; simplest decodes the simplest molecules (seconds)",
    )
    p.add_argument(
        "--seeds", default=",".join(map(str, SPREAD_SEEDS)), help="spread: comma-separated seeds"
    )
    p.add_argument(
        "--other", type=Path, default=None, help="latent_width: the other (e.g. d = 1) model dir"
    )
    p.add_argument("--data", type=Path, default=Path("data/qm9"))
    p.add_argument("--model", type=Path, default=Path("model_store/models/qm9-vae"))
    p.add_argument("--engine", choices=("onnx", "torch"), default="onnx")
    p.add_argument(
        "--limit", type=int, default=None, help="molecules per split evaluated (default: all)"
    )
    p.add_argument(
        "--train-limit", type=int, default=None, help="training molecules for the regressors"
    )
    p.add_argument(
        "--krr-rows", type=int, default=12000, help="training molecules for kernel ridge"
    )
    p.add_argument("--regressors", default="hgb,krr", help="comma-separated: hgb, krr")
    add_measure_arguments(p, "invariance, reconstruction")
    p.add_argument("--no-write", action="store_true", help="print only; leave metrics.json alone")
    args = p.parse_args(argv)
    model = load_molecule_model(args.model, args.engine, threads=2)
    data = load(args.data)
    jobs = {
        "invariance": lambda: invariance(
            model,
            data,
            args.limit,
            args.numberings,
            args.seed,
            args.coincide_rtol,
            args.jobs,
            args.engine,
        ),
        "reconstruction": lambda: reconstruction(
            model, data, args.limit, args.seed, args.jobs, args.engine
        ),
        "neighbours": lambda: neighbours(model, data, args.limit, args.seed),
        "regression": lambda: regression(
            model,
            data,
            args.train_limit,
            args.seed,
            args.krr_rows,
            tuple(args.regressors.split(",")),
        ),
    }
    if args.what == "latent_width":
        if args.other is None:
            p.error("latent_width needs --other DIR")
        jobs = {"latent_width": lambda: compare(args.model, args.other)}
    if args.what == "spread":
        seeds = tuple(int(x) for x in args.seeds.split(","))
        regs = tuple(args.regressors.split(","))
        jobs = {"spread": lambda: spread(model, data, seeds, args.krr_rows, regs)}
    if args.what == "simplest":
        jobs = {"simplest": lambda: simplest(model, data)}
    for name, job in jobs.items():
        if args.what not in (name, "all"):
            continue
        start = time.time()
        result = job()
        print(json.dumps({name: result}, indent=2), flush=True)
        print(f"{name}: {time.time() - start:.0f} s", file=sys.stderr, flush=True)
        if not args.no_write:
            _write(args.model, name, result)
            write_card(args.model)


if __name__ == "__main__":
    main()
