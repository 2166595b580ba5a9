"""Vector stores for Quotient embeddings: FAISS (a directory, in-process), PostgreSQL + pgvector
and Milvus, behind one interface.

    from quotient_client.stores import open_store
    with open_store("digits.index") as store:            # a directory: FAISS
        store.upsert(ids, client.embed(images))
        hits = store.search(client.embed([query]), k=5)[0]   # [Hit(id, score, metadata)]

``open_store(location)`` picks the backend from ``location``:

- a directory path (``str`` or ``Path``): FAISS (``quotient-client[faiss]``);
- ``postgresql://user@host:5432/db`` (or ``postgres://``): a pgvector table
  (``quotient-client[pgvector]``);
- ``milvus://host:19530``, ``milvus+https://host:443`` (TLS), or an ``http(s)://`` URI as
  pymilvus takes it (its path is then the database): a Milvus collection
  (``quotient-client[milvus]``).

The collection is ``collection=`` (default "quotient"); a URL may name it instead, as its
fragment (``postgresql://host/db#digits``) or, for ``milvus://``, as its path
(``milvus://host:19530/digits``). Other keyword options go to the backend's class
(``FaissStore``, ``PgVectorStore``, ``MilvusStore``).

Each store records the ``EmbeddingSpec`` of its vectors (model, version, projection,
dimension, metric) and refuses others with ``SpecMismatchError``. ``Hit.score`` is the cosine
similarity under "cosine", the inner product under "inner_product" (larger is nearer) and the
Euclidean distance under "l2" (smaller is nearer); hits come best first in every backend.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from quotient_client._embeddings import EmbeddingSpec
from quotient_client.stores._base import (
    MAX_ID_BYTES,
    MAX_METADATA_BYTES,
    Hit,
    Record,
    VectorStore,
    Where,
    higher_is_better,
)

__all__ = [
    "MAX_ID_BYTES",
    "MAX_METADATA_BYTES",
    "Hit",
    "Record",
    "VectorStore",
    "Where",
    "higher_is_better",
    "open_store",
    "with_collection",
]

_POSTGRES = ("postgresql", "postgres")
_MILVUS = {"milvus": "http", "milvus+http": "http", "milvus+https": "https"}
_PYMILVUS = ("http", "https", "tcp")


def open_store(
    location: str | os.PathLike[str],
    *,
    spec: EmbeddingSpec | None = None,
    collection: str | None = None,
    **options: Any,
) -> VectorStore:
    """Open (or create) the store at ``location`` (see the module docstring) → a
    ``VectorStore``. With ``spec``, a new store is created bound to it and an existing one must
    hold the same model, version, projection and dimension; without, an existing store keeps
    its spec and a new one is bound by its first ``upsert``."""
    if isinstance(location, os.PathLike) or "://" not in str(location):
        from quotient_client.stores._faiss import FaissStore

        if collection is not None:
            raise ValueError("a FAISS store is its directory: give no collection=")
        return FaissStore(location, spec, **options)
    text = str(location)
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    named = parts.fragment or None
    bare = urlunsplit(parts._replace(fragment=""))
    if scheme in _POSTGRES:
        from quotient_client.stores._pgvector import PgVectorStore

        return PgVectorStore(bare, spec, collection=_one(collection, named), **options)
    if scheme in _MILVUS:
        from quotient_client.stores._milvus import MilvusStore

        path = parts.path.strip("/") or None
        if path is not None and named is not None:
            raise ValueError(f"{text}: name the collection once (path or #fragment)")
        uri = urlunsplit((_MILVUS[scheme], parts.netloc, "", parts.query, ""))
        return MilvusStore(uri, spec, collection=_one(collection, path or named), **options)
    if scheme in _PYMILVUS:
        from quotient_client.stores._milvus import MilvusStore

        return MilvusStore(bare, spec, collection=_one(collection, named), **options)
    raise ValueError(
        f"unknown store location {text!r}: give a directory (FAISS), postgresql://... "
        "(pgvector) or milvus://host:port (Milvus)"
    )


def with_collection(location: str | os.PathLike[str], collection: str) -> str:
    """``location`` naming collection ``collection`` instead of its own, as ``open_store``
    reads it: a subdirectory for FAISS, the path of a ``milvus://`` URL, the fragment of
    others (``postgresql://host/db#collection``)."""
    text = os.fspath(location)
    if "://" not in text:
        return os.path.join(text, collection)
    parts = urlsplit(text)
    if parts.scheme.lower() in _MILVUS:
        return urlunsplit(parts._replace(path=f"/{collection}", fragment=""))
    return urlunsplit(parts._replace(fragment=collection))


def _one(option: str | None, in_url: str | None) -> str:
    if option is not None and in_url is not None and option != in_url:
        raise ValueError(f"the collection is named twice: {in_url!r} in the URL, {option!r}")
    return option or in_url or "quotient"
