"""Embeddings with their ids on disk: ``.npy`` (with a JSON sidecar) and Parquet.

    from quotient_client.export import load_embeddings, save_embeddings
    save_embeddings("digits.parquet", ids, client.embed(images))
    ids, embeddings, metadata = load_embeddings("digits.parquet")

Two layouts, chosen by the file name's suffix:

- ``OUT.npy``: the float32 matrix [n, d] (``numpy.load`` reads it as it is), and next to it
  ``OUT.ids.json``: ``{"format": "quotient-embeddings", "format_version": 1, "spec": {...},
  "count": n, "vectors_sha256": ..., "ids": [...], "poses": [...], "metadata": [...] | null}``
  (poses in degrees, null where the projection computes none; the checksum ties the sidecar to
  the matrix it was written with).
- ``OUT.parquet``: one row per embedding, columns ``id`` (string), ``vector``
  (fixed_size_list<float32>[d]), ``pose`` (float64, null where none) and ``metadata`` (the
  item's metadata as JSON text, null where none); the spec is in the schema's metadata under
  ``quotient.spec`` (JSON). pandas, DuckDB, Spark and polars read it directly. Needs pyarrow
  (``quotient-client[parquet]``).

Ids are strings, unique within a file; ``metadata`` is None or one JSON-serialisable mapping
(or None) per embedding (all None is saved as no metadata). Files are written to a temporary name
and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quotient_client._embeddings import Embeddings, EmbeddingSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "load_embeddings", "save_embeddings", "sidecar_path"]

FORMAT = "quotient-embeddings"
FORMAT_VERSION = 1
_SPEC_KEY = b"quotient.spec"
_FORMAT_KEY = b"quotient.format"

PathLike = str | os.PathLike[str]
Metadata = list[dict[str, Any] | None]


def sidecar_path(path: PathLike) -> Path:
    """The JSON sidecar of a ``.npy`` export: ``OUT.npy`` → ``OUT.ids.json``."""
    path = Path(path)
    return path.with_name(path.name[: -len(".npy")] + ".ids.json")


def save_embeddings(
    path: PathLike,
    ids: Sequence[str],
    embeddings: Embeddings,
    metadata: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[Path]:
    """Write ``embeddings`` with one id (and optional metadata) per row to ``path`` (``.npy`` or
    ``.parquet``, see the module's docstring) → the paths written. Raises ``ValueError`` naming
    the first bad item: an id that is not a str or repeats, counts that differ, metadata that is
    not a mapping or not JSON-serialisable."""
    path = Path(path)
    kind = _kind(path)
    if not isinstance(embeddings, Embeddings):
        raise TypeError(
            f"save_embeddings needs an Embeddings (vectors with their spec), got "
            f"{type(embeddings).__name__}: wrap a plain array as Embeddings(vectors, spec)"
        )
    id_list = _check_ids(ids, len(embeddings))
    meta = _check_metadata(metadata, len(embeddings))
    if kind == "npy":
        return _save_npy(path, id_list, embeddings, meta)
    return [_save_parquet(path, id_list, embeddings, meta)]


def load_embeddings(path: PathLike) -> tuple[list[str], Embeddings, Metadata | None]:
    """Read what ``save_embeddings`` wrote → ``(ids, embeddings, metadata)``; ``metadata`` is
    None when none was saved. Raises ``FileNotFoundError``, ``ValueError`` for a file that is not
    such an export (or a ``.npy`` whose sidecar is missing or belongs to other vectors)."""
    path = Path(path)
    kind = _kind(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if kind == "npy":
        return _load_npy(path)
    return _load_parquet(path)


# ---------------------------------------------------------------- checks


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".parquet"):
        raise ValueError(f"{path}: the file name must end in .npy or .parquet, not {suffix!r}")
    return suffix[1:]


def _check_ids(ids: Sequence[str], n: int) -> list[str]:
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of strings, got one str")
    id_list = list(ids)
    if len(id_list) != n:
        raise ValueError(f"{len(id_list)} ids for {n} embeddings: give one id per row")
    seen: dict[str, int] = {}
    for i, item in enumerate(id_list):
        if not isinstance(item, str):
            raise ValueError(f"ids[{i}] must be a str, got {type(item).__name__} {item!r}")
        if item in seen:
            raise ValueError(f"ids must be unique: {item!r} is ids[{seen[item]}] and ids[{i}]")
        seen[item] = i
    return [str(i) for i in id_list]  # np.str_ → str


def _check_metadata(metadata: Sequence[Mapping[str, Any] | None] | None, n: int) -> Metadata | None:
    if metadata is None:
        return None
    if isinstance(metadata, Mapping):
        raise TypeError("metadata must be one mapping (or None) per embedding, got one mapping")
    items = list(metadata)
    if len(items) != n:
        raise ValueError(f"{len(items)} metadata entries for {n} embeddings: give one per row")
    out: Metadata = []
    for i, item in enumerate(items):
        if item is None:
            out.append(None)
            continue
        if not isinstance(item, Mapping):
            raise ValueError(f"metadata[{i}] must be a mapping or None, got {type(item).__name__}")
        try:
            json.dumps(item, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata[{i}] is not JSON-serialisable: {exc}") from None
        out.append(dict(item))
    return out if any(m is not None for m in out) else None


def _sha256(vectors: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(vectors, "<f4").tobytes()).hexdigest()


def _poses_out(poses: np.ndarray) -> list[float | None]:
    return [None if math.isnan(p) else float(p) for p in poses.tolist()]


def _poses_in(raw: Sequence[float | None], n: int, where: str) -> np.ndarray:
    if len(raw) != n:
        raise ValueError(f"{where}: {len(raw)} poses for {n} vectors")
    return np.array([np.nan if p is None else float(p) for p in raw], np.float64)


def _replace(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- .npy + sidecar


def _save_npy(path: Path, ids: list[str], emb: Embeddings, meta: Metadata | None) -> list[Path]:
    side = sidecar_path(path)
    vectors = np.ascontiguousarray(emb.vectors, "<f4")
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "spec": emb.spec.to_dict(),
        "count": len(ids),
        "vectors_sha256": _sha256(vectors),
        "ids": ids,
        "poses": _poses_out(emb.poses),
        "metadata": meta,
    }
    tmp_npy, tmp_side = path.with_name(path.name + ".tmp"), side.with_name(side.name + ".tmp")
    with tmp_npy.open("wb") as f:
        np.save(f, vectors, allow_pickle=False)
    tmp_side.write_text(json.dumps(doc, ensure_ascii=False, allow_nan=False))
    _replace(tmp_npy, path)
    _replace(tmp_side, side)
    return [path, side]


def _load_npy(path: Path) -> tuple[list[str], Embeddings, Metadata | None]:
    side = sidecar_path(path)
    if not side.exists():
        raise ValueError(f"{path}: its sidecar {side.name} (ids and spec) is missing")
    try:
        doc = json.loads(side.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{side}: not JSON: {exc}") from None
    _check_format(doc.get("format"), doc.get("format_version"), str(side))
    vectors = np.load(path, allow_pickle=False)
    if vectors.ndim != 2 or len(vectors) != doc["count"]:
        raise ValueError(
            f"{path}: holds an array of shape {list(vectors.shape)}, its sidecar says "
            f"{doc['count']} vectors"
        )
    if _sha256(vectors) != doc["vectors_sha256"]:
        raise ValueError(f"{path}: these vectors are not the ones {side.name} was written with")
    spec = EmbeddingSpec.from_dict(doc["spec"])
    ids = [str(i) for i in doc["ids"]]
    if len(ids) != len(vectors):
        raise ValueError(f"{side}: {len(ids)} ids for {len(vectors)} vectors")
    poses = _poses_in(doc.get("poses") or [None] * len(ids), len(ids), str(side))
    return ids, Embeddings(vectors.astype(np.float32), spec, poses), doc.get("metadata")


def _check_format(name: object, version: object, where: str) -> None:
    if name != FORMAT:
        raise ValueError(f"{where}: not a Quotient embeddings export (format {name!r})")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{where}: format version {version!r}; this client reads version {FORMAT_VERSION}"
        )


# ---------------------------------------------------------------- Parquet


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("Parquet needs pyarrow: pip install 'quotient-client[parquet]'") from exc
    return pa, pq


def _save_parquet(path: Path, ids: list[str], emb: Embeddings, meta: Metadata | None) -> Path:
    pa, pq = _pyarrow()
    d = emb.spec.dimension
    flat = pa.array(np.ascontiguousarray(emb.vectors, np.float32).ravel(), pa.float32())
    poses = emb.poses
    table = pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "vector": pa.FixedSizeListArray.from_arrays(flat, d),
            "pose": pa.array(poses, pa.float64(), mask=np.isnan(poses)),
            "metadata": pa.array(
                [None if m is None else json.dumps(m, ensure_ascii=False) for m in meta]
                if meta is not None
                else [None] * len(ids),
                pa.string(),
            ),
        }
    )
    schema_meta = {
        _FORMAT_KEY: json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION}).encode(),
        _SPEC_KEY: json.dumps(emb.spec.to_dict()).encode(),
    }
    table = table.replace_schema_metadata(schema_meta)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    _replace(tmp, path)
    return path


def _load_parquet(path: Path) -> tuple[list[str], Embeddings, Metadata | None]:
    pa, pq = _pyarrow()
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from None
    schema_meta = table.schema.metadata or {}
    if _SPEC_KEY not in schema_meta or _FORMAT_KEY not in schema_meta:
        raise ValueError(f"{path}: not a Quotient embeddings export (no {_SPEC_KEY.decode()})")
    fmt = json.loads(schema_meta[_FORMAT_KEY])
    _check_format(fmt.get("format"), fmt.get("format_version"), str(path))
    spec = EmbeddingSpec.from_dict(json.loads(schema_meta[_SPEC_KEY]))
    missing = {"id", "vector", "pose", "metadata"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: columns {sorted(missing)} are missing")
    column = table.column("vector").combine_chunks()
    if not pa.types.is_fixed_size_list(column.type) or column.type.list_size != spec.dimension:
        raise ValueError(
            f"{path}: column 'vector' is {column.type}, not {spec.dimension} float32 values per row"
        )
    if column.null_count:
        raise ValueError(f"{path}: column 'vector' has {column.null_count} null rows")
    values = column.flatten().to_numpy(zero_copy_only=False)
    vectors = values.astype(np.float32).reshape(len(table), spec.dimension)
    poses = table.column("pose").to_numpy(zero_copy_only=False).astype(np.float64)
    ids = table.column("id").to_pylist()
    if None in ids:
        raise ValueError(f"{path}: row {ids.index(None)} has no id")
    raw_meta = table.column("metadata").to_pylist()
    meta: Metadata | None = None
    if any(m is not None for m in raw_meta):
        meta = [None if m is None else json.loads(m) for m in raw_meta]
    return [str(i) for i in ids], Embeddings(vectors, spec, poses), meta
