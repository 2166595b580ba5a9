"""The Milvus store: a collection on a Milvus server (standalone or cluster, same code by URI).

The collection has three fields: ``id`` (VARCHAR primary key, up to 4,096 bytes), ``vector``
(FLOAT_VECTOR of the spec's dimension) and ``metadata`` (JSON: ``{"m": <the metadata or
null>}``, since a JSON field cannot be null in Milvus 2.3). The ``EmbeddingSpec`` is the
collection's description (JSON). The vector field has an HNSW index under the spec's metric
(COSINE, L2 or IP); the collection is loaded when opened.

Consistency: the first search of a store object is Strong (it sees every write that returned
anywhere before it, and waits for Milvus's time tick, about 200 ms, to do so); later searches are
Session-consistent (they see every write made through this store object, without that wait) —
``consistency="Strong"`` makes every search Strong.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from quotient_client._embeddings import EmbeddingSpec
from quotient_client.stores._base import MAX_ID_BYTES, Record, Row, VectorStore, Where, _require

FORMAT = "quotient-milvus-collection"
FORMAT_VERSION = 1
TOKEN_ENV = "MILVUS_TOKEN"
DEFAULT_HNSW_M = 16
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_EF_SEARCH = 128
MAX_TOP_K = 16384  # Milvus's bound on limit (and on queries per search request)
_BATCH_BYTES = 16 << 20  # rows per insert/upsert request: well under the 64 MiB message limit
_IDS_PER_EXPR = 1000
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}\Z")
_METRIC = {"cosine": "COSINE", "l2": "L2", "inner_product": "IP"}


class MilvusStore(VectorStore):
    """Collection ``collection`` on the Milvus server at ``uri`` (pymilvus's form:
    ``http://host:19530``, ``https://...`` for TLS).

    ``token``: ``"user:password"`` or an API key (default: the ``MILVUS_TOKEN`` environment
    variable, else none); ``db_name``: the database (default: the server's default);
    ``hnsw_m``, ``ef_construction``: the HNSW index's build parameters; ``ef_search``:
    candidates per query (at least ``k``); ``timeout`` in seconds per call."""

    backend = "Milvus"

    def __init__(
        self,
        uri: str,
        spec: EmbeddingSpec | None = None,
        *,
        collection: str = "quotient",
        token: str | None = None,
        db_name: str = "",
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        timeout: float = 30.0,
        consistency: str = "Session",
    ) -> None:
        pymilvus = _require("pymilvus", "milvus")
        if consistency not in ("Session", "Strong"):
            raise ValueError(f"consistency must be 'Session' or 'Strong', got {consistency!r}")
        self.consistency = consistency
        self._searched = False  # the first search is Strong (see the module docstring)
        if not _NAME.match(collection):
            raise ValueError(
                f"collection {collection!r} must be a Milvus collection name "
                "([A-Za-z_][A-Za-z0-9_]*, at most 255 characters)"
            )
        super().__init__(f"{_redacted(uri)}/{collection}")
        self.collection = collection
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.timeout = timeout
        self._pymilvus = pymilvus
        self._client = pymilvus.MilvusClient(
            uri=uri,
            token=os.environ.get(TOKEN_ENV, "") if token is None else token,
            db_name=db_name,
            timeout=timeout,
        )
        try:
            self._open(spec)
            if self._spec is not None:
                self._client.load_collection(collection, timeout=timeout)
        except BaseException:
            self._client.close()
            raise

    # ------------------------------------------------------------------ backend
    def _read_spec(self) -> EmbeddingSpec | None:
        if not self._client.has_collection(self.collection, timeout=self.timeout):
            return None
        description = self._client.describe_collection(self.collection, timeout=self.timeout)
        try:
            raw = json.loads(description.get("description") or "")
            if raw["format"] != FORMAT or raw["format_version"] != FORMAT_VERSION:
                raise ValueError(raw["format"])
            return EmbeddingSpec.from_dict(raw["spec"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"Milvus collection {self.collection!r} exists but is not a Quotient store (its "
                "description holds no Quotient spec); choose another collection"
            ) from None

    def _create(self, spec: EmbeddingSpec) -> EmbeddingSpec:
        DataType = self._pymilvus.DataType
        description = {"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict()}
        schema = self._client.create_schema(
            auto_id=False, enable_dynamic_field=False, description=json.dumps(description)
        )
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=spec.dimension)
        schema.add_field("metadata", DataType.JSON)
        index = self._client.prepare_index_params()
        index.add_index(
            field_name="vector",
            index_type="HNSW",
            metric_type=_METRIC[spec.metric],
            params={"M": self.hnsw_m, "efConstruction": self.ef_construction},
        )
        try:
            self._client.create_collection(
                self.collection, schema=schema, index_params=index,
                consistency_level="Strong", timeout=self.timeout,
            )  # fmt: skip
        except self._pymilvus.MilvusException:
            stored = self._read_spec()  # created meanwhile by another client?
            if stored is None:
                raise
            self._spec = stored
            self._check(spec, "the vectors")
            return stored
        self._client.load_collection(self.collection, timeout=self.timeout)
        return spec

    def _upsert(
        self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any] | None]
    ) -> None:
        per_request = max(1, _BATCH_BYTES // (vectors.shape[1] * 4 + 512))
        for start in range(0, len(ids), per_request):
            rows = [
                {"id": i, "vector": v.tolist(), "metadata": {"m": m}}
                for i, v, m in zip(
                    ids[start : start + per_request],
                    vectors[start : start + per_request],
                    metadata[start : start + per_request],
                    strict=True,
                )
            ]
            self._client.upsert(self.collection, rows, timeout=self.timeout)

    def _delete(self, ids: list[str]) -> int:
        present = list(self._get(ids, fields=["id"]))
        for start in range(0, len(present), _IDS_PER_EXPR):
            expr = _ids_expr(present[start : start + _IDS_PER_EXPR])
            self._client.delete(self.collection, filter=expr, timeout=self.timeout)
        return len(present)

    def _search(self, queries: np.ndarray, k: int, where: Where | None) -> list[list[Row]]:
        assert self._spec is not None
        if k > MAX_TOP_K:
            k = min(k, self._count())  # asking for everything: at most all rows
            if k > MAX_TOP_K:
                raise ValueError(f"Milvus returns at most {MAX_TOP_K} hits a query, not {k}")
        if k == 0:
            return [[] for _ in queries]
        params = {
            "metric_type": _METRIC[self._spec.metric],
            "params": {"ef": max(self.ef_search, k)},
        }
        expr = "" if where is None else _where_expr(where)
        l2 = self._spec.metric == "l2"
        out: list[list[Row]] = []
        for start in range(0, len(queries), MAX_TOP_K):
            level = self.consistency if self._searched else "Strong"
            results = self._client.search(
                self.collection, data=queries[start : start + MAX_TOP_K].tolist(), filter=expr,
                limit=k, output_fields=["metadata"], search_params=params, timeout=self.timeout,
                consistency_level=level,
            )  # fmt: skip
            self._searched = True
            for hits in results:
                row: list[Row] = []
                for hit in hits:
                    distance = float(hit["distance"])
                    # Milvus's L2 is the squared distance; COSINE and IP are similarities.
                    score = float(np.sqrt(max(distance, 0.0))) if l2 else distance
                    row.append(
                        (str(hit["id"]), score, (hit["entity"].get("metadata") or {}).get("m"))
                    )
                out.append(row)
        return out

    def _get(self, ids: list[str], fields: list[str] | None = None) -> dict[str, Record]:
        fields = fields or ["id", "vector", "metadata"]
        out: dict[str, Record] = {}
        for start in range(0, len(ids), _IDS_PER_EXPR):
            rows = self._client.query(
                self.collection, filter=_ids_expr(ids[start : start + _IDS_PER_EXPR]),
                output_fields=fields, timeout=self.timeout,
            )  # fmt: skip
            for row in rows:
                vector = np.asarray(row.get("vector", ()), np.float32)
                out[row["id"]] = Record(row["id"], vector, (row.get("metadata") or {}).get("m"))
        return out

    def _count(self) -> int:
        rows = self._client.query(
            self.collection, filter="", output_fields=["count(*)"], timeout=self.timeout
        )
        return int(rows[0]["count(*)"])

    def _close(self) -> None:
        self._client.close()


def _literal(value: str | int | float | bool) -> str:
    """A Milvus expression literal: strings double-quoted with JSON escapes (which its parser
    reads as Go string escapes), booleans lower-case."""
    return json.dumps(value)


def _ids_expr(ids: list[str]) -> str:
    return f"id in [{', '.join(_literal(i) for i in ids)}]"


def _where_expr(where: Where) -> str:
    # keys are identifiers (checked by VectorStore); JSON paths of the wrapped metadata
    return " and ".join(f'metadata["m"]["{key}"] == {_literal(v)}' for key, v in where.items())


def _redacted(uri: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", uri)
