"""The public gRPC API with ``--backend torchserve`` against the same API with the embedded backend:
same embeddings (max relative difference 1e-5) and poses for every projection, and a bad input
answered the same way. One TorchServe start for the module."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from quotient.v1 import embedding_service_pb2 as pb
from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_models.invariance import relative_change
from quotient_service.config import Settings
from quotient_service.server import create_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-c4"
PROJECTIONS = ["align", "maxfilter", "mean", "max", "raw"]


@pytest.fixture(scope="module")
def archives(tiny_model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("archives")
    cmd = [
        sys.executable, "-m", "quotient_models.archive",
        "--model-dir", str(tiny_model_store / MODEL), "--export-path", str(out),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def torchserve_target(
    loop_thread, pick_port, tiny_model_store: Path, archives: Path, tmp_path_factory
) -> Iterator[str]:
    grpc_port, grpc_mgmt, http, mgmt, metrics = (pick_port() for _ in range(5))
    workdir = tmp_path_factory.mktemp("ts-service")
    settings = Settings(
        port=0, metrics_port=0, backend="torchserve", model_store=str(tiny_model_store),
        archive_dir=str(archives), torchserve_workdir=str(workdir),
        torchserve_grpc_port=grpc_port, torchserve_grpc_management_port=grpc_mgmt,
        torchserve_inference_port=http, torchserve_management_port=mgmt,
        torchserve_metrics_port=metrics, torchserve_startup_timeout_s=120.0,
    )  # fmt: skip
    _, port, app = loop_thread.run(create_server(settings))
    try:
        loop_thread.run(app.start(), timeout=settings.torchserve_startup_timeout_s + 30)
        yield f"127.0.0.1:{port}"
    finally:
        loop_thread.run(app.stop(0), timeout=60)
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if _mentions(p, str(workdir))]


def _mentions(cmdline: Path, text: str) -> bool:
    try:
        alive = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return alive and text.encode() in cmdline.read_bytes()
    except OSError:
        return False


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
