"""The real entry point: ``quotient-server`` as a subprocess, health SERVING, Embed, SIGTERM, clean
exit. The process group is always killed at the end, whatever happened."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotient.v1 import embedding_service_pb2 as pb
from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_service.servicer import SERVICE_NAME

ENTRY_POINT = Path(sys.executable).parent / "quotient-server"
STARTUP_TIMEOUT_S = 60.0


@pytest.fixture
def server(tiny_model_store, pick_port, tmp_path) -> Iterator[tuple[subprocess.Popen, int, int]]:
    port, metrics_port = pick_port(), pick_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed in finally
    env = {**os.environ, "QUOTIENT_LOG_LEVEL": "DEBUG", "QUOTIENT_SHUTDOWN_GRACE_S": "2"}
    proc = subprocess.Popen(
        [
            str(ENTRY_POINT),
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
            "--model-store",
            str(tiny_model_store),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        yield proc, port, metrics_port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        log.close()
        print((tmp_path / "server.log").read_text()[-4000:])  # shown when the test fails


def wait_serving(channel: grpc.Channel, proc: subprocess.Popen) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode} during start-up"
        try:
            request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            if health.Check(request, timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    pytest.fail(f"not SERVING after {STARTUP_TIMEOUT_S} s")


def test_serve_embed_and_terminate_cleanly(server, png, digits):
    proc, port, metrics_port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        wait_serving(channel, proc)
        startup = time.monotonic() - started
        stub = pb_grpc.EmbeddingServiceStub(channel)
        inputs = [pb.Input(image=pb.Image(data=png(digits(s)))) for s in range(3)]
        response = stub.Embed(pb.EmbedRequest(model="tiny-c4", inputs=inputs), timeout=30)
        assert len(response.embeddings) == 3 and response.projection == "align"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        assert b'quotient_requests_total{code="OK",method="Embed",model="tiny-c4"}' in r.read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert startup < 30, f"start-up took {startup:.1f} s"


def test_bad_flag_exits_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [str(ENTRY_POINT), "--max-batch-items", "lots"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "--max-batch-items / QUOTIENT_MAX_BATCH_ITEMS" in result.stderr
