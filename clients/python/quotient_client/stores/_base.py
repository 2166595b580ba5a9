"""``VectorStore``: the interface and the checks the three backends share.

A store holds vectors of one ``EmbeddingSpec`` (model, version, projection, dimension, metric),
each under a string id with an optional JSON metadata dict. The base class checks every input
(ids, lengths, finite values, spec) and normalises for "cosine"; a backend only stores and
searches already-checked float32 rows.
"""

from __future__ import annotations

import json
import math
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeAlias

import numpy as np

from quotient_client._embeddings import Embeddings, EmbeddingSpec, SpecMismatchError

__all__ = [
    "MAX_ID_BYTES",
    "MAX_METADATA_BYTES",
    "Hit",
    "Record",
    "VectorStore",
    "Where",
    "higher_is_better",
]

MAX_ID_BYTES = 4096  # UTF-8 bytes of one id (a path fits; Milvus needs a VARCHAR bound)
MAX_METADATA_BYTES = 65536  # JSON text of one metadata dict (Milvus's JSON field limit)
Scalar: TypeAlias = str | int | float | bool
Where: TypeAlias = Mapping[str, Scalar]
Row: TypeAlias = tuple[str, float, "dict[str, Any] | None"]  # a backend's hit: id, score, metadata
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")


def _require(module: str, extra: str) -> Any:
    """Import a backend's library, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"this store needs {module!r} ({e}): pip install 'quotient-client[{extra}]'"
        ) from e


def higher_is_better(metric: str) -> bool:
    """Whether a larger ``Hit.score`` is nearer under ``metric``: True for "cosine" (the score is
    the cosine similarity) and "inner_product" (the inner product), False for "l2" (the score is
    the Euclidean distance)."""
    return metric != "l2"


@dataclass(frozen=True)
class Hit:
    """One search result: the stored ``id``, its ``score`` (cosine similarity for "cosine",
    inner product for "inner_product", Euclidean distance for "l2") and its ``metadata``."""

    id: str
    score: float
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True)
class Record:
    """A stored vector: ``id``, float32 ``vector`` [dimension] (unit length under "cosine") and
    ``metadata``."""

    id: str
    vector: np.ndarray = field(repr=False)
    metadata: dict[str, Any] | None = None


class VectorStore(ABC):
    """Vectors of one ``EmbeddingSpec`` under string ids, searched with the spec's metric.

    Open one with ``open_store``. The spec is recorded when the store (directory, table,
    collection) is created — from ``open_store(spec=...)`` or the first ``upsert`` — and read
    back when it is reopened; vectors or queries of another model, version, projection or
    dimension raise ``SpecMismatchError``. Under "cosine" vectors and queries are normalised to
    unit length (a zero vector is refused). Not safe for concurrent use from several threads
    without a lock of the caller's (each call takes the store's own lock, which is enough for
    single calls).

    A backend implements, in this order of use:

    1. ``__init__``: connect, then ``self._open(spec)``, which calls
    2. ``_read_spec()``: the recorded spec, or None while nothing is created, and
    3. ``_create(spec)``: create the storage bound to ``spec`` (also on the first upsert)
       and return the recorded spec;
    4. ``_upsert``, ``_delete``, ``_search``, ``_get``, ``_count``: checked inputs only;
    5. ``_close()``.
    """

    backend = ""

    def __init__(self, location: str) -> None:
        self.location = location
        self._spec: EmbeddingSpec | None = None
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ public
    @property
    def spec(self) -> EmbeddingSpec | None:
        """What the stored vectors are; None until the store is bound (created)."""
        return self._spec

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger ``Hit.score`` is nearer (see ``higher_is_better``); True while
        unbound."""
        return self._spec is None or higher_is_better(self._spec.metric)

    def upsert(
        self,
        ids: Sequence[str],
        vectors: Embeddings | np.ndarray,
        metadata: Sequence[Mapping[str, Any] | None] | None = None,
        *,
        spec: EmbeddingSpec | None = None,
    ) -> None:
        """Add or replace the vectors of ``ids`` (row ``i`` of ``vectors`` is ``ids[i]``'s), with
        ``metadata[i]`` (a JSON-serialisable dict, or None) each. ``vectors`` is an
        ``Embeddings`` or a float array [n, dimension] with ``spec=`` saying what made it. An
        unbound store is bound to this spec."""
        with self._lock:
            self._check_open()
            checked_ids = _ids(ids)
            matrix, given = self._matrix(vectors, spec, "the vectors", len(checked_ids))
            metas = _metadata(metadata, checked_ids)
            if not checked_ids:
                return
            if self._spec is None:
                self._spec = self._create(given)
            else:
                self._check(given, "the vectors")
            self._rows_valid(matrix, lambda i: f"the vector of id {checked_ids[i]!r}")
            self._upsert(checked_ids, matrix, metas)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove ``ids`` (absent ones are ignored) → how many were present."""
        with self._lock:
            self._check_open()
            unique = list(dict.fromkeys(_ids(ids, unique=False)))
            if self._spec is None or not unique:
                return 0
            return self._delete(unique)

    def search(
        self,
        queries: Embeddings | np.ndarray,
        k: int = 10,
        *,
        spec: EmbeddingSpec | None = None,
        where: Where | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest stored vectors of each query, best first (fewer when the store
        holds fewer) → one list of ``Hit`` per query. ``queries``: ``Embeddings``, or a float
        array [n, dimension] or [dimension] with ``spec=``. ``where``: only vectors whose
        metadata has each key equal to the given value (str, int, float or bool; keys are
        identifiers, ``[A-Za-z_][A-Za-z0-9_]*``). Many queries in one call are searched as one
        batch."""
        with self._lock:
            self._check_open()
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
                raise ValueError(f"k must be a positive integer, got {k!r}")
            matrix, given = self._matrix(queries, spec, "the queries", None)
            condition = _where(where)
            if self._spec is None or not len(matrix):
                return [[] for _ in range(len(matrix))]
            self._check(given, "the queries")
            self._rows_valid(matrix, lambda i: f"query {i}")
            rows = self._search(matrix, int(k), condition)
            descending = higher_is_better(self._spec.metric)
            return [
                [
                    Hit(i, s, m)
                    for i, s, m in sorted(row, key=lambda h: -h[1] if descending else h[1])
                ]
                for row in rows
            ]

    def get(self, ids: Sequence[str]) -> list[Record | None]:
        """The stored ``Record`` of each of ``ids``, None where absent."""
        with self._lock:
            self._check_open()
            wanted = _ids(ids, unique=False)
            if self._spec is None or not wanted:
                return [None] * len(wanted)
            found = self._get(list(dict.fromkeys(wanted)))
            return [found.get(i) for i in wanted]

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return 0 if self._spec is None else self._count()

    def close(self) -> None:
        """Save what is pending and release the connection or directory; idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._close()

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        bound = self._spec.label() if self._spec else "unbound"
        return f"<{type(self).__name__} {self.location} {bound}>"

    # ------------------------------------------------------------------ for backends
    def _open(self, spec: EmbeddingSpec | None) -> None:
        stored = self._read_spec()
        if stored is not None:
            self._spec = stored
            if spec is not None:
                self._check(spec, "the spec given to open_store: its vectors")
        elif spec is not None:
            self._spec = self._create(spec)

    @abstractmethod
    def _read_spec(self) -> EmbeddingSpec | None: ...

    @abstractmethod
    def _create(self, spec: EmbeddingSpec) -> EmbeddingSpec:
        """Create the storage for ``spec`` → the spec now recorded (another client's, if it
        created the same collection meanwhile and it matches)."""

    @abstractmethod
    def _upsert(
        self, ids: list[str], vectors: np.ndarray, metadata: list[dict[str, Any] | None]
    ) -> None: ...

    @abstractmethod
    def _delete(self, ids: list[str]) -> int: ...

    @abstractmethod
    def _search(self, queries: np.ndarray, k: int, where: Where | None) -> list[list[Row]]:
        """Per query, up to ``k`` (id, score, metadata), score as ``Hit.score`` says."""

    @abstractmethod
    def _get(self, ids: list[str]) -> dict[str, Record]: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _close(self) -> None: ...

    # ------------------------------------------------------------------ checks
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"{self!r} is closed")

    def _check(self, given: EmbeddingSpec, what: str) -> None:
        assert self._spec is not None
        try:
            self._spec.check(given, what)
        except SpecMismatchError as e:
            raise SpecMismatchError(f"{self.backend} store {self.location}: {e}") from None

    def _matrix(
        self, vectors: Any, spec: EmbeddingSpec | None, what: str, n: int | None
    ) -> tuple[np.ndarray, EmbeddingSpec]:
        """``vectors`` as float32 [n, d] and the spec they come with (``n``: the expected row
        count)."""
        if isinstance(vectors, Embeddings):
            if spec is not None and spec != vectors.spec:
                vectors.spec.check(spec, f"{what} (their spec= argument)")
            given, matrix = vectors.spec, vectors.vectors
        else:
            if spec is None:
                raise TypeError(
                    f"{what} are a plain array: pass spec= (the EmbeddingSpec that made them, "
                    "e.g. client.embed(...).spec) or an Embeddings"
                )
            array = np.asarray(vectors)
            if array.dtype == object or not (
                np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            ):
                raise TypeError(f"{what} must be a float array, got dtype {array.dtype}")
            if n is None and array.ndim == 1:
                array = array[None, :]
            given, matrix = spec, Embeddings(array.astype(np.float32), spec).vectors
        if n is not None and len(matrix) != n:
            raise ValueError(f"{n} ids but {len(matrix)} rows in {what}")
        return np.ascontiguousarray(matrix, np.float32), given

    def _rows_valid(self, matrix: np.ndarray, name: Any) -> None:
        """Refuse non-finite rows; under "cosine" normalise in place (refusing zero rows)."""
        assert self._spec is not None
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            raise ValueError(f"{name(int(np.flatnonzero(~finite)[0]))} has NaN or infinite values")
        if self._spec.metric == "cosine":
            norms = np.linalg.norm(matrix.astype(np.float64), axis=1)
            if not (norms > 0).all():
                raise ValueError(
                    f"{name(int(np.flatnonzero(norms <= 0)[0]))} is zero: it has no direction "
                    "to compare under the cosine metric"
                )
            matrix /= norms[:, None].astype(np.float32)


def _ids(ids: Iterable[str], unique: bool = True) -> list[str]:
    if isinstance(ids, str | bytes):
        raise TypeError("ids must be a sequence of strings, not one string")
    out = list(ids)
    seen: dict[str, int] = {}
    for i, item in enumerate(out):
        if not isinstance(item, str):
            raise TypeError(f"id at index {i} is {type(item).__name__}, not str")
        if not item or "\x00" in item:
            raise ValueError(f"id at index {i} is empty or contains NUL: {item!r}")
        try:
            size = len(item.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ValueError(f"id at index {i} is not valid Unicode: {e}") from None
        if size > MAX_ID_BYTES:
            raise ValueError(f"id at index {i} is {size} bytes long, over {MAX_ID_BYTES}")
        if unique and item in seen:
            raise ValueError(f"id {item!r} appears twice in one call (indices {seen[item]}, {i})")
        seen[item] = i
    return out


def _metadata(
    metadata: Sequence[Mapping[str, Any] | None] | None, ids: list[str]
) -> list[dict[str, Any] | None]:
    """One JSON-normalised dict (or None) per id: what every backend hands back."""
    if metadata is None:
        return [None] * len(ids)
    if isinstance(metadata, Mapping | str | bytes):
        raise TypeError("metadata must be one dict (or None) per id, in a sequence")
    items = list(metadata)
    if len(items) != len(ids):
        raise ValueError(f"{len(ids)} ids but {len(items)} metadata entries")
    out: list[dict[str, Any] | None] = []
    for ident, item in zip(ids, items, strict=True):
        if item is None:
            out.append(None)
            continue
        if not isinstance(item, Mapping) or not all(isinstance(key, str) for key in item):
            raise TypeError(f"metadata of id {ident!r} must be a dict with str keys or None")
        try:
            text = json.dumps(dict(item), allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"metadata of id {ident!r} is not JSON-serialisable: {e}") from None
        if len(text.encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata of id {ident!r} is over {MAX_METADATA_BYTES} bytes as JSON")
        out.append(json.loads(text))
    return out


def _where(where: Where | None) -> dict[str, Scalar] | None:
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise TypeError("where must be a dict of metadata key → value")
    for key, value in where.items():
        if not isinstance(key, str) or not _KEY.match(key):
            raise ValueError(f"where key {key!r} must be an identifier ([A-Za-z_][A-Za-z0-9_]*)")
        if not isinstance(value, str | int | float | bool) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise ValueError(f"where[{key!r}] must be a str, int, bool or finite float")
    return dict(where) or None
