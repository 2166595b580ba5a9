"""Embed and EmbedStream through a real in-process server (embedded backend, tiny C4 model) and a
real gRPC channel: order, agreement with the model, invariance, poses, and every bad input."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_models.invariance import relative_change
from quotient_models.runtime import InputLimits, load_model

MODEL = "tiny-c4"
MAX_BYTES, MAX_PIXELS, MAX_INPUTS = 200_000, 1_000_000, 16


@pytest.fixture(scope="module")
def service(start_service, tiny_model_store):
    return start_service(
        model_store=str(tiny_model_store),
        max_input_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        max_inputs_per_request=MAX_INPUTS,
        max_batch_items=8,
    )


@pytest.fixture(scope="module")
def stub(service):
    with grpc.insecure_channel(service.target) as channel:
        yield pb_grpc.EmbeddingServiceStub(channel)


def images(*data: bytes) -> list[pb.Input]:
    return [pb.Input(image=pb.Image(data=d)) for d in data]


def embed(stub, data: list[bytes], projection: str = "", **kw) -> pb.EmbedResponse:
    return stub.Embed(
        pb.EmbedRequest(model=MODEL, inputs=images(*data), projection=projection, **kw), timeout=30
    )


def values(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([e.values for e in response.embeddings], dtype=np.float32)


def test_one_embedding_per_input_in_order_matching_the_model(stub, png, digits, tiny_model_store):
    data = [png(digits(s)) for s in range(11)]  # > max_batch_items: spans batches
    response = embed(stub, data, request_id="r1")
    assert (response.model, response.projection, response.invariant) == (MODEL, "align", True)
    assert response.request_id == "r1" and len(response.embeddings) == 11
    assert response.metadata.batch_size >= 11 and response.metadata.total_time.ToNanoseconds() > 0
    model = load_model(tiny_model_store / MODEL)
    direct = model.embed_batch(model.collate([model.prepare(d, InputLimits()) for d in data]))
    np.testing.assert_allclose(values(response), direct.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        [e.pose.rotation_degrees for e in response.embeddings], direct.poses
    )


@pytest.mark.parametrize("projection", ["align", "maxfilter", "mean", "max", "raw"])
def test_rotation_invariance_through_the_api(stub, png, digits, projection):
    base = [digits(s) for s in range(4)]
    ref = values(embed(stub, [png(d) for d in base], projection))
    for k in (1, 2, 3):
        rotated = values(embed(stub, [png(np.rot90(d, k).copy()) for d in base], projection))
        change = relative_change(ref, rotated)
        if projection == "raw":
            assert change.max() > 1e-2, "raw is the equivariant latent: it must change"
        else:
            assert change.max() < 1e-5, (projection, k, change)


def test_poses_turn_by_90_degrees_with_the_input(stub, png, digits):
    base = [digits(s) for s in range(4)]
    poses = {
        k: np.array(
            [
                e.pose.rotation_degrees
                for e in embed(stub, [png(np.rot90(d, k).copy()) for d in base], "align").embeddings
            ]
        )
        for k in range(4)
    }
    for k in (1, 2, 3):
        np.testing.assert_array_equal(poses[k], (poses[0] + 90 * k) % 360)


def large_blank_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")  # compresses to a few KB
    return buf.getvalue()


def _noise(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side), np.uint8)).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info


BAD_ITEMS = {
    "undecodable": (lambda: b"this is not an image", "not a decodable image"),
    "empty": (lambda: b"", "empty image data"),
    "oversized bytes": (lambda: _noise(600), "above the limit of 200000 bytes"),
    "too many pixels": (lambda: large_blank_png(1200, 1000), "above the limit of 1000000"),
}


@pytest.mark.parametrize("case", list(BAD_ITEMS))
def test_bad_item_names_its_index_and_a_concurrent_good_call_is_unaffected(stub, png, digits, case):
    make, message = BAD_ITEMS[case]
    bad = make()
    assert len(bad) < 4 << 20
    good = [png(digits(s)) for s in range(3)]
    with ThreadPoolExecutor(2) as pool:
        bad_call = pool.submit(embed, stub, [good[0], good[1], bad])
        good_call = pool.submit(embed, stub, good)
        with pytest.raises(grpc.RpcError) as caught:
            bad_call.result()
        assert len(good_call.result().embeddings) == 3
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("input 2: ") and message in err.details()
    info = error_info(err)
    assert (info.reason, info.metadata["index"]) == ("INVALID_INPUT", "2")


def call_error(stub, request: pb.EmbedRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(request, timeout=30)
    return caught.value


def test_wrong_modality_names_the_index(stub, png, digits):
    inputs = [*images(png(digits(0))), pb.Input(molecule=pb.Molecule(smiles="CCO"))]
    err = call_error(stub, pb.EmbedRequest(model=MODEL, inputs=inputs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert (info.reason, info.metadata["index"]) == ("WRONG_MODALITY", "1")
    err = call_error(stub, pb.EmbedRequest(model=MODEL, inputs=[pb.Input()]))
    assert (
        err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).metadata["index"] == "0"
    )


def test_request_level_errors(stub, png, digits):
    one = images(png(digits(0)))
    err = call_error(stub, pb.EmbedRequest(model="no-such-model", inputs=one))
    assert err.code() == grpc.StatusCode.NOT_FOUND and "tiny-c4" in err.details()
    err = call_error(stub, pb.EmbedRequest(model=MODEL, inputs=one, projection="median"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "align, maxfilter, mean, max, raw" in err.details()
    err = call_error(stub, pb.EmbedRequest(model=MODEL))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "no inputs" in err.details()
    err = call_error(stub, pb.EmbedRequest(model=MODEL, inputs=one * (MAX_INPUTS + 1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == (
        "TOO_MANY_INPUTS"
    )


def test_stream_answers_in_order_with_errors_inside(stub, png, digits):
    good = png(digits(1))
    requests = [
        pb.EmbedRequest(model=MODEL, inputs=images(*[good] * n), request_id=f"r{i}")
        for i, n in enumerate([12, 1, 5, 1])
    ]
    requests.insert(2, pb.EmbedRequest(model=MODEL, inputs=images(good, b"junk"), request_id="bad"))
    requests.insert(4, pb.EmbedRequest(model="nope", inputs=images(good), request_id="gone"))
    answers = list(stub.EmbedStream(iter(requests), timeout=60))
    assert [a.request_id for a in answers] == [r.request_id for r in requests]
    kinds = [a.WhichOneof("result") for a in answers]
    assert kinds == ["response", "response", "error", "response", "error", "response"]
    assert [len(a.response.embeddings) for a in answers if a.HasField("response")] == [12, 1, 5, 1]
    assert answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info = error_details_pb2.ErrorInfo()
    assert answers[2].error.details[0].Unpack(info) and info.metadata["index"] == "1"
    assert answers[4].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert answers[0].response.request_id == "r0"
