"""The standard ``grpc.health.v1.Health/Check`` call without the grpcio-health-checking package.

Its two messages have a single field each, ``string service = 1`` and ``ServingStatus status = 1``
(an enum, a varint on the wire), so they are byte-for-byte the well-known ``StringValue`` and
``Int32Value``. Borrowing those saves a dependency whose version would have to move in lockstep
with grpcio, for a call whose wire format has been frozen since 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import wrappers_pb2

__all__ = ["HEALTH_CHECK", "health_check", "health_method", "status_name"]

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_STATUSES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def health_check(
    channel: grpc.Channel,
    service: str,
    timeout: float | None,
    metadata: Sequence[tuple[str, str]] | None,
) -> str:
    """The serving status of ``service`` ("" is the whole server), by name: "SERVING",
    "NOT_SERVING", "SERVICE_UNKNOWN" (also when the server answers NOT_FOUND) or "UNKNOWN"."""
    try:
        response = health_method(channel)(
            wrappers_pb2.StringValue(value=service), timeout=timeout, metadata=metadata
        )
    except grpc.RpcError as err:
        return status_name(None, err)
    return status_name(response)


def health_method(channel: Any) -> Any:
    """The Check method on ``channel`` (a ``grpc.Channel`` or a ``grpc.aio.Channel``)."""
    return channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=wrappers_pb2.Int32Value.FromString,
    )


def status_name(response: wrappers_pb2.Int32Value | None, err: grpc.RpcError | None = None) -> str:
    """A Check answer's status by name; a NOT_FOUND ``err`` is "SERVICE_UNKNOWN", any other is
    raised again."""
    if err is not None:
        if getattr(err, "code", lambda: None)() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        raise err
    return _STATUSES.get(response.value if response is not None else 0, "UNKNOWN")
