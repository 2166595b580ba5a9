"""One error vocabulary, one table to gRPC codes, one interceptor that applies it.

Domain code raises a ``QuotientError`` subclass (or model code raises ``InputError``); nothing
below the servicer knows gRPC. ``to_status`` turns any exception into a ``google.rpc.Status``
with an ``ErrorInfo`` (reason, domain "quotient", metadata) and, for a bad field, a
``BadRequest.FieldViolation``. ``ErrorInterceptor`` aborts failed calls with that status (the rich
status travels in the ``grpc-status-details-bin`` trailer); EmbedStream puts the same status into
its per-message answers through ``settle``.

Why an interceptor, not a decorator: a ``grpc.aio.ServerInterceptor`` can replace the behaviour of
every handler kind (unary and streaming) in one place, so no servicer method can forget it, and it
is also where per-call metrics see the final status code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from quotient_models.errors import InputError

__all__ = [
    "DOMAIN",
    "STATUS_CODES",
    "DeadlineExceeded",
    "ErrorInterceptor",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "QuotientError",
    "ResourceExhausted",
    "StartupError",
    "Unauthenticated",
    "Unavailable",
    "grpc_code",
    "settle",
    "to_status",
]

log = logging.getLogger(__name__)
DOMAIN = "quotient"
INTERNAL_MESSAGE = "internal error; the server log has the details"
_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}
T = TypeVar("T")


class QuotientError(Exception):
    """Base of the vocabulary: a message for the client, an ErrorInfo reason and metadata."""

    reason = "ERROR"

    def __init__(
        self, message: str, *, reason: str | None = None, metadata: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.reason
        self.metadata = {k: str(v) for k, v in (metadata or {}).items() if v is not None}


class InvalidArgument(QuotientError):
    """A bad request or a bad item. ``index`` names the item, ``field`` its path
    (``inputs[3].image.data``); ``metadata["reason"]`` is the human reason alone."""

    reason = "INVALID_INPUT"

    def __init__(
        self,
        message: str,
        *,
        index: int | None = None,
        field: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(
            message if index is None else f"input {index}: {message}",
            reason=reason,
            metadata={"index": index, "reason": message},
        )
        self.index, self.field, self.description = index, field, message


class NotFound(QuotientError):
    reason = "MODEL_NOT_FOUND"


class ResourceExhausted(QuotientError):
    reason = "QUEUE_FULL"


class Unavailable(QuotientError):
    reason = "BACKEND_UNAVAILABLE"


class DeadlineExceeded(QuotientError):
    reason = "DEADLINE_EXCEEDED"


class FailedPrecondition(QuotientError):
    reason = "FAILED_PRECONDITION"


class Unauthenticated(QuotientError):
    """No API key, a malformed one, or one that is not accepted (auth.py)."""

    reason = "UNAUTHENTICATED"


class StartupError(RuntimeError):
    """The server cannot start as configured: the message says why and names the flag. Never
    sent to a client; ``quotient-server`` prints it as one line and exits 1, no traceback."""


# The table. Anything not in it (and not an InputError) is INTERNAL.
STATUS_CODES: dict[type[QuotientError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


def _code_of(exc: QuotientError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(exc: BaseException) -> status_pb2.Status:
    """Any exception → google.rpc.Status (unknown ones → INTERNAL, traceback logged)."""
    if isinstance(exc, InputError):
        field = None if exc.index is None else f"inputs[{exc.index}]"
        exc = InvalidArgument(exc.reason, index=exc.index, field=field)
    if not isinstance(exc, QuotientError):
        log.error("unhandled error", exc_info=exc)
        exc = QuotientError(INTERNAL_MESSAGE, reason="INTERNAL")
    code = _code_of(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    details = [_pack(info)]
    if isinstance(exc, InvalidArgument) and exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def grpc_code(status: status_pb2.Status | None) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status (None = OK)."""
    return grpc.StatusCode.OK if status is None else _BY_NUMBER[status.code]


async def settle(aw: Awaitable[T]) -> tuple[T | None, status_pb2.Status | None]:
    """Await ``aw``; a failure becomes its Status instead of an exception (EmbedStream)."""
    try:
        return await aw, None
    except Exception as exc:
        return None, to_status(exc)


Observer = Callable[[str, str, grpc.StatusCode, float], None]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Applies ``to_status`` to every method of the services under ``prefix`` and reports
    (method, model, code, seconds) of unary calls to ``observe``."""

    def __init__(self, prefix: str, observe: Observer | None = None) -> None:
        self.prefix, self.observe = prefix, observe

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or not method.startswith(self.prefix):
            return handler
        name = method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._unary(name, handler.unary_unary))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._stream(handler.stream_stream))
        return handler

    def _unary(self, name: str, behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        # Metrics are recorded before the answer leaves, so a client that has its answer also
        # sees it counted.
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                response = await behavior(request, context)
            except grpc.aio.AbortError:  # the servicer aborted by itself
                self._observe(name, request, grpc.StatusCode.UNKNOWN, start)
                raise
            except asyncio.CancelledError:  # client cancelled or its deadline passed
                self._observe(name, request, grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as exc:
                status = to_status(exc)
                self._observe(name, request, grpc_code(status), start)
                await context.abort_with_status(rpc_status.to_status(status))
            self._observe(name, request, grpc.StatusCode.OK, start)
            return response

        return wrapped

    def _observe(self, name: str, request: Any, code: grpc.StatusCode, start: float) -> None:
        if self.observe:
            model = getattr(request, "model", "") or getattr(request, "name", "")
            self.observe(name, model, code, time.perf_counter() - start)

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., Any]:
        async def wrapped(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(requests, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await context.abort_with_status(rpc_status.to_status(to_status(exc)))

        return wrapped
