"""The README's contract, run for real: its two commands, `.ci/run`, and its Python example.

`make serve` is started as a subprocess (what a newcomer types), once with the default embedded
backend and once with `QUOTIENT_BACKEND=torchserve`; the README's code block runs against the
first, and both must return the same embeddings for real MNIST test digits. The process groups
are always killed at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
MODEL = "rotmnist-c8"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quickstart_shows_exactly_the_two_commands():
    commands = [line.split("#")[0].strip() for line in code_blocks("bash")[0].splitlines()]
    assert [c for c in commands if c] == ["make serve", "make test"]


def test_ci_runs_exactly_the_readme_test_command():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    commands = [
        ln.strip()
        for ln in lines
        if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd "))
    ]
    assert commands == ["make test"]


class MakeServe:
    """`make serve` in its own process group, with free ports given through the environment."""

    def __init__(self, tmp: Path, pick_port, **env: str) -> None:
        self.port = pick_port()
        self.log_path = tmp / f"serve-{self.port}.log"
        variables = {
            "QUOTIENT_PORT": str(self.port),
            "QUOTIENT_METRICS_PORT": str(pick_port()),
            "QUOTIENT_SHUTDOWN_GRACE_S": "2",
            **env,
        }
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "serve"],
            cwd=REPO,
            env={**os.environ, **variables},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.target = f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(f"make serve exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        pytest.fail(f"make serve not SERVING after {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, pick_port) -> Iterator[MakeServe]:
    serve = MakeServe(tmp_path_factory.mktemp("serve"), pick_port)
    try:
        serve.wait_serving(timeout=120)
        yield serve
    finally:
        serve.stop()


def test_make_serve_runs_the_readme_example(embedded):
    block = code_blocks("python")[0].replace("127.0.0.1:50051", embedded.target)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    a, b = namespace["a"], namespace["b"]
    assert a.shape[0] == 1 and a.shape[1] > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(a).max())
    assert namespace["turn"] == pytest.approx(90.0)  # what the README says it prints


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("java") is None, reason="TorchServe needs a Java runtime (java not on PATH)"
)
def test_torchserve_backend_gives_the_same_embeddings(embedded, tmp_path, pick_port):
    from quotient_client import Client
    from quotient_models.images.data import load_mnist

    images = (load_mnist(REPO / "data" / "mnist")["test"][0][:32] * 255).round().astype(np.uint8)
    ports = {
        f"QUOTIENT_TORCHSERVE_{k}_PORT": str(pick_port())
        for k in ("GRPC", "GRPC_MANAGEMENT", "INFERENCE", "MANAGEMENT", "METRICS")
    }
    torchserve = MakeServe(
        tmp_path,
        pick_port,
        QUOTIENT_BACKEND="torchserve",
        QUOTIENT_TORCHSERVE_WORKDIR=str(tmp_path / "ts"),
        **ports,
    )
    try:
        torchserve.wait_serving(timeout=300)
        with Client(embedded.target) as a, Client(torchserve.target) as b:
            info = a.get_model(MODEL)
            for projection in [p.name for p in info.projections]:
                ea = a.embed_images(list(images), model=MODEL, projection=projection)
                eb = b.embed_images(list(images), model=MODEL, projection=projection)
                rel = np.abs(ea - eb).max() / max(np.abs(ea).max(), 1e-12)
                assert rel <= 1e-5, f"{projection}: backends differ by {rel:.2e} (relative)"
    finally:
        torchserve.stop()
