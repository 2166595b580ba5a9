"""ListModels, GetModel, health, reflection and the metrics endpoint of a real in-process server."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_service.servicer import SERVICE_NAME

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def service(start_service, three_model_store, pick_port):
    return start_service(model_store=str(three_model_store), metrics_port=pick_port())


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.EmbeddingServiceStub(channel)


def test_list_models_pages_in_name_order(stub):
    first = stub.ListModels(pb.ListModelsRequest(page_size=2), timeout=10)
    assert [m.name for m in first.models] == ["tiny-a", "tiny-b"] and first.next_page_token
    second = stub.ListModels(
        pb.ListModelsRequest(page_size=2, page_token=first.next_page_token), timeout=10
    )
    assert [m.name for m in second.models] == ["tiny-c"] and second.next_page_token == ""
    everything = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.name for m in everything.models] == ["tiny-a", "tiny-b", "tiny-c"]
    assert everything.next_page_token == ""


@pytest.mark.parametrize(
    "request_",
    [pb.ListModelsRequest(page_token="!!not-a-token"), pb.ListModelsRequest(page_size=-1)],
)
def test_list_models_bad_arguments(stub, request_):
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListModels(request_, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_model_describes_the_model(stub, service):
    model = stub.GetModel(pb.GetModelRequest(name="tiny-b"), timeout=10)
    assert (model.name, model.version, model.modality) == ("tiny-b", "0.0.1", pb.MODALITY_IMAGE)
    assert (model.group.name, model.group.order) == ("C4", 4)
    assert model.default_projection == "align"
    projections = {p.name: p for p in model.projections}
    assert list(projections) == ["align", "maxfilter", "mean", "max", "raw"]
    assert projections["align"].returns_pose and projections["align"].dimension == 16
    assert not projections["raw"].invariant and projections["mean"].invariant
    # each projection states its distance (images.neighbours: L2 for every cyclic projection)
    # and whether it is normalised (none is)
    assert [(p.metric, p.normalized) for p in model.projections] == [
        (pb.DISTANCE_METRIC_L2, False)
    ] * 5
    limits = model.input_limits
    assert limits.max_inputs_per_request == service.settings.max_inputs_per_request
    assert (limits.max_pixels, limits.model_input_size) == (service.settings.max_pixels, 28)
    assert "PNG" in limits.image_formats
    assert model.model_card.startswith("# tiny-c4")
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(pb.GetModelRequest(name="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE_NAME):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert reply.status == SERVING


def test_health_is_not_serving_until_the_models_are_loaded(loop_thread, tiny_model_store):
    from quotient_service.config import Settings
    from quotient_service.server import create_server

    settings = Settings(port=0, metrics_port=0, model_store=str(tiny_model_store))
    _, port, app = loop_thread.run(create_server(settings))
    release = asyncio.Event()
    real_start = app.backend.start

    async def slow_start():
        await release.wait()
        await real_start()

    app.backend.start = slow_start  # type: ignore[method-assign]
    starting = asyncio.run_coroutine_threadsafe(app.start(), loop_thread.loop)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            assert health.Check(request, timeout=10, wait_for_ready=True).status == NOT_SERVING
            stub = pb_grpc.EmbeddingServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            loop_thread.loop.call_soon_threadsafe(release.set)
            starting.result(30)
            assert health.Check(request, timeout=10).status == SERVING
    finally:
        loop_thread.loop.call_soon_threadsafe(release.set)
        starting.result(30)
        loop_thread.run(app.stop(0))


def test_reflection_lists_the_service(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    reply = next(stub.ServerReflectionInfo(iter([request]), timeout=10))
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_counts_calls(stub, service, png, digits):
    inputs = [pb.Input(image=pb.Image(data=png(digits(0))))] * 3
    stub.Embed(pb.EmbedRequest(model="tiny-a", inputs=inputs), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Embed(pb.EmbedRequest(model="who-knows", inputs=inputs), timeout=30)
    assert service.app.metrics_port
    deadline = time.monotonic() + 5
    with urllib.request.urlopen(f"http://127.0.0.1:{service.app.metrics_port}/metrics") as r:
        text = r.read().decode()
    assert time.monotonic() < deadline
    assert 'quotient_requests_total{code="OK",method="Embed",model="tiny-a"}' in text
    assert 'quotient_requests_total{code="NOT_FOUND",method="Embed",model="unknown"}' in text
    assert "quotient_request_duration_seconds_bucket" in text
    assert 'quotient_items_total{model="tiny-a"} 3.0' in text
    for name in (
        "quotient_batch_size_items_bucket",
        "quotient_queue_wait_seconds_bucket",
        "quotient_batch_duration_seconds_bucket",
        "quotient_queued_items 0.0",
    ):
        assert name in text


@pytest.mark.parametrize("field", ["model", "projection"])
def test_a_huge_client_string_is_echoed_bounded(stub, field, png, digits):
    """GetModel(name="x" * 10000) reached the client as RESOURCE_EXHAUSTED (its status trailer
    exceeded gRPC's metadata limit); the name is now echoed cut to 64 characters."""
    huge = "x" * 10_000
    with pytest.raises(grpc.RpcError) as caught:
        if field == "model":
            stub.GetModel(pb.GetModelRequest(name=huge), timeout=10)
        else:
            image = pb.Input(image=pb.Image(data=png(digits(0))))
            stub.Embed(pb.EmbedRequest(model="tiny-a", projection=huge, inputs=[image]), timeout=10)
    expected = grpc.StatusCode.NOT_FOUND if field == "model" else grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.code() == expected
    assert "(10000 characters)" in caught.value.details() and len(caught.value.details()) < 300
