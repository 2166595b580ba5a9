"""Molecular similarity search over a library file, whatever the atom numbering.

Reads a library of molecules (a ``.smi`` file: ``SMILES name`` per line), embeds it with
Quotient's molecule model (``qm9-vae``), stores the vectors in a FAISS index in a folder
(``quotient_client.stores``) and searches it with molecules written in another atom order
(``OCC`` for ethanol, ``OC(=O)CN`` for glycine): an invariant embedding does not depend on the
numbering, so each query finds its molecule at rank 1.

Run it against a running server (``make serve`` in another terminal) with the client's FAISS
extra installed (``pip install './clients/python[faiss]'``)::

    python examples/molecule_search.py                                  # the shipped library
    python examples/molecule_search.py --index library.index -k 3       # keep the index folder
    python examples/molecule_search.py --library my.smi --query "C(C)O" --query "c1ccccc1O"

``--target HOST:PORT`` (default ``$QUOTIENT_TARGET``, else ``127.0.0.1:50051``) names the
server; an API key is taken from ``$QUOTIENT_API_KEY``. Without ``--query`` it runs the built-in
renumbered queries and exits with status 1 if one of them misses its molecule at rank 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from quotient_client import Client, InvalidInputError, SpecMismatchError
from quotient_client.stores import open_store

LIBRARY = Path(__file__).resolve().parent / "data" / "library.smi"

# Molecules of the shipped library written in another atom order than there, and the name of the
# library entry each one is.
QUERIES = [
    ("OCC", "ethanol"),  # CCO
    ("OC(=O)CN", "glycine"),  # NCC(=O)O
    ("N1CCOCC1", "morpholine"),  # C1COCCN1
    ("c1cc(O)ccc1", "phenol"),  # Oc1ccccc1
    ("O=CC(O)C(O)CO", "erythrose"),  # OCC(O)C(O)C=O
    ("OC(=O)C(N)CC(C)C", "leucine"),  # CC(C)CC(N)C(=O)O
    ("C(F)(F)(F)CO", "2,2,2-trifluoroethanol"),  # OCC(F)(F)F
    ("n1cccc(C(N)=O)c1", "nicotinamide"),  # NC(=O)c1cccnc1
]

# What Hit.score is under each metric (the metric is the model's: GetModel names it per projection).
SCORES = {
    "l2": "Euclidean distance",
    "cosine": "cosine similarity",
    "inner_product": "inner product",
}


@dataclass(frozen=True)
class Entry:
    """One molecule of the library: its ``name`` (the id in the index), ``smiles`` and ``line``."""

    name: str
    smiles: str
    line: int


def read_library(path: Path) -> list[Entry]:
    """The molecules of a ``.smi`` file: ``SMILES [name]`` per line (``#`` starts a comment);
    a molecule without a name is named ``FILE:LINE``. A repeated name is an error."""
    entries: list[Entry] = []
    lines: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        smiles, *rest = text.split(None, 1)
        name = rest[0].strip() if rest else f"{path.name}:{number}"
        if name in lines:
            raise ValueError(
                f"{path}:{number}: name {name!r} is already used on line {lines[name]}"
            )
        lines[name] = number
        entries.append(Entry(name, smiles, number))
    if not entries:
        raise ValueError(f"{path}: no molecules")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("QUOTIENT_TARGET", "127.0.0.1:50051"),
        help="the Quotient server, HOST:PORT (default: $QUOTIENT_TARGET or 127.0.0.1:50051)",
    )
    parser.add_argument("--library", type=Path, default=LIBRARY, help="a .smi file (SMILES name)")
    parser.add_argument("--index", type=Path, help="the index folder (default: a temporary one)")
    parser.add_argument("--query", action="append", help="a SMILES to search (repeatable)")
    parser.add_argument("-k", type=int, default=5, help="hits per query (default 5)")
    parser.add_argument(
        "--model",
        default="qm9-vae",
        help="the molecule model (default qm9-vae; druglike-vae for drugs)",
    )
    args = parser.parse_args(argv)

    try:
        library = read_library(args.library)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    queries = [(q, None) for q in args.query] if args.query else list(QUERIES)

    with tempfile.TemporaryDirectory() as scratch, Client(args.target) as client:
        folder = args.index or Path(scratch) / "library.index"
        try:
            embedded = client.embed(
                [e.smiles for e in library], modality="molecule", model=args.model
            )
        except InvalidInputError as e:  # name the line of the library, not the list index
            bad = library[e.index] if e.index is not None else None
            where = f"{args.library}:{bad.line} ({bad.name})" if bad else str(args.library)
            print(f"error: {where}: {e.message}", file=sys.stderr)
            return 2

        try:
            with open_store(folder) as store:  # a directory: the FAISS store
                store.upsert(
                    [e.name for e in library],
                    embedded,
                    [{"smiles": e.smiles, "line": e.line} for e in library],
                )
        except SpecMismatchError as e:  # a folder built by another model version
            print(f"error: {e}; remove {folder} or give another --index", file=sys.stderr)
            return 2
        print(f"indexed {len(library)} molecules of {args.library} into {folder}")
        print(f"  {embedded.spec.label()}")

        # Reopened from disk, as a later run would: the store remembers what made its vectors.
        with open_store(folder) as store:
            found = client.embed(
                [q for q, _ in queries], modality="molecule", model=embedded.spec.model
            )
            results = store.search(found, k=args.k)
            order = "larger" if store.higher_is_better else "smaller"
            score = SCORES[embedded.spec.metric]
            print(f"reopened: {len(store)} vectors; score = {score} ({order} is nearer)")

    at_rank_1 = 0
    for (smiles, expected), hits in zip(queries, results, strict=True):
        print(f"\nquery {smiles}" + (f" (written differently: {expected})" if expected else ""))
        for rank, hit in enumerate(hits, start=1):
            meta = hit.metadata or {}
            print(f"  {rank:2d}. {hit.id:<26} {hit.score:9.4f}  {meta.get('smiles', '')}")
        if expected is not None:
            top = hits[0].id if hits else None
            at_rank_1 += top == expected
            print(f"  -> {expected} at rank 1: {'yes' if top == expected else 'NO'}")
    if args.query:
        return 0
    print(f"\nrenumbered queries that found their molecule at rank 1: {at_rank_1}/{len(queries)}")
    return 0 if at_rank_1 == len(queries) else 1


if __name__ == "__main__":
    sys.exit(main())
