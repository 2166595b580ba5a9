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
import contextvars
import logging
import random
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
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
    "LateAnswerFilter",
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
INTERNAL_MESSAGE = "internal error (call {call}); the server log has the details"
# The id of the call being served, in its log lines and in an INTERNAL answer (set per call by
# ErrorInterceptor; tasks the call starts inherit it).
CALL_ID: contextvars.ContextVar[str] = contextvars.ContextVar("quotient_call_id", default="-")
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
    """Overload: the status carries ``google.rpc.RetryInfo`` with ``retry_after_s``."""

    reason = "QUEUE_FULL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after_s = retry_after_s


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
        call = CALL_ID.get()
        log.error("call %s: server fault: %s", call, _fault(exc))
        log.debug("call %s: traceback of the fault", call, exc_info=exc)
        exc = QuotientError(
            INTERNAL_MESSAGE.format(call=call), reason="INTERNAL", metadata={"call_id": call}
        )
    code = _code_of(exc)
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata)
    details = [_pack(info)]
    if isinstance(exc, ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(exc, InvalidArgument) and exc.field:
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=exc.field, description=exc.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    return status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def _fault(exc: BaseException) -> str:
    """One line: the exception and where it was raised (the traceback is logged at DEBUG)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    text = " ".join(str(exc).split())[:500]
    return f"{type(exc).__name__}: {text}{where}"


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
    """Applies ``to_status`` to every method of the services under ``prefix``, reports
    (method, model, code, seconds) of unary calls to ``observe``, and parses request bodies
    itself: gRPC's own parsing answered a malformed body UNKNOWN (INTERNAL mid-stream); here it is
    INVALID_ARGUMENT "MALFORMED_REQUEST", counted by ``malformed``. Each call gets an id
    (``CALL_ID``) for its log lines. A call the client cancels, or whose deadline passes, is the
    client's business: it is logged at DEBUG, never as an error."""

    def __init__(
        self,
        prefix: str,
        observe: Observer | None = None,
        malformed: Callable[[str], None] | None = None,
    ) -> None:
        self.prefix, self.observe, self.malformed = prefix, observe, malformed

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
        parse = self._parser(name, handler.request_deserializer)
        if handler.unary_unary:
            behavior = self._unary(name, parse, handler.unary_unary)
            return handler._replace(unary_unary=behavior, request_deserializer=None)
        if handler.stream_stream:
            behavior = self._stream(name, parse, handler.stream_stream)
            return handler._replace(stream_stream=behavior, request_deserializer=None)
        return handler

    def _parser(
        self, name: str, deserialize: Callable[[bytes], Any] | None
    ) -> Callable[[Any], Any]:
        def parse(body: Any) -> Any:
            if deserialize is None or not isinstance(body, bytes):
                return body
            try:
                return deserialize(body)
            except (DecodeError, ValueError, TypeError) as exc:
                if self.malformed:
                    self.malformed(name)
                raise InvalidArgument(
                    f"the request body is not a valid {name} request message "
                    f"({len(body)} bytes): {' '.join(str(exc).split())[:200]}",
                    reason="MALFORMED_REQUEST",
                ) from None

        return parse

    def _unary(
        self,
        name: str,
        parse: Callable[[Any], Any],
        behavior: Callable[..., Awaitable[Any]],
    ) -> Callable[..., Any]:
        # Metrics are recorded before the answer leaves, so a client that has its answer also
        # sees it counted.
        async def wrapped(body: Any, context: grpc.aio.ServicerContext) -> Any:
            start, request = time.perf_counter(), None
            CALL_ID.set(_new_call_id())
            try:
                request = parse(body)
                del body  # the parsed request holds the data; the wire bytes can go now
                response = await behavior(request, context)
            except grpc.aio.AbortError:  # the servicer aborted by itself
                self._observe(name, request, grpc.StatusCode.UNKNOWN, start)
                raise
            except asyncio.CancelledError:  # client cancelled or its deadline passed
                log.debug(
                    "call %s: %s cancelled by the client or its deadline", CALL_ID.get(), name
                )
                self._observe(name, request, grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as exc:
                status = _final(to_status(exc), context)
                self._observe(name, request, grpc_code(status), start)
                await context.abort_with_status(rpc_status.to_status(status))
            self._observe(name, request, grpc.StatusCode.OK, start)
            return response

        return wrapped

    def _observe(self, name: str, request: Any, code: grpc.StatusCode, start: float) -> None:
        if self.observe:
            model = getattr(request, "model", "") or getattr(request, "name", "")
            self.observe(name, model, code, time.perf_counter() - start)

    def _stream(
        self,
        name: str,
        parse: Callable[[Any], Any],
        behavior: Callable[..., AsyncIterator[Any]],
    ) -> Callable[..., Any]:
        async def parsed(bodies: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for body in bodies:
                yield parse(body)

        async def wrapped(bodies: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            CALL_ID.set(_new_call_id())
            try:
                async for response in behavior(parsed(bodies), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except asyncio.CancelledError:
                log.debug(
                    "call %s: %s cancelled by the client or its deadline", CALL_ID.get(), name
                )
                raise
            except Exception as exc:
                status = _final(to_status(exc), context)
                await context.abort_with_status(rpc_status.to_status(status))

        return wrapped


def _final(status: status_pb2.Status, context: grpc.aio.ServicerContext) -> status_pb2.Status:
    """The status to send: DEADLINE_EXCEEDED once the client's deadline has passed, whatever
    failed meanwhile (the client sees that code anyway; the server must not contradict it)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 0 or status.code == grpc.StatusCode.OK.value[0]:
        return status
    log.debug("call %s ended by its deadline first (%s)", CALL_ID.get(), status.message)
    return to_status(DeadlineExceeded("the call's deadline passed"))


class LateAnswerFilter(logging.Filter):
    """gRPC logs an ERROR with a traceback when an answer cannot be sent because the call's
    deadline passed just before (``ExecuteBatchError raised in core``): a race the client
    caused, not a server fault. Installed on gRPC's logger, it turns those into one DEBUG line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "ExecuteBatchError" in record.getMessage():
            log.debug("an answer was not sent: its call had ended (%s)", record.getMessage())
            return False
        return True


def _new_call_id() -> str:
    """12 hex digits naming a call in the log and in its error (a correlation id, not a secret:
    ``random``, without the system call of ``uuid4`` on every call)."""
    return f"{random.getrandbits(48):012x}"
