"""Typed exceptions for failed calls, decoded from the server's rich ``google.rpc.Status``.

The server attaches an ``ErrorInfo`` (reason, domain "quotient", metadata "index" and "reason")
and, for a bad item, a ``BadRequest.FieldViolation`` ("inputs[3].image.data", for Decode
"embeddings[2].values"). Indices in those details count from the start of one request; the client
splits the caller's items into several requests, so ``offset`` (the request's first item) turns
them back into the caller's indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidInputError",
    "ModelNotFoundError",
    "PermissionDeniedError",
    "QuotientError",
    "ServerBusyError",
    "ServiceUnavailableError",
    "UnauthenticatedError",
    "error_from_rpc",
    "error_from_status",
]

_FIELD_INDEX = re.compile(r"^(inputs|embeddings)\[(\d+)\]")
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
# A failed call: a finished grpc.Call (sync), or grpc.aio's AioRpcError, which is no grpc.Call
# but has the same code(), details() and trailing_metadata().
_FAILED_CALL = (grpc.Call, grpc.aio.AioRpcError)


class QuotientError(Exception):
    """A call failed. ``code`` is the gRPC status code (None for a malformed answer found by the
    client), ``message`` the server's message, ``reason`` the ErrorInfo reason (for example
    "INVALID_INPUT", "QUEUE_FULL"; "" when absent), ``metadata`` the ErrorInfo metadata and
    ``details`` every decoded status detail (ErrorInfo, BadRequest, or the packed ``Any``) as sent.
    Item indices in ``message``, ``metadata`` and ``InvalidInputError.field`` are the caller's."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        details: Sequence[Any] = (),
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.metadata = dict(metadata or {})
        self.details = tuple(details)

    @property
    def retry_after(self) -> float | None:
        """Seconds the server asks the client to wait before retrying (its
        ``google.rpc.RetryInfo``), or None when it gave none."""
        for detail in self.details:
            if isinstance(detail, error_details_pb2.RetryInfo):
                return float(detail.retry_delay.ToTimedelta().total_seconds())
        return None

    def __str__(self) -> str:
        head = self.code.name if self.code is not None else "error"
        return f"{head}: {self.message}" + (f" [{self.reason}]" if self.reason else "")


class InvalidInputError(QuotientError, ValueError):
    """INVALID_ARGUMENT: the request or one item is bad. ``index`` is the caller's item index
    (None when the whole request is at fault) and ``field`` the offending field
    ("inputs[67].image.data"). Also a ``ValueError``, like the client's own input checks."""

    def __init__(
        self, message: str, *, index: int | None = None, field: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(message, **kwargs)
        self.index, self.field = index, field


class ModelNotFoundError(QuotientError):
    """NOT_FOUND: the server serves no model of that name (or none of the wanted modality)."""


class ServerBusyError(QuotientError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry later with backoff."""


class ServiceUnavailableError(QuotientError):
    """UNAVAILABLE: the server or its backend cannot be reached; retry later."""


class DeadlineExceededError(QuotientError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""


class FailedPreconditionError(QuotientError):
    """FAILED_PRECONDITION: valid in form, but the model cannot do it (for example ``decode`` with
    a model that has no decoder, reason "NO_DECODER")."""


class PermissionDeniedError(QuotientError):
    """PERMISSION_DENIED: the credentials may not use this model or method."""


class UnauthenticatedError(QuotientError):
    """UNAUTHENTICATED: missing or invalid credentials."""


_CLASSES: dict[grpc.StatusCode, type[QuotientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInputError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusyError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def _unpack(packed: Any) -> Any:
    for cls in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
    ):
        if packed.Is(cls.DESCRIPTOR):
            message = cls()
            packed.Unpack(message)
            return message
    return packed


def _shift_field(field: str, offset: int) -> str:
    return _FIELD_INDEX.sub(lambda m: f"{m.group(1)}[{int(m.group(2)) + offset}]", field, count=1)


def _build(
    code: grpc.StatusCode, message: str, packed: Sequence[Any], offset: int
) -> QuotientError:
    details = [_unpack(p) for p in packed]
    info = next((d for d in details if isinstance(d, error_details_pb2.ErrorInfo)), None)
    violations = [
        v
        for d in details
        if isinstance(d, error_details_pb2.BadRequest)
        for v in d.field_violations
    ]
    reason, metadata = (info.reason, dict(info.metadata)) if info is not None else ("", {})
    field = _shift_field(violations[0].field, offset) if violations else None
    kwargs: dict[str, Any] = {
        "code": code,
        "reason": reason,
        "metadata": metadata,
        "details": details,
    }
    cls = _CLASSES.get(code, QuotientError)
    if cls is not InvalidInputError:
        return cls(message, **kwargs)
    index: int | None = None
    if metadata.get("index", "").isdigit():
        index = int(metadata["index"]) + offset
        metadata["index"] = str(index)
    elif field and (match := _FIELD_INDEX.match(field)):
        index = int(match.group(2))  # already shifted
    if index is not None and metadata.get("reason"):
        message = f"input {index}: {metadata['reason']}"  # the server's text counts per request
    return InvalidInputError(message, index=index, field=field, **kwargs)


def error_from_rpc(err: grpc.RpcError, offset: int = 0) -> QuotientError:
    """The typed exception for a failed call; item indices are shifted by ``offset``."""
    failed = isinstance(err, _FAILED_CALL)
    code = err.code() if failed else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = (err.details() if failed else None) or str(err)  # type: ignore[attr-defined]
    try:
        status = rpc_status.from_call(err) if failed else None
    except ValueError:  # trailer disagrees with the status line: trust the status line
        status = None
    return _build(code, message, status.details if status is not None else (), offset)


def error_from_status(status: status_pb2.Status, offset: int = 0) -> QuotientError:
    """The typed exception for a ``google.rpc.Status`` (an EmbedStream answer's error)."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _build(code, status.message, status.details, offset)
