"""The handler core shared by the embedded backend and the TorchServe handler.

A model batch travels as an uncompressed ``.npz`` (numpy's own format, read with
``allow_pickle=False``): the collated input arrays plus ``__projection__``; the answer is an
``.npz`` with ``values`` [B, D] float32 and, when computed, ``poses`` [B] float64.
"""

from __future__ import annotations

import io

import numpy as np

from quotient_models.projections import ProjectionOutput
from quotient_models.runtime import EmbeddingModel

__all__ = ["decode_output", "encode_batch", "handle_payload"]

_PROJECTION = "__projection__"


def encode_batch(arrays: dict[str, np.ndarray], projection: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_PROJECTION: np.array(projection)})
    return buf.getvalue()


def _decode_batch(payload: bytes) -> tuple[dict[str, np.ndarray], str]:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files if k != _PROJECTION}
        projection = str(f[_PROJECTION]) if _PROJECTION in f.files else ""
    return arrays, projection


def _encode_output(out: ProjectionOutput) -> bytes:
    buf = io.BytesIO()
    extra = {} if out.poses is None else {"poses": out.poses}
    np.savez(buf, values=np.asarray(out.values, dtype=np.float32), **extra)
    return buf.getvalue()


def decode_output(payload: bytes) -> ProjectionOutput:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        return ProjectionOutput(f["values"], f["poses"] if "poses" in f.files else None)


def handle_payload(model: EmbeddingModel, payload: bytes) -> bytes:
    """One model batch in, its embeddings out (both as bytes)."""
    arrays, projection = _decode_batch(payload)
    return _encode_output(model.embed_batch(arrays, projection or None))
