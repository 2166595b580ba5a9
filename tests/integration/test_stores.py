"""The vector stores (``quotient_client.stores``) on their real backends: FAISS in-process, and a
PostgreSQL 18 + pgvector server and a Milvus 2.3 standalone server started on loopback for the
session (tests/servers.py). One suite over the three: the spec is recorded and enforced, upsert
replaces, delete removes, metadata round-trips, a store reopens as it was, each metric orders
neighbours as numpy's brute force does, and bad input is refused naming the item. Then FAISS's
exact → HNSW switch and its directory's crash and lock handling."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quotient_client import Embeddings, EmbeddingSpec, SpecMismatchError
from quotient_client.stores import VectorStore, open_store, with_collection

BACKENDS = ["faiss", "pgvector", "milvus"]
METRICS = ["cosine", "l2", "inner_product"]


def make_spec(metric: str = "l2", dimension: int = 24, **changes: Any) -> EmbeddingSpec:
    return EmbeddingSpec(**{"model": "m", "version": "1.0.0", "projection": "p",
                            "dimension": dimension, "metric": metric, **changes})  # fmt: skip


def clustered(n: int, d: int, seed: int) -> np.ndarray:
    """float32 [n, d]: eight clusters, not unit length (so the metrics disagree)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (8, d))
    return (centres[rng.integers(0, 8, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def brute_force(data: np.ndarray, queries: np.ndarray, metric: str, k: int) -> tuple[Any, Any]:
    """Exact top ``k`` in float64 → (rows [q, k], scores [q, k]) in the stores' convention."""
    x, q = data.astype(np.float64), queries.astype(np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        scores = np.sqrt(((q[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        order = np.argsort(scores, axis=1)[:, :k]
    else:
        scores = q @ x.T
        order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


class Opener:
    """Opens stores of one backend at fresh locations: a directory, a table named in the DSN's
    fragment, a collection named in the ``milvus://`` path. pgvector and Milvus search with
    ``ef_search`` above these tests' store sizes, so their HNSW answers are the exact ones."""

    def __init__(self, backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.backend, self.tmp_path = backend, tmp_path
        self.base = str(tmp_path)
        if backend == "pgvector":
            self.base = request.getfixturevalue("postgres_dsn")
        elif backend == "milvus":
            self.base = request.getfixturevalue("milvus_uri").replace("http://", "milvus://")
        self.opened: list[VectorStore] = []

    def new(self) -> str:
        return with_collection(self.base, f"t_{uuid.uuid4().hex[:12]}")

    def open(self, location: str, **options: Any) -> VectorStore:
        if self.backend != "faiss":
            options.setdefault("ef_search", 400)
        store = open_store(location, **options)
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=BACKENDS)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    o = Opener(request.param, request, tmp_path)
    yield o
    o.close_all()


# ---------------------------------------------------------------- the three backends


@pytest.mark.parametrize("metric", METRICS)
def test_each_metric_orders_neighbours_like_brute_force(opener: Opener, metric: str) -> None:
    spec = make_spec(metric)
    data = clustered(240, spec.dimension, seed=1)
    ids = [f"item-{i}" for i in range(len(data))]
    metadata = [{"i": i, "even": i % 2 == 0} if i % 3 else None for i in range(len(data))]
    store = opener.open(opener.new(), spec=spec)
    store.upsert(ids[:100], Embeddings(data[:100], spec), metadata[:100])  # two calls, one index
    store.upsert(ids[100:], Embeddings(data[100:], spec), metadata[100:])
    assert len(store) == 240 and store.higher_is_better == (metric != "l2")
    rng = np.random.default_rng(2)
    near = data[[3, 150]] + rng.normal(0, 0.3, (2, spec.dimension))
    queries = np.concatenate([near, rng.normal(0, 3, (3, spec.dimension))]).astype(np.float32)

    hits = store.search(Embeddings(queries, spec), k=10)

    rows, scores = brute_force(data, queries, metric, 10)
    assert [[h.id for h in row] for row in hits] == [[ids[r] for r in row] for row in rows]
    got = np.array([[h.score for h in row] for row in hits])
    np.testing.assert_allclose(got, scores, rtol=2e-4, atol=2e-4)
    assert [[h.metadata for h in row] for row in hits] == [
        [metadata[r] for r in row] for row in rows
    ]
    records = store.get([ids[0], ids[239]])
    expected = data[[0, 239]]
    if metric == "cosine":  # stored (and handed back) at unit length
        expected = expected / np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(
        np.stack([r.vector for r in records]), expected, rtol=1e-5, atol=1e-6
    )


def test_spec_is_recorded_and_enforced(opener: Opener) -> None:
    spec = make_spec("cosine", dimension=8)
    vectors = clustered(3, 8, seed=3)
    location = opener.new()
    store = opener.open(location)  # unbound: the first upsert records the spec
    assert store.spec is None and len(store) == 0
    assert store.search(Embeddings(vectors[:1], spec)) == [[]]
    store.upsert(["a", "b"], Embeddings(vectors[:2], spec))
    assert store.spec == spec

    for change, shown in [({"version": "1.1.0"}, "m 1.1.0"), ({"projection": "q"}, "m 1.0.0 / q "),
                          ({"model": "other"}, "other 1.0.0")]:  # fmt: skip
        other = dataclasses.replace(spec, **change)
        with pytest.raises(
            SpecMismatchError, match=f"the vectors come from {shown}.*holds m 1.0.0"
        ):
            store.upsert(["c"], Embeddings(vectors[2:], other))
        with pytest.raises(SpecMismatchError, match=f"the queries come from {shown}"):
            store.search(Embeddings(vectors[:1], other))
    wider = dataclasses.replace(spec, dimension=9)
    with pytest.raises(SpecMismatchError, match="9-d"):
        store.search(np.ones((1, 9), np.float32), spec=wider)
    with pytest.raises(TypeError, match="spec="):
        store.upsert(["c"], vectors[2:])  # a bare array says nothing of its model
    store.upsert(["c"], vectors[2:], spec=spec)
    assert len(store) == 3  # nothing of the refused calls was written
    store.close()

    reopened = opener.open(location)
    assert reopened.spec == spec and len(reopened) == 3
    reopened.close()
    with pytest.raises(SpecMismatchError, match=r"1\.2\.0"):
        opener.open(location, spec=dataclasses.replace(spec, version="1.2.0"))


def test_upsert_replaces_delete_removes_and_the_store_reopens_as_it_was(opener: Opener) -> None:
    spec = make_spec("l2", dimension=8)
    a, b, c, b2 = np.eye(8, dtype=np.float32)[[0, 1, 2, 3]] * np.float32([[1], [2], [3], [4]])
    location = opener.new()
    store = opener.open(location, spec=spec)
    deep = {"kind": "y", "nested": {"list": [1, 2.5, "z", None]}, "name": '名前 "q"', "ok": True}
    store.upsert(["a", "b", "c"], np.stack([a, b, c]), [{"kind": "x", "n": 1}, None, deep],
                 spec=spec)  # fmt: skip
    store.upsert(["b"], b2[None], [{"kind": "x", "n": 2}], spec=spec)  # replaces b
    assert len(store) == 3
    (record,) = store.get(["b"])
    assert record is not None and record.metadata == {"kind": "x", "n": 2}
    np.testing.assert_array_equal(record.vector, b2)
    top = store.search(b[None], k=3, spec=spec)[0]  # b's old vector: b now lies 4.47 away
    assert [h.id for h in top] == ["a", "c", "b"]
    np.testing.assert_allclose([h.score for h in top], [np.sqrt(5), np.sqrt(13), np.sqrt(20)], 1e-5)
    assert store.get(["c"])[0].metadata == deep  # type: ignore[union-attr]

    xs = store.search(a[None], k=10, spec=spec, where={"kind": "x"})[0]
    assert {h.id for h in xs} == {"a", "b"}
    assert [h.id for h in store.search(a[None], spec=spec, where={"kind": "x", "n": 2})[0]] == ["b"]
    assert [h.id for h in store.search(a[None], spec=spec, where={"ok": True})[0]] == ["c"]
    assert store.search(a[None], spec=spec, where={"n": True})[0] == []  # true is not 1
    assert store.search(a[None], spec=spec, where={"kind": "none"})[0] == []

    assert store.delete(["a", "absent", "a"]) == 1
    assert len(store) == 2 and store.get(["a", "b"])[0] is None
    assert [h.id for h in store.search(a[None], k=10, spec=spec)[0]] == ["c", "b"]
    before = store.search(c[None], k=5, spec=spec)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.search(c[None], spec=spec)

    again = opener.open(location)
    assert len(again) == 2 and again.spec == spec
    assert again.search(c[None], k=5, spec=spec) == before
    (record,) = again.get(["b"])
    assert record is not None and record.metadata == {"kind": "x", "n": 2}
    np.testing.assert_array_equal(record.vector, b2)


def test_bad_input_is_refused_naming_the_item(opener: Opener) -> None:
    spec = make_spec("cosine", dimension=4)
    store = opener.open(opener.new(), spec=spec)
    good = np.ones((2, 4), np.float32)
    nan = good.copy()
    nan[1, 2] = np.nan
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: store.upsert(["a", "a"], good, spec=spec), ValueError, "'a' appears twice"),
        (lambda: store.upsert(["a", ""], good, spec=spec), ValueError, "index 1 is empty"),
        (lambda: store.upsert("ab", good, spec=spec), TypeError, "not one string"),
        (lambda: store.upsert([7, "b"], good, spec=spec), TypeError, "index 0 is int"),
        (lambda: store.upsert(["x" * 4097, "b"], good, spec=spec), ValueError, "over 4096"),
        (lambda: store.upsert(["a", "b", "c"], good, spec=spec), ValueError, "3 ids but 2 rows"),
        (lambda: store.upsert(["a", "b"], nan, spec=spec), ValueError, "'b' has NaN"),
        (lambda: store.upsert(["a", "z"], np.float32([[1, 0, 0, 0], [0, 0, 0, 0]]), spec=spec),
         ValueError, "'z' is zero"),
        (lambda: store.upsert(["a", "b"], np.ones((2, 5)), spec=spec), ValueError, r"\[n, 4\]"),
        (lambda: store.upsert(["a", "b"], good, [{}], spec=spec), ValueError, "2 ids but 1 meta"),
        (lambda: store.upsert(["a", "b"], good, [None, {"f": object()}], spec=spec), ValueError,
         "metadata of id 'b' is not JSON"),
        (lambda: store.upsert(["a", "b"], good, [{"v": float("inf")}, None], spec=spec), ValueError,
         "metadata of id 'a'"),
        (lambda: store.upsert(["a", "b"], good, {"a": 1}, spec=spec), TypeError, "one dict"),
        (lambda: store.search(good, k=0, spec=spec), ValueError, "k must be"),
        (lambda: store.search(nan, spec=spec), ValueError, "query 1 has NaN"),
        (lambda: store.search(good, spec=spec, where={"a-b": 1}), ValueError, "identifier"),
        (lambda: store.search(good, spec=spec, where={"a": [1]}), ValueError, r"where\['a'\]"),
        (lambda: store.search(good.astype(str), spec=spec), TypeError, "float array"),
    ]  # fmt: skip
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()
    assert len(store) == 0  # no refused call wrote anything


# ---------------------------------------------------------------- FAISS


def test_faiss_is_exact_below_the_threshold_and_hnsw_above(tmp_path: Path) -> None:
    spec = make_spec("l2", dimension=16)
    data = clustered(400, 16, seed=4)
    ids = [f"v{i}" for i in range(400)]
    queries = data[::20] + np.float32(0.1)
    location = tmp_path / "store"
    with open_store(location, spec=spec, exact_below=300) as store:
        store.upsert(ids[:250], Embeddings(data[:250], spec))
        assert store.index_kind == "exact"  # type: ignore[attr-defined]
        exact_rows, _ = brute_force(data[:250], queries, "l2", 10)
        assert [[h.id for h in r] for r in store.search(queries, spec=spec)] == [
            [ids[i] for i in row] for row in exact_rows
        ]
        store.upsert(ids[250:], Embeddings(data[250:], spec))  # crosses 300: HNSW
        assert store.index_kind == "hnsw"  # type: ignore[attr-defined]
        found = store.search(queries, spec=spec)
    exact_rows, _ = brute_force(data, queries, "l2", 10)
    recall = np.mean([len({h.id for h in f} & {ids[i] for i in t}) / 10
                      for f, t in zip(found, exact_rows, strict=True)])  # fmt: skip
    assert recall >= 0.95
    assert sorted(p.name for p in location.iterdir() if p.suffix in (".f32", ".faiss")) == [
        "index-1.faiss", "vectors-1.f32"
    ]  # fmt: skip

    with open_store(location, exact_below=300) as store:  # the saved graph, not a rebuild
        assert store.index_kind == "hnsw" and len(store) == 400  # type: ignore[attr-defined]
        assert store.search(queries, spec=spec) == found
        assert store.delete(ids[:300]) == 300  # 100 left: under half the threshold
        assert store.index_kind == "exact"  # type: ignore[attr-defined]
        exact_rows, _ = brute_force(data[300:], queries, "l2", 10)
        assert [[h.id for h in r] for r in store.search(queries, spec=spec)] == [
            [ids[300 + i] for i in row] for row in exact_rows
        ]


def test_faiss_survives_an_interrupted_write_and_refuses_a_second_opener(tmp_path: Path) -> None:
    spec = make_spec("inner_product", dimension=4)
    location = tmp_path / "store"
    with open_store(location, spec=spec) as store:
        store.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2], spec=spec)
        with pytest.raises(RuntimeError, match="open in another process"):
            open_store(location)
    (vectors,) = location.glob("vectors-*.f32")
    with vectors.open("ab") as f:  # rows written, then a crash before their commit
        f.write(np.ones((3, 4), np.float32).tobytes())
    with open_store(location) as store:
        assert len(store) == 2 and vectors.stat().st_size == 2 * 4 * 4
        assert [h.id for h in store.search(np.float32([[0, 1, 0, 0]]), spec=spec)[0]] == ["b", "a"]

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a Quotient FAISS store"):
        open_store(foreign)


# ---------------------------------------------------------------- locations and extras


def test_open_store_reads_the_backend_and_collection_from_the_location(tmp_path: Path) -> None:
    assert with_collection("milvus://h:19530", "c") == "milvus://h:19530/c"
    assert with_collection("milvus://h:19530/old", "c") == "milvus://h:19530/c"
    assert with_collection("postgresql://u@h/db", "c") == "postgresql://u@h/db#c"
    assert with_collection("https://h:443/db", "c") == "https://h:443/db#c"
    assert with_collection(str(tmp_path), "c") == str(tmp_path / "c")
    with pytest.raises(ValueError, match="unknown store location 'qdrant://h'"):
        open_store("qdrant://h")
    with pytest.raises(ValueError, match="name the collection once"):
        open_store("milvus://h:19530/a#b")
    with pytest.raises(ValueError, match="named twice"):
        open_store("postgresql://u@h/db#a", collection="b")
    with pytest.raises(ValueError, match="must be a table name"):
        open_store("postgresql://u@h/db#drop table")
    with pytest.raises(ValueError, match="no collection="):
        open_store(tmp_path, collection="x")


@pytest.mark.parametrize(
    ("module", "location", "extra"),
    [
        ("faiss", "DIR", "faiss"),
        ("psycopg", "postgresql://u@h/db", "pgvector"),
        ("pymilvus", "milvus://h:1", "milvus"),
    ],
)
def test_a_missing_backend_library_names_its_extra(
    module: str, location: str, extra: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: import raises
    with pytest.raises(ImportError, match=rf"pip install 'quotient-client\[{extra}\]'"):
        open_store(str(tmp_path) if location == "DIR" else location)


def test_milvus_is_reachable_on_loopback_only(milvus_uri: str) -> None:
    """Milvus binds every interface of its own network namespace; none of this host's."""
    port = int(milvus_uri.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    address = "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, contextlib.suppress(OSError):
        probe.connect(("192.0.2.1", 9))  # no packet sent: picks the outward interface
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this host has no non-loopback IPv4 address")
    for milvus_port in (19530, 9091):  # its proxy and health ports inside its namespace
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((address, milvus_port)) != 0, f"{address}:{milvus_port} is open"
