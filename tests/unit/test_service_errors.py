"""The error table, row by row, through a real grpc.aio server with ErrorInterceptor and a real
client channel: status code, message, ErrorInfo (reason, domain, metadata) and FieldViolation."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
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
    malformed: list[str] = []

    async def start():
        server = grpc.aio.server(
            interceptors=[
                errors.ErrorInterceptor(
                    f"/{SERVICE_NAME}/", lambda *a: observed.append(a), malformed.append
                )
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
        stub.malformed = malformed  # type: ignore[attr-defined]
        stub.channel = channel  # type: ignore[attr-defined]
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
    if code == grpc.StatusCode.INTERNAL:  # the call's id, to find its one ERROR line
        call = info.metadata["call_id"]
        assert err.details() == errors.INTERNAL_MESSAGE.format(call=call)
        assert "secret" not in err.details() and len(call) == 12
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


def test_a_server_fault_is_one_error_line_with_the_call_id(stub, caplog):
    row = next(i for i, r in enumerate(ROWS) if type(r[0]) is RuntimeError)
    with (
        caplog.at_level("DEBUG", logger="quotient_service.errors"),
        pytest.raises(grpc.RpcError) as caught,
    ):
        stub.Embed(pb.EmbedRequest(model=str(row)), timeout=10)
    call = details(caught.value)[0].metadata["call_id"]
    errors_logged = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors_logged) == 1
    line = errors_logged[0].getMessage()
    assert call in line and "RuntimeError: secret internals at " in line and "\n" not in line
    assert errors_logged[0].exc_info is None  # the traceback is at DEBUG, not in the ERROR line
    assert any(r.levelname == "DEBUG" and r.exc_info for r in caplog.records)


def test_overload_carries_a_retry_hint(stub):
    row = next(i for i, r in enumerate(ROWS) if type(r[0]) is errors.ResourceExhausted)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(pb.EmbedRequest(model=str(row)), timeout=10)
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    hints = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert len(hints) == 1
    info = error_details_pb2.RetryInfo()
    hints[0].Unpack(info)
    assert info.retry_delay.ToTimedelta().total_seconds() == 1.0  # the default hint


@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80\x80\x80\x80\x10"])
def test_a_malformed_body_is_invalid_argument_and_counted(stub, body):
    before = len(stub.malformed)
    raw = stub.channel.unary_unary(f"/{SERVICE_NAME}/Embed")
    with pytest.raises(grpc.RpcError) as caught:
        raw(body, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[0].reason == "MALFORMED_REQUEST"
    assert "not a valid Embed request message" in caught.value.details()
    assert stub.malformed[before:] == ["Embed"]
    assert stub.observed[-1][:3] == ("Embed", "", grpc.StatusCode.INVALID_ARGUMENT)


def test_a_malformed_stream_message_ends_the_stream_invalid_argument(stub):
    good = pb.EmbedRequest(model="1", request_id="a").SerializeToString()
    raw = stub.channel.stream_stream(f"/{SERVICE_NAME}/EmbedStream")
    with pytest.raises(grpc.RpcError) as caught:
        list(raw(iter([b"\xff\xff\xff", good]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(caught.value)[0].reason == "MALFORMED_REQUEST"
    assert stub.malformed[-1] == "EmbedStream"
