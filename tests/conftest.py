"""Shared test set-up: markers from the path, the tiny model store, servers on a private loop.

Markers: a test under tests/unit is ``unit``, under tests/integration ``integration``, under
tests/e2e ``e2e`` (``--strict-markers`` is on, so the names are registered in pyproject.toml).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

T = TypeVar("T")
_KINDS = ("unit", "integration", "e2e", "fuzz", "reliability")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in _KINDS:
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


# ---------------------------------------------------------------- models and inputs


@pytest.fixture(scope="session")
def tiny_model_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store holding the tiny C4 test model ("tiny-c4"); written once per session."""
    from quotient_models.testing import write_tiny_image_model

    root = tmp_path_factory.mktemp("models")
    write_tiny_image_model(root / "tiny-c4")
    return root


@pytest.fixture(scope="session")
def three_model_store(tiny_model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-c4 under three names (copies with a renamed model.json), for paging tests."""
    root = tmp_path_factory.mktemp("models3")
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        shutil.copytree(tiny_model_store / "tiny-c4", root / name)
        spec = json.loads((root / name / "model.json").read_text())
        spec["name"] = name
        (root / name / "model.json").write_text(json.dumps(spec))
    return root


def encode_png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def digit(seed: int, size: int = 28) -> np.ndarray:
    """A dark uint8 image with an asymmetric bright blob (MNIST polarity)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((size, size), np.uint8)
    top, left = rng.integers(3, 10, 2)
    img[top : top + 12, left : left + 8] = rng.integers(100, 255, (12, 8))
    img[top : top + 3, left : left + 14] = 255
    return img


@pytest.fixture(scope="session")
def png() -> Callable[[np.ndarray], bytes]:
    """Encodes a uint8 array as PNG bytes."""
    return encode_png


@pytest.fixture(scope="session")
def digits() -> Callable[[int], np.ndarray]:
    """``digits(seed)``: a 28x28 uint8 test image."""
    return digit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pick_port() -> Callable[[], int]:
    return free_port


# ---------------------------------------------------------------- an asyncio loop in a thread


class LoopThread:
    """An event loop in a daemon thread, so synchronous tests can use real grpc.aio servers and
    plain (sync) gRPC client channels."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


class ServiceHandle:
    """A started quotient server (create_server + App.start) on ``loop_thread``."""

    def __init__(self, lt: LoopThread, **settings: Any) -> None:
        from quotient_service.config import Settings
        from quotient_service.server import create_server

        self.lt = lt
        self.settings = Settings(**{"port": 0, "metrics_port": 0, **settings})
        self.server, self.port, self.app = lt.run(create_server(self.settings))
        lt.run(self.app.start())
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.lt.run(self.app.stop(0))


COMMITTED_MODELS = Path(__file__).resolve().parents[1] / "model_store" / "models"


@pytest.fixture(scope="session")
def one_model_per_modality(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed rotmnist-c8 and qm9-vae (links), without druglike-vae: the store of tests
    written for a server with one model per modality (the SDK picks a modality's model only when
    it is the server's only one). druglike-vae has its own store in test_service_druglike.py, and
    the container test serves all three."""
    root = tmp_path_factory.mktemp("store-one-per-modality")
    for name in ("qm9-vae", "rotmnist-c8"):
        (root / name).symlink_to(COMMITTED_MODELS / name, target_is_directory=True)
    return root


@pytest.fixture(scope="session")
def start_service(
    loop_thread: LoopThread, one_model_per_modality: Path
) -> Iterator[Callable[..., ServiceHandle]]:
    """``start_service(**settings)`` starts a server on port 0; all are stopped at the end.
    Without ``model_store`` it serves ``one_model_per_modality``."""
    started: list[ServiceHandle] = []

    def start(**settings: Any) -> ServiceHandle:
        settings.setdefault("model_store", str(one_model_per_modality))
        handle = ServiceHandle(loop_thread, **settings)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


# ---------------------------------------------------------------- a TorchServe-backed server


@contextlib.contextmanager
def torchserve_service(
    lt: LoopThread, store: Path, tmp_path_factory: pytest.TempPathFactory, **overrides: Any
) -> Iterator[str]:
    """Archive every model under ``store``, start our server with ``--backend torchserve`` on free
    loopback ports (``overrides``: other settings), yield its target; on exit stop it and check no
    TorchServe process is left."""
    import subprocess
    import sys

    from quotient_service.config import Settings
    from quotient_service.server import create_server

    archives = tmp_path_factory.mktemp("ts-archives")
    for model_dir in sorted(p.parent for p in store.glob("*/model.json")):
        cmd = [sys.executable, "-m", "quotient_models.archive", "--model-dir", str(model_dir)]
        subprocess.run([*cmd, "--export-path", str(archives)], check=True, capture_output=True)
    workdir = tmp_path_factory.mktemp("ts-work")
    grpc_port, grpc_mgmt, http, mgmt, metrics = (free_port() for _ in range(5))
    settings = Settings(
        port=0, metrics_port=0, backend="torchserve", model_store=str(store),
        archive_dir=str(archives), torchserve_workdir=str(workdir),
        torchserve_grpc_port=grpc_port, torchserve_grpc_management_port=grpc_mgmt,
        torchserve_inference_port=http, torchserve_management_port=mgmt,
        torchserve_metrics_port=metrics, torchserve_startup_timeout_s=120.0, **overrides,
    )  # fmt: skip
    _, port, app = lt.run(create_server(settings))
    try:
        lt.run(app.start(), timeout=settings.torchserve_startup_timeout_s + 30)
        yield f"127.0.0.1:{port}"
    finally:
        lt.run(app.stop(0), timeout=60)
    leftovers = [p for p in Path("/proc").glob("[0-9]*/cmdline") if _mentions(p, str(workdir))]
    assert not leftovers, f"TorchServe processes left behind: {leftovers}"


def _mentions(cmdline: Path, text: str) -> bool:
    """Whether a live (not zombie) process's command line contains ``text``."""
    try:
        alive = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        return alive and text.encode() in cmdline.read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="session")
