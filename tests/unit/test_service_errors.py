"""The error table, row by row, through a real grpc.aio server with ErrorInterceptor and a real
client channel: status code, message, ErrorInfo (reason, domain, metadata) and FieldViolation."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotient.v1 import embedding_service_pb2 as pb
from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_models.errors import InputError
from quotient_service import errors
from quotient_service.servicer import SERVICE_NAME

ROWS = [
    (
        errors.InvalidArgument("not a PNG", index=3, field="inputs[3].image.data"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
        "3",
    ),
    (errors.NotFound("no model 'x'"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", None),
    (
        errors.ResourceExhausted("queue full"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "QUEUE_FULL",
        None,
    ),
    (errors.Unavailable("backend down"), grpc.StatusCode.UNAVAILABLE, "BACKEND_UNAVAILABLE", None),
    (
        errors.DeadlineExceeded("too late"),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "DEADLINE_EXCEEDED",
        None,
    ),
    (
        errors.FailedPrecondition("not now"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "FAILED_PRECONDITION",
        None,
    ),
    (
        errors.Unauthenticated("no key", reason="API_KEY_MISSING"),
        grpc.StatusCode.UNAUTHENTICATED,
        "API_KEY_MISSING",
        None,
    ),
    (
        InputError("empty image data", index=2),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
        "2",
    ),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, "INTERNAL", None),
]


class Raising(pb_grpc.EmbeddingServiceServicer):
    """Embed raises the exception named by request.model; EmbedStream raises after one answer."""

    async def Embed(self, request, context):
        raise ROWS[int(request.model)][0]

    async def EmbedStream(self, requests, context):
        async for request in requests:
            yield pb.EmbedStreamResponse(request_id=request.request_id)
            raise ROWS[int(request.model)][0]


@pytest.fixture(scope="module")
def stub(loop_thread) -> Iterator[pb_grpc.EmbeddingServiceStub]:
    observed: list[tuple] = []

    async def start():
        server = grpc.aio.server(
            interceptors=[
                errors.ErrorInterceptor(f"/{SERVICE_NAME}/", lambda *a: observed.append(a))
            ]
        )
        pb_grpc.add_EmbeddingServiceServicer_to_server(Raising(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = loop_thread.run(start())
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EmbeddingServiceStub(channel)
        stub.observed = observed  # type: ignore[attr-defined]
        yield stub
    loop_thread.run(server.stop(0))


def details(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, list]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == err.code().value[0]  # type: ignore[attr-defined]
    info, violations = error_details_pb2.ErrorInfo(), []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = list(bad.field_violations)
    return info, violations


@pytest.mark.parametrize(
    ("row", "code", "reason", "index"),
    [(i, *r[1:]) for i, r in enumerate(ROWS)],
    ids=[type(r[0]).__name__ for r in ROWS],
)
def test_error_table_row(stub, row, code, reason, index):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(model=str(row)), timeout=10)
    err = caught.value
    assert err.code() == code
    info, violations = details(err)
    assert (info.reason, info.domain) == (reason, "quotient")
    assert info.metadata.get("index") == index
    if code == grpc.StatusCode.INTERNAL:
        assert err.details() == errors.INTERNAL_MESSAGE and "secret" not in err.details()
    if index is not None:
        assert err.details().startswith(f"input {index}: ")
        assert info.metadata["reason"] and violations
        assert violations[0].field.startswith(f"inputs[{index}]")
    assert stub.observed[-1][0] == "Embed" and stub.observed[-1][2] == code


def test_stream_failure_keeps_earlier_answers_and_carries_the_status(stub):
    call = stub.EmbedStream(iter([pb.EmbedRequest(model="1", request_id="a")]), timeout=10)
    answers = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in call:
            answers.append(answer.request_id)
    assert answers == ["a"]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert details(caught.value)[0].reason == "MODEL_NOT_FOUND"


def test_every_vocabulary_class_has_a_row():
    assert set(errors.STATUS_CODES) == {
        type(r[0]) for r in ROWS if isinstance(r[0], errors.QuotientError)
    }


def test_settle_returns_the_status_instead_of_raising(loop_thread):
    async def fail():
        raise errors.NotFound("gone")

    async def ok():
        return 7

    value, status = loop_thread.run(errors.settle(fail()))
    assert value is None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert loop_thread.run(errors.settle(ok())) == (7, None)
    assert errors.grpc_code(status) == grpc.StatusCode.NOT_FOUND
