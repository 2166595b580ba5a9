"""The real entry point: ``quotient-server`` as a subprocess, health SERVING, Embed, SIGTERM, clean
exit. The process group is always killed at the end, whatever happened."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.request

import grpc
import pytest
from conftest import ENTRY_POINT, Launched, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc


@pytest.fixture
def server(tiny_model_store, pick_port, launch) -> tuple[subprocess.Popen, int, int]:
    port, metrics_port = pick_port(), pick_port()
    args = ["--port", str(port), "--metrics-port", str(metrics_port)]
    launched = launch(*args, "--model-store", str(tiny_model_store))
    return launched.proc, port, metrics_port


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


def exits_with_one_clear_line(launched: Launched, *expected: str) -> str:
    """The server exits 1 by itself (within 60 s), its output names ``expected``, no traceback."""
    assert launched.proc.wait(60) == 1
    out = launched.output()
    for text in expected:
        assert text in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
    return out


@pytest.mark.parametrize("store", ["typo", "empty"])
def test_a_model_store_without_models_refuses_to_start(launch, pick_port, tmp_path, store):
    path = tmp_path / store
    if store == "empty":
        path.mkdir()
    launched = launch("--port", str(pick_port()), "--metrics-port", "0", "--model-store", str(path))
    exits_with_one_clear_line(launched, "--model-store / QUOTIENT_MODEL_STORE", str(path))


def test_a_second_server_on_the_same_port_fails_at_once(server, launch, tiny_model_store):
    proc, port, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_serving(channel, proc)
    second = launch(
        "--port", str(port), "--metrics-port", "0", "--model-store", str(tiny_model_store)
    )
    exits_with_one_clear_line(second, "--port / QUOTIENT_PORT", f"127.0.0.1:{port}")
    assert proc.poll() is None  # the first one is untouched


def test_a_metrics_port_in_use_is_named(launch, pick_port, tiny_model_store):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        launched = launch("--port", str(pick_port()), "--metrics-port", str(taken),
                          "--model-store", str(tiny_model_store))  # fmt: skip
        exits_with_one_clear_line(launched, "--metrics-port / QUOTIENT_METRICS_PORT", str(taken))


def test_cuda_where_it_cannot_be_used_is_refused(launch, pick_port, tiny_model_store):
    from quotient_models.runtime import gpu_visible

    if gpu_visible():
        pytest.skip("an NVIDIA device is visible here: --device cuda may work")
    launched = launch("--port", str(pick_port()), "--metrics-port", "0", "--device", "cuda",
                      "--model-store", str(tiny_model_store))  # fmt: skip
    out = exits_with_one_clear_line(launched, "device 'cuda'", "--device cpu")
    assert "CUDA" in out


def test_help_lists_the_allowed_values_of_every_choice():
    import dataclasses

    from quotient_service.config import Settings

    result = subprocess.run([str(ENTRY_POINT), "--help"], capture_output=True, text=True)
    text = " ".join(result.stdout.split())
    for f in dataclasses.fields(Settings):
        if f.metadata["choices"]:
            assert f"one of: {', '.join(f.metadata['choices'])}" in text, f.name


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_float_setting_must_be_finite(value):
    result = subprocess.run(
        [str(ENTRY_POINT), f"--request-timeout-s={value}"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "--request-timeout-s / QUOTIENT_REQUEST_TIMEOUT_S: must be a finite number" in (
        result.stderr
    )


def test_sigterm_drains_before_it_stops(launch, pick_port, tiny_model_store, png, digits):
    """A poller every 20 ms sees SERVING, then NOT_SERVING for about the drain window (while
    Embed is still answered), then a refused connection; the server exits 0."""
    import threading

    port, drain = pick_port(), 1.5
    launched = launch("--port", str(port), "--metrics-port", "0", "--drain-s", str(drain),
                      "--model-store", str(tiny_model_store))  # fmt: skip
    seen: list[tuple[float, str]] = []
    done = threading.Event()

    def poll() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while not done.is_set():
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except grpc.RpcError as err:
                    state = err.code().name
                seen.append((time.monotonic(), state))
                time.sleep(0.02)

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_serving(channel, launched.proc)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        time.sleep(0.3)
        launched.proc.send_signal(signal.SIGTERM)
        time.sleep(drain / 2)
        stub = pb_grpc.EmbeddingServiceStub(channel)
        request = pb.EmbedRequest(
            model="tiny-c4", inputs=[pb.Input(image=pb.Image(data=png(digits(0))))]
        )
        assert len(stub.Embed(request, timeout=10).embeddings) == 1  # still answering
        assert launched.proc.wait(30) == 0
        time.sleep(0.3)
        done.set()
        poller.join(5)
    states = [s for _, s in seen]
    compact = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert compact[:2] == ["SERVING", "NOT_SERVING"], compact
    assert compact[-1] == "UNAVAILABLE", compact
    not_serving = [t for t, s in seen if s == "NOT_SERVING"]
    assert not_serving[-1] - not_serving[0] >= drain * 0.8, "NOT_SERVING was not held for the drain"