def torchserve_service_at(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Path], contextlib.AbstractContextManager[str]]:
    """``with torchserve_service_at(store, **settings) as target:`` a TorchServe-backed server of
    ``store``."""
    return lambda store, **overrides: torchserve_service(
        loop_thread, store, tmp_path_factory, **overrides
    )


# ---------------------------------------------------------------- certificates for TLS tests


class Pki:
    """A test CA with a server certificate (localhost, 127.0.0.1) and a client certificate, and
    a second, unrelated CA with a client certificate of its own (a client the server must not
    trust). All made by ``openssl`` for the test session; paths are PEM files."""

    def __init__(self, root: Path) -> None:
        import subprocess

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        for ca in ("ca", "rogue-ca"):
            run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
                "-subj", f"/CN=Quotient test {ca}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
        leaves = {
            "server": ("ca", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                       "extendedKeyUsage=serverAuth\n"),
            "client": ("ca", "extendedKeyUsage=clientAuth\n"),
            "rogue-client": ("rogue-ca", "extendedKeyUsage=clientAuth\n"),
        }  # fmt: skip
        for name, (ca, ext) in leaves.items():
            (root / f"{name}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext")  # fmt: skip
        self.root = root

    def __getattr__(self, name: str) -> str:
        """``pki.server_pem``, ``pki.client_key``, ``pki.ca_pem``, ``pki.rogue_client_pem``, ..."""
        stem, _, ext = name.rpartition("_")
        path = self.root / f"{stem.replace('_', '-')}.{ext}"
        if not path.exists():
            raise AttributeError(name)
        return str(path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------- quotient-server as a subprocess

ENTRY_POINT = Path(sys.executable).parent / "quotient-server"
STARTUP_TIMEOUT_S = 60.0


class Launched:
    """``quotient-server`` started as a subprocess in its own process group, its output in a
    file (``output()``)."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = log_path.open("wb")
        full_env = {**os.environ, "QUOTIENT_LOG_LEVEL": "DEBUG", "QUOTIENT_SHUTDOWN_GRACE_S": "2"}
        self.proc = subprocess.Popen(
            [str(ENTRY_POINT), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**full_env, **(env or {})},
            start_new_session=True,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """``launch(*args, env=None)``: start ``quotient-server``; every one is killed at the end."""
    started: list[Launched] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Launched:
        started.append(Launched(list(args), tmp_path / f"server{len(started)}.log", env))
        return started[-1]

    yield start
    for launched in started:
        launched.kill()
        print(launched.output()[-4000:])  # shown when the test fails


def wait_serving(channel: Any, proc: subprocess.Popen) -> None:
    """Until health says SERVING (``proc`` must not exit meanwhile)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from quotient_service.servicer import SERVICE_NAME

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


# ---------------------------------------------------------------- vector-store servers (servers.py)


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL 18 server with pgvector on 127.0.0.1 for the session → its DSN."""
    from servers import start_postgres

    dsn, stop = start_postgres()
    yield dsn
    stop()


@pytest.fixture(scope="session")
def milvus_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Milvus 2.3 standalone server, reachable on 127.0.0.1 only, for the session → its
    ``http://127.0.0.1:PORT`` URI (``milvus://127.0.0.1:PORT`` for ``open_store``)."""
    from servers import start_milvus

    uri, stop = start_milvus(tmp_path_factory.mktemp("milvus"))
    yield uri
    stop()
