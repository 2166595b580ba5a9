"""The PostgreSQL + pgvector store: a table per collection on a real server.

Tables (in the connection's schema):

- ``quotient_collections(name text PRIMARY KEY, spec jsonb, created_at timestamptz)``: one
  row per collection, its ``EmbeddingSpec``;
- the collection's own table: ``id text PRIMARY KEY, embedding vector(D), metadata jsonb``, with
  an HNSW index on ``embedding`` under the spec's operator class (``vector_cosine_ops``,
  ``vector_l2_ops``, ``vector_ip_ops``; pgvector indexes up to 2,000 dimensions, larger ones
  are searched exactly).

Upserts are ``INSERT ... ON CONFLICT (id) DO UPDATE``; a search sets ``hnsw.ef_search`` to at
least ``k`` and, with a metadata filter, ``hnsw.iterative_scan`` so that filtering does not
cut the results short.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from quotient_client._embeddings import EmbeddingSpec
from quotient_client.stores._base import Record, Row, VectorStore, Where, _require

SPEC_TABLE = "quotient_collections"
DEFAULT_HNSW_M = 16
DEFAULT_EF_CONSTRUCTION = 64
DEFAULT_EF_SEARCH = 100
MAX_INDEXED_DIMENSION = 2000  # pgvector's HNSW limit for the vector type
MAX_EF_SEARCH = 1000  # pgvector's bound on hnsw.ef_search
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}\Z")
# metric → (operator class, distance operator, distance → score)
_OPS = {
    "cosine": ("vector_cosine_ops", "<=>", lambda d: 1.0 - d),
    "l2": ("vector_l2_ops", "<->", lambda d: d),
    "inner_product": ("vector_ip_ops", "<#>", lambda d: -d),
}


class PgVectorStore(VectorStore):
    """Collection ``collection`` (a table of that name) in the PostgreSQL database at ``dsn``.

    ``hnsw_m``, ``ef_construction``: the HNSW index's build parameters (used when the table is
    created); ``ef_search``: candidates per query (at least ``k``, at most 1,000);
    ``connect_timeout`` in seconds."""

    backend = "pgvector"

    def __init__(
        self,
        dsn: str,
        spec: EmbeddingSpec | None = None,
        *,
        collection: str = "quotient",
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int = DEFAULT_EF_SEARCH,
        connect_timeout: float = 10.0,
    ) -> None:
        psycopg = _require("psycopg", "pgvector")
        pgvector_psycopg = _require("pgvector.psycopg", "pgvector")
        self._sql = _require("psycopg.sql", "pgvector")
        self._jsonb = _require("psycopg.types.json", "pgvector").Jsonb
        if not _IDENTIFIER.match(collection) or collection == SPEC_TABLE:
            raise ValueError(
                f"collection {collection!r} must be a table name ([A-Za-z_][A-Za-z0-9_]*, at most "
                f"63 characters, not {SPEC_TABLE})"
            )
        super().__init__(f"{_redacted(dsn)}#{collection}")
        self.collection = collection
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        # autocommit: each `with self._conn.transaction()` is one BEGIN ... COMMIT
        self._conn = psycopg.connect(
            dsn, autocommit=True, connect_timeout=max(1, int(connect_timeout))
        )
        try:
            with self._conn.transaction():
                exists = self._conn.execute(
                    "SELECT 1 FROM pg_extension WHERE extname = 'vector'"
                ).fetchone()
                if not exists:
                    self._conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            pgvector_psycopg.register_vector(self._conn)
            self._open(spec)
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------------ backend
    def _read_spec(self) -> EmbeddingSpec | None:
        with self._conn.transaction():
            if self._conn.execute("SELECT to_regclass(%s)", (SPEC_TABLE,)).fetchone()[0] is None:
                return None
            row = self._conn.execute(
                f"SELECT spec FROM {SPEC_TABLE} WHERE name = %s", (self.collection,)
            ).fetchone()
        return None if row is None else EmbeddingSpec.from_dict(row[0])

    def _create(self, spec: EmbeddingSpec) -> EmbeddingSpec:
        sql, table = self._sql, self._sql.Identifier(self.collection)
        opclass = _OPS[spec.metric][0]
        with self._conn.transaction():
            self._conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SPEC_TABLE} (name text PRIMARY KEY, spec jsonb NOT "
                "NULL, created_at timestamptz NOT NULL DEFAULT now())"
            )
            # Serialise creators of the same collection: the second one sees the first's spec.
            self._conn.execute(f"LOCK TABLE {SPEC_TABLE} IN SHARE ROW EXCLUSIVE MODE")
            row = self._conn.execute(
                f"SELECT spec FROM {SPEC_TABLE} WHERE name = %s", (self.collection,)
            ).fetchone()
            if row is not None:  # made meanwhile by another client: use (and check) its spec
                self._spec = EmbeddingSpec.from_dict(row[0])
                self._check(spec, "the vectors")
                return self._spec
            self._conn.execute(
                f"INSERT INTO {SPEC_TABLE} (name, spec) VALUES (%s, %s)",
                (self.collection, self._jsonb(spec.to_dict())),
            )
            self._conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id text PRIMARY KEY, embedding vector({}) NOT NULL, "
                    "metadata jsonb)"
                ).format(table, sql.Literal(spec.dimension))
            )
            if spec.dimension <= MAX_INDEXED_DIMENSION:
                self._conn.execute(
                    sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding {}) WITH (m = {}, "
                            "ef_construction = {})").format(
                        sql.Identifier(f"{self.collection}_hnsw"), table, sql.SQL(opclass),
                        sql.Literal(self.hnsw_m), sql.Literal(self.ef_construction),
                    )
                )  # fmt: skip
        return spec

    def _upsert(
        self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any] | None]
    ) -> None:
        query = self._sql.SQL(
            "INSERT INTO {} (id, embedding, metadata) VALUES (%s, %s, %s) ON CONFLICT (id) DO "
            "UPDATE SET embedding = EXCLUDED.embedding, metadata = EXCLUDED.metadata"
        ).format(self._sql.Identifier(self.collection))
        rows = [
            (i, v, None if m is None else self._jsonb(m))
            for i, v, m in zip(ids, vectors, metadata, strict=True)
        ]
        with self._conn.transaction(), self._conn.cursor() as cur:
            cur.executemany(query, rows)

    def _delete(self, ids: list[str]) -> int:
        query = self._sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(
            self._sql.Identifier(self.collection)
        )
        with self._conn.transaction():
            return int(self._conn.execute(query, (ids,)).rowcount)

    def _search(self, queries: np.ndarray, k: int, where: Where | None) -> list[list[Row]]:
        assert self._spec is not None
        sql = self._sql
        _, operator, to_score = _OPS[self._spec.metric]
        condition, args = sql.SQL(""), []
        if where is not None:
            condition = sql.SQL("WHERE metadata @> %s")
            args = [self._jsonb(dict(where))]
        query = sql.SQL(
            "SELECT id, embedding {op} %s AS distance, metadata FROM {table} {where} "
            "ORDER BY embedding {op} %s LIMIT %s"
        ).format(op=sql.SQL(operator), table=sql.Identifier(self.collection), where=condition)
        out: list[list[Row]] = []
        with self._conn.transaction(), self._conn.cursor() as cur:
            ef = min(max(self.ef_search, k), MAX_EF_SEARCH)
            cur.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(ef)))
            if where is not None or k > ef:
                cur.execute("SET LOCAL hnsw.iterative_scan = strict_order")
            for q in queries:
                cur.execute(query, (q, *args, q, k))
                out.append([(i, to_score(float(d)), m) for i, d, m in cur.fetchall()])
        return out

    def _get(self, ids: list[str]) -> dict[str, Record]:
        query = self._sql.SQL("SELECT id, embedding, metadata FROM {} WHERE id = ANY(%s)").format(
            self._sql.Identifier(self.collection)
        )
        with self._conn.transaction():
            rows = self._conn.execute(query, (ids,)).fetchall()
        return {i: Record(i, _array(v), m) for i, v, m in rows}

    def _count(self) -> int:
        query = self._sql.SQL("SELECT count(*) FROM {}").format(
            self._sql.Identifier(self.collection)
        )
        with self._conn.transaction():
            return int(self._conn.execute(query).fetchone()[0])

    def _close(self) -> None:
        self._conn.close()


def _array(value: Any) -> np.ndarray:
    """A loaded ``vector`` (pgvector's ``Vector``, or an ndarray in older adapters) as float32."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, np.float32)


def _redacted(dsn: str) -> str:
    """``dsn`` without its password, for messages and ``repr``."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
