"""QM9 from the PyPI package ``qm9pack``: featurised graphs, properties and a seeded split.

``python -m quotient_models.molecules.data prepare --out data/qm9`` reads the CSVs shipped inside
qm9pack (located with ``importlib.util.find_spec``, because importing the package needs
``pkg_resources``), turns every SMILES into a heavy-atom graph (``featurize.py``), checks that each
graph decodes back to the same canonical SMILES, splits the molecules 80/10/10 with a seeded
permutation of QM9's own indices, and writes

- ``qm9.npz``: QM9 index, canonical SMILES, QM9's own SMILES, split (0 train, 1 val, 2 test),
  properties, graphs in the atom order of QM9's SMILES padded to the largest molecule (raw values:
  atomic numbers, charges, hydrogens, symmetry slots, bond codes);
- ``manifest.json``: sources with sha256, licences, counts (read, dropped by reason, per split),
  seed, the observed domain, and ``split_sha256``, a checksum of the split's content (index,split
  lines) that ``load`` verifies.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quotient_models.errors import InputError
from quotient_models.molecules.featurize import MoleculeDomain, MolGraph, decode_graph, featurize

__all__ = [
    "PROPERTIES",
    "QM9",
    "featurise_checked",
    "graph_arrays",
    "load",
    "prepare",
    "qm9pack_dir",
]

# CSV column → (name, unit, factor to the unit)
PROPERTIES = {
    "HOMO_LUMO_gap_au": ("gap", "eV", 27.211386),
    "Polarizability_bohr3": ("alpha", "bohr^3", 1.0),
    "HOMO_au": ("homo", "eV", 27.211386),
    "LUMO_au": ("lumo", "eV", 27.211386),
    "Dipole_debye": ("mu", "D", 1.0),
    "Heatcapacity_Cv_cal_mol_K": ("cv", "cal/(mol K)", 1.0),
    "ZPVE_au": ("zpve", "eV", 27.211386),
}
FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
SPLITS = ("train", "val", "test")
FRACTIONS = (0.8, 0.1, 0.1)


def qm9pack_dir() -> Path:
    spec = importlib.util.find_spec("qm9pack")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qm9pack is not installed: pip install -r requirements/molecules.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def split_checksum(index: np.ndarray, split: np.ndarray) -> str:
    order = np.argsort(index)
    text = "".join(
        f"{int(i)},{SPLITS[int(s)]}\n" for i, s in zip(index[order], split[order], strict=True)
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _read_csvs(source: Path, limit: int | None):  # type: ignore[no-untyped-def]
    import pandas as pd

    frames = [pd.read_csv(source / f, usecols=["Index", "SMILES", *PROPERTIES]) for f in FILES]
    df = pd.concat(frames, ignore_index=True).sort_values("Index").reset_index(drop=True)
    return df.iloc[:limit] if limit else df


def featurise_checked(
    smiles: list[str], domain: MoleculeDomain | None = None, desc: str = "featurise"
) -> tuple[list[int], list[MolGraph], Counter[str]]:
    """Featurise SMILES, keeping those whose graph decodes back to the same canonical SMILES:
    (positions kept, their graphs, dropped counts by reason)."""
    from tqdm import tqdm

    dropped: Counter[str] = Counter()
    keep, graphs = [], []
    for row, text in enumerate(tqdm(smiles, desc=desc, mininterval=2)):
        try:
            g = featurize(text, domain)
        except InputError as exc:
            dropped[exc.reason.split(":")[0]] += 1
            continue
        back = decode_graph(
            [_SYMBOLS[z] for z in g.atomic_numbers],
            g.charges.tolist(),
            g.hydrogens.tolist(),
            g.bonds,
        )
        if back.smiles != g.smiles:
            dropped["graph does not decode to the same SMILES"] += 1
            continue
        keep.append(row)
        graphs.append(g)
    return keep, graphs, dropped


def graph_arrays(graphs: list[MolGraph]) -> dict[str, np.ndarray]:
    """Graphs → the stored arrays, padded to the largest: atomic_numbers, charges, hydrogens,
    symmetry [M, n] int8 (0 in padding), bonds [M, n, n] int8, n_atoms [M]."""
    m = len(graphs)
    n_max = max(g.n_atoms for g in graphs)
    out = {
        k: np.zeros((m, n_max), np.int8)
        for k in ("atomic_numbers", "charges", "hydrogens", "symmetry")
    }
    bonds = np.zeros((m, n_max, n_max), np.int8)
    for k, g in enumerate(graphs):
        n = g.n_atoms
        out["atomic_numbers"][k, :n] = g.atomic_numbers
        out["charges"][k, :n] = g.charges
        out["hydrogens"][k, :n] = g.hydrogens
        out["symmetry"][k, :n] = g.symmetry
        bonds[k, :n, :n] = g.bonds
    return {**out, "bonds": bonds, "n_atoms": np.array([g.n_atoms for g in graphs], np.int64)}


def prepare(out: Path, seed: int = 0, limit: int | None = None) -> dict:
    """Featurise, check, split and write ``qm9.npz`` and ``manifest.json``; returns the manifest."""
    from rdkit import __version__ as rdkit_version

    source = qm9pack_dir()
    df = _read_csvs(source, limit)
    keep, graphs, dropped = featurise_checked(df["SMILES"].tolist())
    kept = df.iloc[keep].reset_index(drop=True)
    index = kept["Index"].to_numpy(np.int64)
    m = len(graphs)
    arrays = graph_arrays(graphs)
    z, charge, hyd = arrays["atomic_numbers"], arrays["charges"], arrays["hydrogens"]
    n_max = z.shape[1]

    rng = np.random.default_rng(seed)
    order = rng.permutation(m)
    n_train, n_val = int(FRACTIONS[0] * m), int(FRACTIONS[1] * m)
    split = np.full(m, 2, np.int8)
    split[order[:n_train]] = 0
    split[order[n_train : n_train + n_val]] = 1

    props = np.stack(
        [kept[c].to_numpy(np.float64) * f for c, (_, _, f) in PROPERTIES.items()], axis=1
    )
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "qm9.npz",
        index=index,
        smiles=np.array([g.smiles for g in graphs]),
        split=split,
        qm9_smiles=kept["SMILES"].to_numpy(str),
        properties=props,
        property_names=np.array([n for n, _, _ in PROPERTIES.values()]),
        **arrays,
    )
    mask = z > 0
    domain = MoleculeDomain(
        max_atoms=int(n_max),
        elements=tuple(_SYMBOLS[int(a)] for a in np.unique(z[mask])),
        charges=tuple(int(c) for c in np.unique(charge[mask])),
        max_hydrogens=int(hyd[mask].max()),
    )
    manifest = {
        "dataset": "QM9",
        "created_unix": int(time.time()),
        "sources": [
            {
                "package": "qm9pack==1.0.3",
                "file": f"qm9pack/data/{f}",
                "sha256": _sha256(source / f),
                "bytes": (source / f).stat().st_size,
            }
            for f in FILES
        ],
        "licences": {
            "qm9pack": "MIT (the package's METADATA)",
            "QM9": "R. Ramakrishnan et al., Quantum chemistry structures and properties of 134 "
            "kilo molecules, Sci. Data 1, 140022 (2014); data distributed via figshare. Check the "
            "licence there before redistributing derived files.",
        },
        "featurisation": {
            "rdkit": rdkit_version,
            "graph": "heavy atoms; aromatic bonds; symmetry slots",
        },
        "counts": {
            "read": len(df),
            "dropped": dict(sorted(dropped.items())),
            "kept": m,
            **{s: int((split == k).sum()) for k, s in enumerate(SPLITS)},
        },
        "split": {
            "seed": seed,
            "fractions": dict(zip(SPLITS, FRACTIONS, strict=True)),
            "method": "numpy default_rng(seed).permutation over the kept molecules in QM9 index "
            "order",
        },
        "split_sha256": split_checksum(index, split),
        "limit": limit,
        "domain": domain.to_json(),
        "properties": {n: {"column": c, "unit": u} for c, (n, u, _) in PROPERTIES.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


_SYMBOLS = {
    1: "H",
    5: "B",
    6: "C",
    7: "N",
    8: "O",
    9: "F",
    15: "P",
    16: "S",
    17: "Cl",
    35: "Br",
    53: "I",
}


@dataclass
class QM9:
    """The prepared arrays (see the module docstring) and the manifest."""

    arrays: dict[str, np.ndarray]
    manifest: dict

    @property
    def domain(self) -> MoleculeDomain:
        return MoleculeDomain.from_json(self.manifest["domain"])

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.arrays["split"] == SPLITS.index(split))

    def prop(self, name: str) -> np.ndarray:
        names = list(self.arrays["property_names"])
        return self.arrays["properties"][:, names.index(name)]


def load(data_dir: str | Path) -> QM9:
    """Load ``qm9.npz`` and verify its split against the manifest's checksum."""
    d = Path(data_dir)
    manifest = json.loads((d / "manifest.json").read_text())
    with np.load(d / manifest.get("file", "qm9.npz"), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    got = split_checksum(arrays["index"], arrays["split"])
    if got != manifest["split_sha256"]:
        raise ValueError(
            f"{d}: split checksum {got} does not match the manifest's {manifest['split_sha256']}"
        )
    return QM9(arrays, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare", help="featurise QM9 from qm9pack, split, write qm9.npz + manifest.json"
    )
    p.add_argument("--out", type=Path, default=Path("data/qm9"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="first N molecules only (pilots, tests)")
    args = parser.parse_args(argv)
    manifest = prepare(args.out, args.seed, args.limit)
    print(json.dumps({k: manifest[k] for k in ("counts", "split_sha256", "domain")}, indent=2))


if __name__ == "__main__":
    main()
