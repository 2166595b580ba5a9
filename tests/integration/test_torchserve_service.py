"""The public gRPC API with ``--backend torchserve`` against the same API with the embedded backend:
same embeddings (max relative difference 1e-5) and poses for every projection, and a bad input
answered the same way. One TorchServe start for the module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from quotient.v1 import embedding_service_pb2 as pb
from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_models.invariance import relative_change

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-c4"
PROJECTIONS = ["align", "maxfilter", "mean", "max", "raw"]


@pytest.fixture(scope="module")
def torchserve_target(torchserve_service_at, tiny_model_store: Path) -> Iterator[str]:
    with torchserve_service_at(tiny_model_store, health_check_interval_s=0.5) as target:
        yield target


@pytest.fixture(scope="module")
def embedded_target(start_service, tiny_model_store: Path) -> str:
    return start_service(model_store=str(tiny_model_store)).target


def embed(target: str, data: list[bytes], projection: str) -> pb.EmbedResponse:
    with grpc.insecure_channel(target) as channel:
        request = pb.EmbedRequest(
            model=MODEL,
            projection=projection,
            inputs=[pb.Input(image=pb.Image(data=d)) for d in data],
        )
        return pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=60)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_both_backends_give_the_same_embeddings(
    torchserve_target: str, embedded_target: str, png, digits, projection: str
) -> None:
    data = [png(np.rot90(digits(s), s % 4).copy()) for s in range(9)]
    ts, emb = embed(torchserve_target, data, projection), embed(embedded_target, data, projection)
    ts_values = np.array([e.values for e in ts.embeddings], dtype=np.float32)
    emb_values = np.array([e.values for e in emb.embeddings], dtype=np.float32)
    assert ts_values.shape == emb_values.shape == (9, ts_values.shape[1])
    assert relative_change(emb_values, ts_values).max() <= 1e-5
    assert [e.pose.rotation_degrees for e in ts.embeddings] == [
        e.pose.rotation_degrees for e in emb.embeddings
    ]
    assert (ts.projection, ts.invariant) == (emb.projection, emb.invariant)


def test_a_bad_input_is_answered_alike(
    torchserve_target: str, embedded_target: str, png, digits
) -> None:
    data = [png(digits(0)), b"not an image"]
    codes = []
    for target in (torchserve_target, embedded_target):
        with pytest.raises(grpc.RpcError) as info:
            embed(target, data, "align")
        # the reason names the item; its tail may hold an object address, so compare the head
        codes.append((info.value.code(), info.value.details().split(":")[0]))
    assert codes[0] == codes[1] == (grpc.StatusCode.INVALID_ARGUMENT, "input 1")
    # and TorchServe still serves afterwards
    assert len(embed(torchserve_target, data[:1], "align").embeddings) == 1


def test_health_turns_not_serving_when_torchserve_dies(torchserve_target: str, png, digits) -> None:
    """Last in the module: it kills this module's TorchServe (the JVM, SIGKILL)."""
    import os
    import signal
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quotient_service.servicer import SERVICE_NAME

    jvms = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b"org.pytorch.serve.ModelServer" in _read(p) and "ts-work" in _cwd(p.parent)
    ]
    assert len(jvms) == 1, jvms
    with grpc.insecure_channel(torchserve_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status  # noqa: E731
        assert check() == health_pb2.HealthCheckResponse.SERVING
        os.kill(jvms[0], signal.SIGKILL)
        killed = time.monotonic()
        while check() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - killed < 15, "health still SERVING 15 s after the kill"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as caught:
            request = pb.EmbedRequest(
                model=MODEL, inputs=[pb.Input(image=pb.Image(data=png(digits(0))))]
            )
            pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _cwd(proc: Path) -> str:
    try:
        return os.readlink(proc / "cwd")
    except OSError:
        return ""
