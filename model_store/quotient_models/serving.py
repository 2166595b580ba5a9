"""The handler core shared by the embedded backend and the TorchServe handler.

A model batch travels as an uncompressed ``.npz`` (numpy's own format, read with
``allow_pickle=False``): the collated input arrays plus ``__projection__``; the answer is an
``.npz`` with ``values`` [B, D] float32 and, when computed, ``poses`` [B] float64.

``__op__`` selects the operation (absent: "embed"). A "decode" batch (``encode_decode_batch``)
holds ``values`` [B, D] float32, embeddings of the model's default projection, and optionally
``allow_inexact`` (a bool scalar, absent: False); its answer holds ``smiles`` and ``reasons`` [B]
(unicode, "" where absent) and ``distances`` [B] float64 (NaN where not measured), read back by
``decode_molecules``.
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
    np.savez(buf, values=out.values, **extra)
    return buf.getvalue()


def embed_arrays(
    model: EmbeddingModel, arrays: dict[str, np.ndarray], projection: str
) -> ProjectionOutput:
    """One collated embedding batch through the model, values as the wire format holds them
    (float32): what ``handle_payload`` answers, before it is written as bytes."""
    out = model.embed_batch(arrays, projection or None)
    return ProjectionOutput(np.asarray(out.values, dtype=np.float32), out.poses)


def decode_output(payload: bytes) -> ProjectionOutput:
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        return ProjectionOutput(f["values"], f["poses"] if "poses" in f.files else None)


def encode_decode_batch(values: np.ndarray, allow_inexact: bool = False) -> bytes:
    """A "decode" batch: embeddings [B, D] of the model's default projection; ``allow_inexact``
    returns decodes that do not embed back to their row (``EmbeddingModel.decode``)."""
    buf = io.BytesIO()
    np.savez(
        buf,
        values=np.asarray(values, dtype=np.float32),
        allow_inexact=np.array(bool(allow_inexact)),
        **{_OP: np.array("decode")},
    )
    return buf.getvalue()


def decode_molecules(payload: bytes) -> list[tuple[str, str, float | None]]:
    """The answer to a "decode" batch → (canonical SMILES, reason, distance) per row, "" where
    absent, distance None where not measured."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as f:
        smiles, reasons = f["smiles"], f["reasons"]
        distances = f["distances"] if "distances" in f.files else np.full(len(smiles), np.nan)
    return [
        (str(s), str(r), None if np.isnan(d) else float(d))
        for s, r, d in zip(smiles, reasons, distances, strict=True)
    ]


def _handle_decode(model: EmbeddingModel, values: np.ndarray, allow_inexact: bool) -> bytes:
    if not model.can_decode:
        raise NotImplementedError(f"model {model.spec.name!r} has no decoder")
    decoded = model.decode(check_decode_values(model, values), allow_inexact)
    buf = io.BytesIO()
    np.savez(
        buf,
        smiles=np.array([d.smiles or "" for d in decoded], dtype=str),
        reasons=np.array([d.reason or "" for d in decoded], dtype=str),
        distances=np.array(
            [np.nan if d.distance is None else d.distance for d in decoded], dtype=np.float64
        ),
    )
    return buf.getvalue()


def handle_payload(model: EmbeddingModel, payload: bytes) -> bytes:
    """One model batch in, its answer out (both as bytes): embeddings, or decoded molecules."""
    arrays, projection, op = _decode_batch(payload)
    if op == "decode":
        inexact = bool(arrays["allow_inexact"]) if "allow_inexact" in arrays else False
        return _handle_decode(model, arrays["values"], inexact)
    if op != "embed":
        raise ValueError(f"unknown operation {op!r} in the model batch")
    return _encode_output(embed_arrays(model, arrays, projection))
