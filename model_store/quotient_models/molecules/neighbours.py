"""How alike the nearest neighbours of a QM9 test molecule are to it, for each projection, padding
and metric: the figures behind each projection's ``metric`` and the ``sorted`` padding (the
``neighbours`` section of the qm9-vae card, ``python -m quotient_models.molecules.evaluate
neighbours``).

For each test molecule, its ``k`` nearest other test molecules by an embedding are scored by

- the mean |Δ| of the HOMO-LUMO gap and of the polarizability (QM9's DFT values; lower is better),
- overlap@k with its ECFP4 neighbours: the fraction of them whose Tanimoto similarity (Morgan
  radius 2, 2048 bits) to the query is at least the query's k-th highest over all other test
  molecules (ties at the k-th place count; higher is better),
- the fraction that have the query's number of heavy atoms (a diagnostic: padding that dominates
  the distance drives it to 1).

References: random neighbours, and the ECFP4 neighbours themselves for the property figures.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from quotient_models.molecules.model import MoleculeModel
from quotient_models.neighbours import mean_abs_difference, nearest

__all__ = [
    "PADDINGS_COMPARED",
    "ecfp4_fingerprints",
    "neighbour_quality",
    "random_neighbours",
    "tanimoto_overlap",
]

K = 10
# The paddings compared (name → pad_value): every value 2.0 (qm9-vae <= 1.2.0) and the marker row
# (1.25, 0, ..., 0) (since 1.3.0); the model's own padding is measured with its own pad_value.
PADDINGS_COMPARED = {"fill": 2.0, "marker": 1.25}
FEATURES = ("sorted", "raw", "sum", "mean")
METRICS = ("l2", "cosine")
PROPERTIES = ("gap", "alpha")


def ecfp4_fingerprints(smiles: list[str]) -> list[Any]:
    """ECFP4 bit vectors (Morgan radius 2, 2048 bits) of SMILES, for Tanimoto similarity."""
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]


def tanimoto_overlap(
    fps: list[Any], neighbours: dict[str, np.ndarray], k: int
) -> tuple[dict[str, float], np.ndarray]:
    """overlap@k with the ECFP4 neighbours for each set of neighbours [n, k], and the ECFP4
    neighbours [n, k] themselves (one pass over the n x n similarities, one row at a time)."""
    from rdkit import DataStructs

    hits = {name: 0 for name in neighbours}
    ecfp = np.empty((len(fps), k), dtype=np.int64)
    for i, fp in enumerate(fps):
        sims = np.asarray(DataStructs.BulkTanimotoSimilarity(fp, fps))
        sims[i] = -1.0
        top = np.argpartition(-sims, k - 1)[:k]
        ecfp[i] = top
        kth = sims[top].min()
        for name, nn in neighbours.items():
            hits[name] += int((sims[nn[i]] >= kth).sum())
    return {name: hits[name] / (len(fps) * k) for name in neighbours}, ecfp


def random_neighbours(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` random other items [n, k] for each of ``n`` (the reference row of the tables)."""
    others = np.random.default_rng(seed).integers(0, n - 1, (n, k))
    return others + (others >= np.arange(n)[:, None])  # never the query itself


def _embeddings(
    model: MoleculeModel, z: np.ndarray, mask: np.ndarray
) -> dict[tuple[str, str], np.ndarray]:
    """(feature, padding) → embeddings: each projection with the served padding, and ``sorted``
    and ``raw`` with the other paddings of ``PADDINGS_COMPARED`` as well."""
    out = {(f, model.head.padding): model.head.apply(f, z, mask).values for f in FEATURES}
    for padding, value in PADDINGS_COMPARED.items():
        if padding != model.head.padding:
            other = replace(model.head, padding=padding, pad_value=value)
            for f in ("sorted", "raw"):
                out[(f, padding)] = other.apply(f, z, mask).values
    return out


def neighbour_quality(
    model: MoleculeModel,
    z: np.ndarray,
    mask: np.ndarray,
    smiles: list[str],
    properties: dict[str, np.ndarray],
    seed: int = 0,
    k: int = K,
) -> dict[str, Any]:
    """The figures of the module docstring for latents z [n, N, key + d] with masks [n, N] of n
    molecules (the gallery is the same n), their canonical SMILES and ``properties`` (name →
    [n] values). Rows of the result: one per (feature, padding, metric), flagged ``served`` when
    it is the projection's own metric with the served padding."""
    metric_of = {p.name: p.metric for p in model.projections()}
    embeddings = _embeddings(model, z, mask)
    neighbours = {
        (f, padding, metric): nearest(values, k, metric)
        for (f, padding), values in embeddings.items()
        for metric in METRICS
    }
    random = random_neighbours(len(z), k, seed)
    named = {"|".join(key): nn for key, nn in neighbours.items()} | {"random": random}
    overlap, ecfp = tanimoto_overlap(ecfp4_fingerprints(smiles), named, k)
    atoms = mask.sum(1)

    def row(nn: np.ndarray, name: str) -> dict[str, Any]:
        return {
            **{f"mean_abs_diff_{p}": mean_abs_difference(nn, v) for p, v in properties.items()},
            "ecfp4_overlap": overlap.get(name),  # None for the ECFP4 neighbours themselves
            "same_atom_count": float((atoms[nn] == atoms[:, None]).mean()),
        }

    rows = []
    for (f, padding, metric), nn in neighbours.items():
        served = padding == model.head.padding and metric == metric_of[f]
        rows.append(
            {"feature": f, "padding": padding, "metric": metric, "served": served}
            | row(nn, "|".join((f, padding, metric)))
        )
    return {
        "molecules": len(z),
        "k": k,
        "served_padding": {"padding": model.head.padding, "pad_value": model.head.pad_value},
        "compared_paddings": dict(PADDINGS_COMPARED),
        "rows": rows,
        "references": {"random": row(random, "random"), "ecfp4": row(ecfp, "ecfp4")},
    }
