"""quotient_client error mapping: a small real gRPC server (written here) aborts with rich
statuses like the service's; each must become the right typed exception, with item indices
counted in the caller's items across the client's requests."""

from __future__ import annotations

import socket
import time
from concurrent import futures

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

import quotient_client as qc
from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

MODEL = pb.Model(
    name="m",
    modality=pb.MODALITY_IMAGE,
    default_projection="p",
    projections=[pb.Projection(name="p", dimension=2, invariant=True)],
)


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: str = "",
    index: int | None = None,
    field: str | None = None,
) -> status_pb2.Status:
    """The status the service sends (service/quotient_service/errors.py ``to_status``)."""
    details = []
    if reason:
        metadata = {} if index is None else {"index": str(index), "reason": message}
        info = error_details_pb2.ErrorInfo(reason=reason, domain="quotient", metadata=metadata)
        details.append(any_pb2.Any())
        details[-1].Pack(info)
    if field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        details.append(any_pb2.Any())
        details[-1].Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    text = message if index is None else f"input {index}: {message}"
    return status_pb2.Status(code=code.value[0], message=text, details=details)


class FailingService(pb_grpc.EmbeddingServiceServicer):
    """Embed fails as the request's projection says ("CODE" or "CODE:REASON"); an image whose
    bytes are b"bad" fails with the service's per-item status; projection "slow" sleeps 2 s."""

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        for i, item in enumerate(request.inputs):
            if item.image.data == b"bad":
                context.abort_with_status(
                    rpc_status.to_status(
                        _status(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            "not a decodable image",
                            "INVALID_INPUT",
                            index=i,
                            field=f"inputs[{i}].image.data",
                        )
                    )
                )
        if request.projection == "slow":
            time.sleep(2)
        elif request.projection == "plain":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        elif request.projection == "field-only":
            context.abort_with_status(
                rpc_status.to_status(
                    _status(grpc.StatusCode.INVALID_ARGUMENT, "too big", field="inputs[1]")
                )
            )
        elif request.projection:
            code, _, reason = request.projection.partition(":")
            context.abort_with_status(
                rpc_status.to_status(_status(grpc.StatusCode[code], f"failed with {code}", reason))
            )
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[1, 2]) for _ in request.inputs])

    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.Model:
        if request.name != "m":
            context.abort_with_status(
                rpc_status.to_status(
                    _status(
                        grpc.StatusCode.NOT_FOUND,
                        f"no model named {request.name!r}",
                        "MODEL_NOT_FOUND",
                    )
                )
            )
        return MODEL


