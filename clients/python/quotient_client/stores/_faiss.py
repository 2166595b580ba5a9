"""The FAISS store: a directory on disk, searched in-process.

Layout (``format_version`` 1):

- ``spec.json``: the store's ``EmbeddingSpec`` (written last when the store is created);
- ``records.sqlite``: ``records(id, row, metadata)`` and ``state`` (``generation``, ``rows``);
- ``vectors-G.f32``: float32 rows, appended, row ``r`` at byte ``r * dimension * 4``;
- ``index-G.faiss``: an HNSW graph over the first ``ntotal`` rows (HNSW mode only);
- ``lock``: held (``flock``) while a process has the store open.

Every write appends rows to the vector file (fsync) and then commits their ids in SQLite, so a
crash leaves either the old or the new state: rows past the committed count are cut off on
reopen. A replaced or deleted id leaves its old row behind as a tombstone, skipped by searches;
when tombstones pass a quarter of the rows, or the store crosses the exact/HNSW threshold, the
live rows are rewritten as generation G+1 and SQLite switches to it in one transaction.

Below ``exact_below`` live vectors the index is exact (``IndexFlatIP`` for "cosine" and
"inner_product", ``IndexFlatL2`` for "l2"); at or above it an ``IndexHNSWFlat`` (kept until the
store falls below half the threshold). The HNSW graph is saved on ``close()`` and after large
additions; rows added after the last save are inserted again on reopen.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from quotient_client._embeddings import EmbeddingSpec
from quotient_client.stores._base import Record, Row, VectorStore, Where, _require

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None  # type: ignore[assignment]

FORMAT = "quotient-faiss-store"
FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
DB_FILE = "records.sqlite"
LOCK_FILE = "lock"
DEFAULT_EXACT_BELOW = 20_000
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
_SQL_CHUNK = 500  # ids per IN (...) query


class FaissStore(VectorStore):
    """A FAISS index in directory ``path`` (see the module docstring for the layout).

    ``exact_below``: live vectors under which search is exact; ``hnsw_m``, ``ef_construction``:
    the HNSW graph's degree and build effort; ``ef_search``: candidates explored per query
    (at least ``k``); recall@10 on the served embeddings is measured in the README."""

    backend = "FAISS"

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: EmbeddingSpec | None = None,
        *,
        exact_below: int = DEFAULT_EXACT_BELOW,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
    ) -> None:
        self._faiss = _require("faiss", "faiss")
        super().__init__(os.fspath(path))
        for name, value, low in (("exact_below", exact_below, 0), ("hnsw_m", hnsw_m, 2),
                                 ("ef_construction", ef_construction, 1),
                                 ("ef_search", ef_search, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.path = Path(path)
        self.exact_below, self.hnsw_m = exact_below, hnsw_m
        self.ef_construction, self.ef_search = ef_construction, ef_search
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._index: Any = None
        self._row_ids: list[str | None] = []  # row → id, None for a tombstone
        self._rows: dict[str, int] = {}  # id → its live row
        self._dead: set[int] = set()
        self._generation = 0
        self._saved_rows = 0  # rows covered by the HNSW graph on disk
        self._stored: EmbeddingSpec | None = None
        try:
            if (self.path / SPEC_FILE).exists():
                self._load()
            elif self.path.exists():
                if not self.path.is_dir():
                    raise ValueError(f"{self.path} is a file, not a FAISS store directory")
                foreign = sorted(p.name for p in self.path.iterdir() if not _ours(p.name))
                if foreign:
                    raise ValueError(
                        f"{self.path} is not a Quotient FAISS store: it has no {SPEC_FILE} and "
                        f"holds other files ({', '.join(foreign[:3])}); give an empty or new "
                        "directory"
                    )
            self._open(spec)
        except BaseException:
            self._release()
            raise

    @property
    def index_kind(self) -> str:
        """The index searched: "exact" (flat) or "hnsw"; "exact" while unbound."""
        with self._lock:
            return "hnsw" if self._index is not None and self._is_hnsw() else "exact"

    # ------------------------------------------------------------------ backend
    def _read_spec(self) -> EmbeddingSpec | None:
        return self._stored

    def _create(self, spec: EmbeddingSpec) -> EmbeddingSpec:
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        for leftover in self.path.iterdir():  # of a create that was interrupted
            if _ours(leftover.name) and leftover.name != LOCK_FILE:
                leftover.unlink()
        db = self._connect()
        with db:
            db.execute("CREATE TABLE records (id TEXT PRIMARY KEY, row INTEGER NOT NULL, "
                       "metadata TEXT)")  # fmt: skip
            db.execute("CREATE TABLE state (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
            db.executemany("INSERT INTO state VALUES (?, ?)", [("generation", 0), ("rows", 0)])
        self._vector_file(0).write_bytes(b"")
        _write_atomic(
            self.path / SPEC_FILE,
            json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION,
                        "spec": spec.to_dict()}, indent=2).encode(),
        )  # fmt: skip
        self._stored = spec
        self._index = self._new_index(spec, hnsw=False)
        return spec

    def _upsert(
        self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any] | None]
    ) -> None:
        db = self._require_db()
        first = len(self._row_ids)
        path = self._vector_file(self._generation)
        with path.open("ab") as f:
            try:
                f.write(vectors.tobytes())
                f.flush()
                os.fsync(f.fileno())
                with db:
                    db.executemany(
                        "INSERT INTO records (id, row, metadata) VALUES (?, ?, ?) ON CONFLICT(id) "
                        "DO UPDATE SET row = excluded.row, metadata = excluded.metadata",
                        [
                            (i, first + n, _json(m))
                            for n, (i, m) in enumerate(zip(ids, metadata, strict=True))
                        ],
                    )
                    db.execute("UPDATE state SET value = ? WHERE key = 'rows'", (first + len(ids),))
            except BaseException:
                f.truncate(first * self._dimension() * 4)
                raise
        for n, ident in enumerate(ids):
            old = self._rows.get(ident)
            if old is not None:
                self._row_ids[old] = None
                self._dead.add(old)
            self._rows[ident] = first + n
            self._row_ids.append(ident)
        self._index.add(vectors)
        self._maintain()

    def _delete(self, ids: list[str]) -> int:
        present = [i for i in ids if i in self._rows]
        if not present:
            return 0
        db = self._require_db()
        with db:
            for chunk in _chunks(present):
                db.execute(f"DELETE FROM records WHERE id IN ({_marks(chunk)})", chunk)
        for ident in present:
            row = self._rows.pop(ident)
            self._row_ids[row] = None
            self._dead.add(row)
        self._maintain()
        return len(present)

    def _search(self, queries: np.ndarray, k: int, where: Where | None) -> list[list[Row]]:
        faiss = self._faiss
        selector: Any = None
        if where is not None:
            allowed = self._matching_rows(where)
            if len(allowed) == 0:
                return [[] for _ in queries]
            if len(allowed) < self.exact_below or not self._is_hnsw():
                scores, rows = self._exact_subset(queries, allowed, k)
                return self._hits(scores, rows)
            selector = faiss.IDSelectorBatch(allowed)
        elif self._dead:
            dead = faiss.IDSelectorBatch(np.fromiter(self._dead, np.int64, len(self._dead)))
            selector = faiss.IDSelectorNot(dead)  # `dead` stays referenced until we return
        count = len(self._rows)
        if count == 0:
            return [[] for _ in queries]
        kk = min(k, count)
        if self._is_hnsw():
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, kk)
        else:
            params = faiss.SearchParameters()
        if selector is not None:
            params.sel = selector
        scores, rows = self._index.search(queries, kk, params=params)
        return self._hits(scores, rows)

    def _get(self, ids: list[str]) -> dict[str, Record]:
        found = {i: self._rows[i] for i in ids if i in self._rows}
        if not found:
            return {}
        vectors = self._read_rows(np.fromiter(found.values(), np.int64, len(found)))
        metadata = self._metadata(list(found))
        return {
            ident: Record(ident, vectors[n].copy(), metadata.get(ident))
            for n, ident in enumerate(found)
        }

    def _count(self) -> int:
        return len(self._rows)

    def _close(self) -> None:
        try:
            if (
                self._index is not None
                and self._is_hnsw()
                and self._index.ntotal > self._saved_rows
            ):
                self._save_graph()
        finally:
            self._release()

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        self._index = None

    # ------------------------------------------------------------------ storage
    def _load(self) -> None:
        raw = json.loads((self.path / SPEC_FILE).read_text())
        if raw.get("format") != FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{self.path / SPEC_FILE} is not a {FORMAT} version {FORMAT_VERSION} file"
            )
        spec = EmbeddingSpec.from_dict(raw["spec"])
        self._take_lock()
        db = self._connect()
        state = dict(db.execute("SELECT key, value FROM state").fetchall())
        self._generation, n_rows = int(state["generation"]), int(state["rows"])
        path = self._vector_file(self._generation)
        expected = n_rows * spec.dimension * 4
        size = path.stat().st_size
        if size < expected:
            raise ValueError(f"{path} holds {size} bytes, fewer than its {n_rows} rows need")
        if size > expected:  # rows appended by a write that did not commit
            with path.open("r+b") as f:
                f.truncate(expected)
        self._row_ids = [None] * n_rows
        for ident, row in db.execute("SELECT id, row FROM records"):
            self._row_ids[row] = ident
            self._rows[ident] = row
        self._dead = {r for r, ident in enumerate(self._row_ids) if ident is None}
        self._stored = spec
        graph = self.path / f"index-{self._generation}.faiss"
        index = None
        if graph.exists():
            index = self._faiss.read_index(str(graph))
            if index.ntotal > n_rows or index.d != spec.dimension:
                index = None  # not this generation's graph: rebuild
            else:
                self._saved_rows = index.ntotal
        if index is None:
            live = len(self._rows)
            index = self._new_index(spec, hnsw=live >= self.exact_below)
            self._saved_rows = 0
        if index.ntotal < n_rows:
            index.add(self._read_rows(np.arange(index.ntotal, n_rows)))
        self._index = index
        for stale in self.path.iterdir():
            if stale.name.endswith(".tmp") or (
                stale.name.startswith(("vectors-", "index-"))
                and stale.name not in (path.name, graph.name)
            ):
                stale.unlink()
        self._maintain()

    def _maintain(self) -> None:
        """Rebuild when tombstones pass a quarter of the rows or the size crosses the threshold;
        save a large unsaved tail of the HNSW graph."""
        live, hnsw = len(self._rows), self._is_hnsw()
        want_hnsw = live >= self.exact_below or (hnsw and live >= self.exact_below // 2)
        if want_hnsw != hnsw or len(self._dead) * 4 > len(self._row_ids):
            self._rebuild(want_hnsw)
        elif hnsw and self._index.ntotal - self._saved_rows >= max(10_000, self._saved_rows // 5):
            self._save_graph()

    def _rebuild(self, hnsw: bool) -> None:
        """Write the live rows as the next generation (vectors, graph), then switch SQLite to it
        in one transaction and delete the old generation's files."""
        spec, db = self._require_spec(), self._require_db()
        order = sorted(self._rows.items(), key=lambda item: item[1])
        rows = np.fromiter((row for _, row in order), np.int64, len(order))
        vectors = self._read_rows(rows)
        old, new = self._generation, self._generation + 1
        _write_atomic(self._vector_file(new), vectors.tobytes())
        index = self._new_index(spec, hnsw)
        if len(vectors):
            index.add(vectors)
        graph = self.path / f"index-{new}.faiss"
        if hnsw:
            self._write_graph(index, graph)
        with db:
            db.executemany(
                "UPDATE records SET row = ? WHERE id = ?",
                [(n, i) for n, (i, _) in enumerate(order)],
            )
            db.execute("UPDATE state SET value = ? WHERE key = 'generation'", (new,))
            db.execute("UPDATE state SET value = ? WHERE key = 'rows'", (len(order),))
        for name in (f"vectors-{old}.f32", f"index-{old}.faiss"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        self._generation, self._index = new, index
        self._row_ids = [i for i, _ in order]
        self._rows = {i: n for n, i in enumerate(self._row_ids) if i is not None}
        self._dead = set()
        self._saved_rows = index.ntotal if hnsw else 0

    def _save_graph(self) -> None:
        self._write_graph(self._index, self.path / f"index-{self._generation}.faiss")
        self._saved_rows = self._index.ntotal

    def _write_graph(self, index: Any, path: Path) -> None:
        temp = path.with_name(path.name + ".tmp")
        self._faiss.write_index(index, str(temp))
        _fsync(temp)
        os.replace(temp, path)

    def _new_index(self, spec: EmbeddingSpec, hnsw: bool) -> Any:
        faiss = self._faiss
        metric = faiss.METRIC_L2 if spec.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if not hnsw:
            return faiss.IndexFlat(spec.dimension, metric)
        index = faiss.IndexHNSWFlat(spec.dimension, self.hnsw_m, metric)
        index.hnsw.efConstruction = self.ef_construction
        return index

    def _is_hnsw(self) -> bool:
        return isinstance(self._index, self._faiss.IndexHNSW)

    def _read_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), d] from this generation's vector file."""
        d = self._dimension()
        if len(rows) == 0:
            return np.zeros((0, d), np.float32)
        path = self._vector_file(self._generation)
        data = np.memmap(path, np.float32, "r", shape=(len(self._row_ids), d))
        return np.ascontiguousarray(data[rows])

    def _exact_subset(self, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[Any, Any]:
        """Exact search among ``rows`` only (a filter's matches)."""
        metric = self._require_spec().metric
        vectors = self._read_rows(rows)
        kk = min(k, len(rows))
        faiss_metric = self._faiss.METRIC_L2 if metric == "l2" else self._faiss.METRIC_INNER_PRODUCT
        scores, positions = self._faiss.knn(queries, vectors, kk, metric=faiss_metric)
        return scores, np.where(positions >= 0, rows[np.maximum(positions, 0)], -1)

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Row]]:
        l2 = self._require_spec().metric == "l2"
        found = {int(r) for r in rows.ravel() if r >= 0}
        ids = {r: self._row_ids[r] for r in found}
        metadata = self._metadata([i for i in ids.values() if i is not None])
        out: list[list[Row]] = []
        for score_row, id_row in zip(scores, rows, strict=True):
            hits: list[Row] = []
            for score, row in zip(score_row, id_row, strict=True):
                ident = ids.get(int(row)) if row >= 0 else None
                if ident is not None:
                    value = float(np.sqrt(max(float(score), 0.0))) if l2 else float(score)
                    hits.append((ident, value, metadata.get(ident)))
            out.append(hits)
        return out

    def _metadata(self, ids: list[str]) -> dict[str, dict[str, Any] | None]:
        db, out = self._require_db(), {}
        for chunk in _chunks(ids):
            query = f"SELECT id, metadata FROM records WHERE id IN ({_marks(chunk)})"
            for ident, text in db.execute(query, chunk):
                out[ident] = None if text is None else json.loads(text)
        return out

    def _matching_rows(self, where: Where) -> np.ndarray:
        clauses: list[str] = []
        args: list[str | int | float] = []
        for key, value in where.items():
            path = f'$."{key}"'  # keys are identifiers (checked by VectorStore)
            if isinstance(value, bool):
                clauses.append("json_type(metadata, ?) = ?")
                args += [path, "true" if value else "false"]
            elif isinstance(value, str):
                clauses.append(
                    "(json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?)"
                )
                args += [path, path, value]
            else:
                clauses.append(
                    "(json_type(metadata, ?) IN ('integer', 'real') "
                    "AND json_extract(metadata, ?) = ?)"
                )
                args += [path, path, value]
        query = "SELECT row FROM records WHERE metadata IS NOT NULL AND " + " AND ".join(clauses)
        rows = [r for (r,) in self._require_db().execute(query, args)]
        return np.array(sorted(rows), np.int64)

    # ------------------------------------------------------------------ helpers
    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path / DB_FILE, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.isolation_level = "DEFERRED"  # `with db:` is one transaction
        self._db = db
        return db

    def _take_lock(self) -> None:
        if self._lock_fd is not None or fcntl is None:
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"FAISS store {self.path} is open in another process (or another store object); "
                "close that one first"
            ) from None
        self._lock_fd = fd

    def _vector_file(self, generation: int) -> Path:
        return self.path / f"vectors-{generation}.f32"

    def _dimension(self) -> int:
        return self._require_spec().dimension

    def _require_spec(self) -> EmbeddingSpec:
        assert self._stored is not None
        return self._stored

    def _require_db(self) -> sqlite3.Connection:
        assert self._db is not None
        return self._db


def _ours(name: str) -> bool:
    return name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", LOCK_FILE, SPEC_FILE) or (
        name.startswith(("vectors-", "index-", SPEC_FILE))
    )


def _json(metadata: dict[str, Any] | None) -> str | None:
    return None if metadata is None else json.dumps(metadata, ensure_ascii=False)


def _chunks(items: list[str]) -> list[list[str]]:
    return [items[i : i + _SQL_CHUNK] for i in range(0, len(items), _SQL_CHUNK)]


def _marks(chunk: list[str]) -> str:
    return ", ".join("?" * len(chunk))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(path.name + ".tmp")
    with temp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
