"""How the FAISS store's HNSW parameters trade recall for time, on the served embeddings.

    .venv/bin/python bench/faiss_hnsw.py [--molecules 30000]

Starts the service in-process (the committed models), embeds the 10,000 MNIST digits
(rotmnist-c8) and the first ``--molecules`` QM9 molecules (qm9-vae), each with its default
projection; holds 500 random items out as queries and indexes the rest in a FAISS store forced
to HNSW (``exact_below=0``), for ``hnsw_m`` 16 and 32 and ``ef_search`` 16 to 256. recall@10
counts a hit as right when its exact distance is within the query's exact 10th (so ties between
identical vectors are not misses). Prints one line per setting; the store's defaults (M=32,
efConstruction=200, ef_search=128) were chosen from this table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the in-process server the tests use


def served_embeddings(molecules: int) -> dict[str, object]:
    from conftest import LoopThread, ServiceHandle

    from quotient_client import Client

    loop = LoopThread()
    service = ServiceHandle(loop, model_store=str(ROOT / "model_store" / "models"))
    try:
        with Client(service.target, timeout=600) as client:
            digits = np.load(ROOT / "data" / "mnist" / "mnist10k.npz")["images"]
            smiles = np.load(ROOT / "data" / "qm9" / "qm9.npz")["smiles"][:molecules]
            return {
                "mnist": client.embed(list(digits), model="rotmnist-c8", progress=False),
                "qm9": client.embed([str(s) for s in smiles], model="qm9-vae", progress=False),
            }
    finally:
        service.stop()
        loop.close()


def exact_distances(base: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """[queries, base] distances (smaller nearer) in float64."""
    xb, xq = base.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        xb /= np.linalg.norm(xb, axis=1, keepdims=True)
        xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    if metric == "l2":
        squared = (xq**2).sum(1)[:, None] + (xb**2).sum(1)[None] - 2 * xq @ xb.T
        return np.sqrt(np.maximum(squared, 0))
    return -(xq @ xb.T)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecules", type=int, default=30000, help="QM9 molecules to embed")
    args = parser.parse_args()
    from quotient_client.stores import open_store

    for name, embeddings in served_embeddings(args.molecules).items():
        spec = embeddings.spec  # type: ignore[attr-defined]
        order = np.random.default_rng(0).permutation(len(embeddings))  # type: ignore[arg-type]
        queries, base = embeddings[order[:500]], embeddings[order[500:]]  # type: ignore[index]
        ids = [str(i) for i in order[500:]]
        distances = exact_distances(base.vectors, queries.vectors, spec.metric)
        tenth = np.sort(distances, axis=1)[:, 9]
        column = {item: j for j, item in enumerate(ids)}
        for m in (16, 32):
            with tempfile.TemporaryDirectory() as folder:
                started = time.perf_counter()
                with open_store(folder, spec=spec, exact_below=0, hnsw_m=m) as store:
                    for s in range(0, len(ids), 5000):
                        store.upsert(ids[s : s + 5000], base[s : s + 5000])
                    build = time.perf_counter() - started
                    for ef in (16, 32, 64, 128, 256):
                        store.ef_search = ef  # type: ignore[attr-defined]
                        started = time.perf_counter()
                        hits = store.search(queries, k=10)
                        per_query = (time.perf_counter() - started) / len(queries)
                        right = [
                            sum(distances[r, column[h.id]] <= tenth[r] + 1e-6 for h in row) / 10
                            for r, row in enumerate(hits)
                        ]
                        print(
                            f"{name} ({spec.label()}) n={len(ids)} M={m} build {build:.1f} s, "
                            f"ef_search={ef}: recall@10 {np.mean(right):.4f} (worst query "
                            f"{min(right):.1f}), {per_query * 1e3:.3f} ms/query in a batch of 500",
                            flush=True,
                        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
