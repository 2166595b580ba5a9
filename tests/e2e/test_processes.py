"""``quotient-server --processes N``: N real server processes on one port under a supervisor
(processes.py), started as ``make serve`` starts the server, on loopback."""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import wait_serving

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_service.config import ConfigError, load_settings

CONNECTIONS = 12  # the kernel spreads connections: all on one of 2 processes has p = 2**-11


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(c) for c in text.split()]


def _established_ports(pid: int) -> set[int]:
    """Local ports of the ESTABLISHED TCP sockets process ``pid`` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with_target = os.readlink(fd) if fd.is_symlink() else ""
        if with_target.startswith("socket:["):
            inodes.add(with_target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01 = ESTABLISHED
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _channel(port: int) -> grpc.Channel:
    # its own subchannel pool: a connection of its own, as a separate client has
    own = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=own)


def _metric(port: int, line_start: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(line_start))


def test_two_processes_share_the_port_answer_alike_and_sum_their_metrics(
    launch, pick_port, tiny_model_store, png, digits
):
    port, health, metrics = pick_port(), pick_port(), pick_port()
    ports = ["--port", str(port), "--health-port", str(health), "--metrics-port", str(metrics)]
    launched = launch("--processes", "2", *ports, "--model-store", str(tiny_model_store))
    channels = [_channel(port) for _ in range(CONNECTIONS)]
    try:
        for channel in channels:  # each connection SERVING: every process is ready
            wait_serving(channel, launched.proc)
        children = _children(launched.proc.pid)
        assert len(children) == 2, launched.output()
        inputs = [pb.Input(image=pb.Image(data=png(digits(s)))) for s in range(4)]
        request = pb.EmbedRequest(model="tiny-c4", inputs=inputs)

        def embed(channel: grpc.Channel) -> np.ndarray:
            answer = pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=30)
            return np.array([e.values for e in answer.embeddings])

        with ThreadPoolExecutor(CONNECTIONS) as pool:
            rows = list(pool.map(embed, channels * 3))
        for got in rows[1:]:  # the same answer from either process
            np.testing.assert_allclose(got, rows[0], rtol=1e-6, atol=1e-7)
        # both processes hold connections of these clients (the kernel spread them)
        assert all(port in _established_ports(child) for child in children), launched.output()
        # one /metrics for both: every item counted once
        assert _metric(metrics, 'quotient_items_total{model="tiny-c4"}') == len(rows) * 4
        assert _metric(metrics, "quotient_backend_up ") == 1.0
        # a health probe on the shared --health-port sees a SERVING process
        with grpc.insecure_channel(f"127.0.0.1:{health}") as probe:
            wait_serving(probe, launched.proc)
    finally:
        for channel in channels:
            channel.close()
    launched.proc.send_signal(signal.SIGTERM)  # passed on: each drains and stops
    assert launched.proc.wait(60) == 0, launched.output()
    assert not any(Path(f"/proc/{c}").exists() and _state(c) != "Z" for c in children)
    assert launched.output().count("draining: health NOT_SERVING") == 2


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_a_process_that_dies_stops_the_others_and_the_supervisor_fails(
    launch, pick_port, tiny_model_store
):
    port = pick_port()
    launched = launch("--processes", "2", "--port", str(port), "--metrics-port", "0",
                      "--model-store", str(tiny_model_store))  # fmt: skip
    with _channel(port) as channel:
        wait_serving(channel, launched.proc)
    children = _children(launched.proc.pid)
    os.kill(children[0], signal.SIGKILL)  # a crash
    assert launched.proc.wait(60) == 1, launched.output()
    assert f"server process {children[0]} exited with status -9" in launched.output()
    assert _state(children[1]) in ("gone", "Z")


def test_a_port_another_process_holds_is_refused_not_shared(launch, tiny_model_store):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        launched = launch("--processes", "2", "--port", str(port), "--metrics-port", "0",
                          "--model-store", str(tiny_model_store))  # fmt: skip
        assert launched.proc.wait(30) == 1
    out = launched.output()
    assert "--port / QUOTIENT_PORT: cannot bind" in out and "in use" in out, out
    assert "listening on" not in out


def test_processes_need_the_embedded_backend():
    with pytest.raises(ConfigError, match="--processes / QUOTIENT_PROCESSES: 2 processes need"):
        load_settings(["--processes", "2", "--backend", "torchserve"], env={})
    with pytest.raises(ConfigError, match="must be positive"):
        load_settings(["--processes", "0"], env={})


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_server_processes_stop_when_their_supervisor_is_killed(
    launch, pick_port, tiny_model_store, when
):
    port = pick_port()
    launched = launch("--processes", "2", "--port", str(port), "--metrics-port", "0",
                      "--model-store", str(tiny_model_store))  # fmt: skip
    if when == "serving":
        with _channel(port) as channel:
            wait_serving(channel, launched.proc)
    deadline = time.monotonic() + 30
    while len(children := _children(launched.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # "starting": killed before its servers have imported anything
    launched.proc.kill()  # SIGKILL: nothing is passed on
    launched.proc.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_state(c) not in ("gone", "Z") for c in children):
        time.sleep(0.2)
    assert all(_state(c) in ("gone", "Z") for c in children), launched.output()
    assert launched.output().count(f"the supervisor (process {launched.proc.pid}) is gone") == 2
    with socket.socket() as again:  # nobody listens on the port any more
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
        again.bind(("127.0.0.1", port))
