"""Drug-like molecules from MOSES (PyPI ``molsets``): featurised graphs and a seeded subset.

``python -m quotient_models.molecules.moses prepare --out data/moses`` reads the SMILES files
shipped inside molsets 0.3.1 (``moses/dataset/data/{train,test}.csv.gz``, located with
``importlib.util.find_spec`` without importing the package, whose imports need an old pandas and
more), featurises them for the drug-like domain (``DOMAIN``: at most 64 heavy atoms, C N O S P F Cl
Br I, formal charges -1/0/+1), keeps a graph only if it decodes back to the same canonical SMILES,
and writes

- ``moses.npz``: in the layout of ``quotient_models.molecules.data`` (index, smiles, split 0 train /
  1 val / 2 test, graph arrays padded to the largest molecule) for a seeded sample of
  ``--train`` molecules of MOSES train, ``--val`` other molecules of MOSES train for validation,
  and every molecule of MOSES test;
- ``manifest.json``: sources with sha256, counts (read, dropped by reason, per split), seed,
  the domain and the split checksum that ``data.load`` verifies.

MOSES is ZINC "clean leads" (at most 26 heavy atoms, no charges, no P or I); the domain is wider
than the training data on purpose: such molecules are accepted and embedded, and the model card
says how well they reconstruct.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import time
from pathlib import Path

import numpy as np

from quotient_models.molecules.data import (
    SPLITS,
    _sha256,
    featurise_checked,
    graph_arrays,
    split_checksum,
)
from quotient_models.molecules.featurize import MoleculeDomain

__all__ = ["DOMAIN", "molsets_dir", "prepare", "read_smiles"]

DOMAIN = MoleculeDomain(
    max_atoms=64,
    elements=("C", "N", "O", "S", "P", "F", "Cl", "Br", "I"),
    charges=(-1, 0, 1),
    max_hydrogens=4,
)
FILES = {"train": "train.csv.gz", "test": "test.csv.gz"}
SOURCE = "molsets==0.3.1"


def molsets_dir() -> Path:
    spec = importlib.util.find_spec("moses")  # does not import the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "molsets is not installed: make install-druglike (pip install --no-deps molsets==0.3.1)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "dataset" / "data"


def read_smiles(name: str) -> list[str]:
    """The SMILES of one MOSES file ("train" or "test"), in file order."""
    with gzip.open(molsets_dir() / FILES[name], "rt") as f:
        lines = f.read().splitlines()
    if not lines or lines[0].strip() != "SMILES":
        raise ValueError(f"{FILES[name]}: expected a SMILES header, got {lines[:1]}")
    return [ln.strip() for ln in lines[1:] if ln.strip()]


def prepare(
    out: Path, n_train: int, n_val: int, seed: int = 0, test_limit: int | None = None
) -> dict:
    """Featurise, check and write ``moses.npz`` and ``manifest.json``; returns the manifest."""
    from rdkit import __version__ as rdkit_version

    source = molsets_dir()
    train_all = read_smiles("train")
    test_all = read_smiles("test")[:test_limit]
    rng = np.random.default_rng(seed)
    # a seeded sample of MOSES train, in sampled order; validation from the rest of train
    picked = rng.permutation(len(train_all))[: n_train + n_val]
    parts = [
        ("train", picked[:n_train]),
        ("val", picked[n_train:]),
        ("test", np.arange(len(test_all))),
    ]
    index, split, smiles, source_smiles, graphs = [], [], [], [], []
    counts: dict = {"read": {"train": len(train_all), "test": len(test_all)}, "dropped": {}}
    for name, rows in parts:
        texts = [(test_all if name == "test" else train_all)[int(r)] for r in rows]
        keep, got, dropped = featurise_checked(texts, DOMAIN, desc=f"featurise {name}")
        counts["dropped"][name] = dict(sorted(dropped.items()))
        index += [int(rows[k]) for k in keep]
        split += [SPLITS.index(name)] * len(keep)
        source_smiles += [texts[k] for k in keep]
        smiles += [g.smiles for g in got]
        graphs += got
    index_a = np.array(index, np.int64)
    # the index is unique per split file: test rows are offset past the train file's
    index_a = np.where(np.array(split) == 2, index_a + len(train_all), index_a)
    split_a = np.array(split, np.int8)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out / "moses.npz",
        index=index_a,
        smiles=np.array(smiles),
        split=split_a,
        source_smiles=np.array(source_smiles),
        properties=np.zeros((len(graphs), 0)),
        property_names=np.array([], dtype=str),
        **graph_arrays(graphs),
    )
    counts.update({s: int((split_a == k).sum()) for k, s in enumerate(SPLITS)})
    manifest = {
        "dataset": "MOSES",
        "file": "moses.npz",
        "created_unix": int(time.time()),
        "sources": [
            {
                "package": SOURCE,
                "file": f"moses/dataset/data/{f}",
                "sha256": _sha256(source / f),
                "bytes": (source / f).stat().st_size,
            }
            for f in FILES.values()
        ],
        "licences": {
            "molsets": "MIT (the package's METADATA)",
            "MOSES": "D. Polykovskiy et al., Molecular Sets (MOSES): A Benchmarking Platform for "
            "Molecular Generation Models, Front. Pharmacol. 11, 565644 (2020); from ZINC15 "
            "clean leads.",
        },
        "featurisation": {
            "rdkit": rdkit_version,
            "graph": "heavy atoms; aromatic bonds; symmetry slots",
        },
        "counts": counts,
        "split": {
            "seed": seed,
            "train": n_train,
            "val": n_val,
            "test_limit": test_limit,
            "method": "numpy default_rng(seed).permutation of MOSES train's rows: the first "
            "--train are train, the next --val are val; MOSES test is test (index = its row + "
            "the rows of MOSES train)",
        },
        "split_sha256": split_checksum(index_a, split_a),
        "domain": DOMAIN.to_json(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="featurise MOSES from molsets, write moses.npz + manifest")
    p.add_argument("--out", type=Path, default=Path("data/moses"))
    p.add_argument("--train", type=int, default=250_000, help="molecules sampled from MOSES train")
    p.add_argument("--val", type=int, default=5_000, help="further molecules of MOSES train")
    p.add_argument("--test-limit", type=int, default=None, help="first N of MOSES test (tests)")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = prepare(args.out, args.train, args.val, args.seed, args.test_limit)
    print(json.dumps({k: manifest[k] for k in ("counts", "split_sha256", "domain")}, indent=2))


if __name__ == "__main__":
    main()