@pytest.fixture(scope="module")
def target():
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_EmbeddingServiceServicer_to_server(FailingService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize(
    ("code", "reason", "cls"),
    [
        ("INVALID_ARGUMENT", "INVALID_INPUT", qc.InvalidInputError),
        ("NOT_FOUND", "MODEL_NOT_FOUND", qc.ModelNotFoundError),
        ("RESOURCE_EXHAUSTED", "QUEUE_FULL", qc.ServerBusyError),
        ("UNAVAILABLE", "BACKEND_UNAVAILABLE", qc.ServiceUnavailableError),
        ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", qc.DeadlineExceededError),
        ("PERMISSION_DENIED", "DENIED", qc.PermissionDeniedError),
        ("UNAUTHENTICATED", "NO_TOKEN", qc.UnauthenticatedError),
        ("FAILED_PRECONDITION", "NO_DECODER", qc.FailedPreconditionError),
        ("INTERNAL", "INTERNAL", qc.QuotientError),
    ],
)
def test_each_status_code_maps_to_its_exception(
    target: str, code: str, reason: str, cls: type[qc.QuotientError]
) -> None:
    with qc.Client(target) as client, pytest.raises(cls) as info:
        client.embed_images([b"ok"], model="m", projection=f"{code}:{reason}")
    err = info.value
    assert type(err) is cls
    assert err.code == grpc.StatusCode[code] and err.reason == reason
    assert err.message == f"failed with {code}" and str(err) == f"{code}: {err.message} [{reason}]"
    assert isinstance(err.details[0], error_details_pb2.ErrorInfo)
    assert isinstance(err.__cause__, grpc.RpcError)


@pytest.mark.parametrize(("bad", "batch_size"), [(0, 3), (5, 3), (6, 3), (5, 64), (6, 1)])
def test_bad_item_names_the_callers_index_across_requests(
    target: str, bad: int, batch_size: int
) -> None:
    items = [b"ok"] * 7
    items[bad] = b"bad"
    with qc.Client(target) as client, pytest.raises(qc.InvalidInputError) as info:
        client.embed_images(items, model="m", batch_size=batch_size)
    err = info.value
    assert err.index == bad and err.field == f"inputs[{bad}].image.data"
    assert err.message == f"input {bad}: not a decodable image"
    assert err.metadata["reason"] == "not a decodable image" and err.reason == "INVALID_INPUT"
    assert isinstance(err, ValueError)  # one `except ValueError` also catches local checks


def test_statuses_without_error_info(target: str) -> None:
    with qc.Client(target) as client:
        with pytest.raises(qc.ServerBusyError) as busy:
            client.embed_images([b"ok"], model="m", projection="plain")
        assert (
            busy.value.reason == ""
            and busy.value.details == ()
            and busy.value.message == "queue full"
        )
        with pytest.raises(qc.InvalidInputError) as bad:  # index taken from the BadRequest field
            client.embed_images([b"ok"] * 5, model="m", batch_size=3, projection="field-only")
        assert bad.value.index == 1 and bad.value.field == "inputs[1]"


def test_unknown_model_deadline_and_unreachable_server(target: str) -> None:
    with qc.Client(target) as client:
        with pytest.raises(qc.ModelNotFoundError, match="no model named 'x'") as info:
            client.get_model("x")
        assert info.value.reason == "MODEL_NOT_FOUND"
    with qc.Client(target, timeout=0.2) as client, pytest.raises(qc.DeadlineExceededError):
        client.embed_images([b"ok"], model="m", projection="slow")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with qc.Client(f"127.0.0.1:{port}", timeout=2) as client:
        with pytest.raises(qc.ServiceUnavailableError):
            client.list_models()
        with pytest.raises(qc.ServiceUnavailableError):
            client.health()


def test_error_from_status_shifts_stream_errors() -> None:
    status = _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty image data",
        "INVALID_INPUT",
        index=2,
        field="inputs[2]",
    )
    err = qc.error_from_status(status, offset=10)
    assert isinstance(err, qc.InvalidInputError)
    assert (err.index, err.field, err.message) == (12, "inputs[12]", "input 12: empty image data")
    unknown = qc.error_from_status(status_pb2.Status(code=99, message="?"))
    assert type(unknown) is qc.QuotientError and unknown.code == grpc.StatusCode.UNKNOWN


def test_health_uses_the_standard_service() -> None:
    health = pytest.importorskip("grpc_health.v1.health")
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    health_pb2_grpc = pytest.importorskip("grpc_health.v1.health_pb2_grpc")
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with qc.Client(f"127.0.0.1:{port}") as client:
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            assert client.health() == "SERVING"
            servicer.set("quotient.v1.EmbeddingService", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert client.health("quotient.v1.EmbeddingService") == "NOT_SERVING"
            assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    finally:
        server.stop(None)


def test_embed_stream_passes_answers_through(target: str) -> None:
    with qc.Client(target) as client:
        requests = [pb.EmbedRequest(model="m", inputs=[pb.Input(image=pb.Image(data=b"ok"))])]
        with pytest.raises(qc.QuotientError) as info:  # FailingService has no EmbedStream
            list(client.embed_stream(requests))
        assert info.value.code == grpc.StatusCode.UNIMPLEMENTED
