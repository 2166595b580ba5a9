"""The handler core shared by the embedded backend and the TorchServe handler.

A model batch travels as an uncompressed ``.npz`` (numpy's own format, read with
``allow_pickle=False``): the collated input arrays plus ``__projection__``; the answer is an
``.npz`` with ``values`` [B, D] float32 and, when computed, ``poses`` [B] float64.

``__op__`` selects the operation (absent: "embed"). A "decode" batch (``encode_decode_batch``)
holds ``values`` [B, D] float32, embeddings of the model's default projection; its answer holds
``smiles`` and ``reasons`` [B] (unicode, "" where absent), read back by ``decode_molecules``.
"""

from __future__ import annotations

import io

import numpy as np

from quotient_models.projections import ProjectionOutput
from quotient_models.runtime import EmbeddingModel, check_decode_values

__all__ = [
    "decode_molecules",
    "decode_output",
    "encode_batch",
    "encode_decode_batch",
    "handle_payload",
]

_PROJECTION, _OP = "__projection__", "__op__"


def encode_batch(arrays: dict[str, np.ndarray], projection: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_PROJECTION: np.array(projection)})
    return buf.getvalue()


def _decode_batch(payload: bytes) -> tuple[dict[str, np.ndarray], str, str]:
    """A model batch → its arrays, its projection ("" if none) and its operation."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k not in (_PROJECTION, _OP)}
        projection = str(f[_PROJECTION]) if _PROJECTION in f.files else ""
        op = str(f[_OP]) if _OP in f.files else "embed"
    return arrays, projection, op


def _encode_output(out: ProjectionOutput) -> bytes:
    buf = io.BytesIO()
    extra = {} if out.poses is None else {"poses": out.poses}
    np.savez(buf, values=np.asarray(out.values, dtype=np.float32), **extra)
    return buf.getvalue()


def decode_output(payload: bytes) -> ProjectionOutput:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        return ProjectionOutput(f["values"], f["poses"] if "poses" in f.files else None)


def encode_decode_batch(values: np.ndarray) -> bytes:
    """A "decode" batch: embeddings [B, D] of the model's default projection."""
    buf = io.BytesIO()
    np.savez(buf, values=np.asarray(values, dtype=np.float32), **{_OP: np.array("decode")})
    return buf.getvalue()


def decode_molecules(payload: bytes) -> list[tuple[str, str]]:
    """The answer to a "decode" batch → (canonical SMILES, reason) per row, "" where absent."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        return [(str(s), str(r)) for s, r in zip(f["smiles"], f["reasons"], strict=True)]


def _handle_decode(model: EmbeddingModel, values: np.ndarray) -> bytes:
    if not model.can_decode:
        raise NotImplementedError(f"model {model.spec.name!r} has no decoder")
    decoded = model.decode(check_decode_values(model, values))
    buf = io.BytesIO()
    np.savez(
        buf,
        smiles=np.array([d.smiles or "" for d in decoded], dtype=str),
        reasons=np.array([d.reason or "" for d in decoded], dtype=str),
    )
    return buf.getvalue()


def handle_payload(model: EmbeddingModel, payload: bytes) -> bytes:
    """One model batch in, its answer out (both as bytes): embeddings, or decoded molecules."""
    arrays, projection, op = _decode_batch(payload)
    if op == "decode":
        return _handle_decode(model, arrays["values"])
    if op != "embed":
        raise ValueError(f"unknown operation {op!r} in the model batch")
    return _encode_output(model.embed_batch(arrays, projection or None))
