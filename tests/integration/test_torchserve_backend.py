"""The TorchServe backend against a real TorchServe (Java frontend, Python worker) on loopback.

One TorchServe start serves the whole module (start-up takes seconds to tens of seconds); the
archive of the tiny test model is built with the same CLI the Makefile runs.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quotient_models import serving
from quotient_models.invariance import relative_change
from quotient_models.runtime import load_model
from quotient_models.testing import write_tiny_image_model
from quotient_service.backends.torchserve import TorchServeBackend, TorchServeError
from quotient_service.config import Settings
from quotient_service.errors import InvalidArgument, NotFound

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-c4"
PROJECTIONS = ["align", "maxfilter", "mean", "max", "raw"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def torchserve_settings(root: Path, **overrides: object) -> Settings:
    grpc_port, grpc_mgmt, http, mgmt, metrics = free_ports(5)
    values: dict[str, object] = {
        "backend": "torchserve",
        "model_store": str(root / "models"),
        "archive_dir": str(root / "archives"),
        "torchserve_workdir": str(root / "ts"),
        "torchserve_grpc_port": grpc_port,
        "torchserve_grpc_management_port": grpc_mgmt,
        "torchserve_inference_port": http,
        "torchserve_management_port": mgmt,
        "torchserve_metrics_port": metrics,
        "torchserve_startup_timeout_s": 120.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention ``text`` (the instance's private paths)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in args and state != "Z":
            found.append(args)
    return found


def live_group_members(pgid: int) -> list[int]:
    """Pids of live processes in a process group (zombies await their reaper and are harmless)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(stat.parent.name))
    return pids


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ts")
    write_tiny_image_model(root / "models" / MODEL)
    cmd = [
        sys.executable, "-m", "quotient_models.archive",
        "--model-dir", str(root / "models" / MODEL), "--export-path", str(root / "archives"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"built {root / 'archives' / MODEL}.mar" in done.stdout
    return root


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def backend(root: Path, loop: asyncio.AbstractEventLoop) -> Iterator[TorchServeBackend]:
    b = TorchServeBackend(torchserve_settings(root))
    loop.run_until_complete(b.start())
    print(f"\nTorchServe ready after {b.startup_seconds:.1f} s")
    yield b
    loop.run_until_complete(b.stop())


def batch(n: int = 5, seed: int = 0, projection: str = "align") -> bytes:
    x = np.random.default_rng(seed).random((n, 1, 28, 28), dtype=np.float32)
    return serving.encode_batch({"image": x}, projection)


def test_archive_cli_is_idempotent(root: Path) -> None:
    cmd = [
        sys.executable, "-m", "quotient_models.archive",
        "--model-dir", str(root / "models" / MODEL), "--export-path", str(root / "archives"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (root / "archives").iterdir()) == [f"{MODEL}.mar"]


def test_start_fails_clearly_without_archives(root: Path, tmp_path: Path, loop) -> None:
    b = TorchServeBackend(torchserve_settings(root, archive_dir=str(tmp_path)))
    with pytest.raises(TorchServeError, match="make archives"):
        loop.run_until_complete(b.start())
    loop.run_until_complete(b.stop())


def test_start_fails_clearly_without_java(root: Path, tmp_path: Path, loop) -> None:
    b = TorchServeBackend(torchserve_settings(root, torchserve_java=str(tmp_path / "no-java")))
    with pytest.raises(TorchServeError, match="java not found"):
        loop.run_until_complete(b.start())


def test_start_fails_with_the_log_when_torchserve_exits(root: Path, loop) -> None:
    settings = torchserve_settings(root, torchserve_workdir=str(root / "ts-port-taken"))
    with socket.socket() as taken:  # TorchServe cannot bind its HTTP inference port and exits
        taken.bind(("127.0.0.1", settings.torchserve_inference_port))
        taken.listen()
        b = TorchServeBackend(settings)
        with pytest.raises(TorchServeError, match="exited") as info:
            loop.run_until_complete(b.start())
    assert "Address already in use" in str(info.value)  # the tail of TorchServe's log
    assert processes_mentioning(str(root / "ts-port-taken")) == []


def test_start_fails_with_the_traceback_when_the_handler_cannot_load(root: Path, loop) -> None:
    broken = root / "broken_handler.py"
    handler = (
        Path(__file__).resolve().parents[2] / "model_store" / "handlers" / "quotient_handler.py"
    )
    broken.write_text(
        handler.read_text().replace(
            "props = context.system_properties", "raise RuntimeError('no weights here')"
        )
    )
    cmd = [
        sys.executable, "-m", "quotient_models.archive",
        "--model-dir", str(root / "models" / MODEL),
        "--export-path", str(root / "broken-archives"), "--handler", str(broken),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    settings = torchserve_settings(
        root, archive_dir=str(root / "broken-archives"), torchserve_workdir=str(root / "ts-broken")
    )
    with pytest.raises(TorchServeError, match="failing to load") as info:
        loop.run_until_complete(TorchServeBackend(settings).start())
    assert "RuntimeError: no weights here" in str(info.value)
    assert processes_mentioning(str(root / "ts-broken")) == []


def test_ready_and_models(backend: TorchServeBackend, loop) -> None:
    assert loop.run_until_complete(backend.ready())
    models = backend.models()
    assert list(models) == [MODEL]
    assert [p.name for p in models[MODEL].projections()] == PROJECTIONS
    assert (backend.workdir / "config.properties").read_text().count(
        "disable_token_authorization=false"
    ) == 1


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_same_embeddings_as_in_process(
    backend: TorchServeBackend, root: Path, loop, projection: str
) -> None:
    payload = batch(7, seed=1, projection=projection)
    want = serving.decode_output(
        serving.handle_payload(load_model(root / "models" / MODEL), payload)
    )
    got = serving.decode_output(loop.run_until_complete(backend.run(MODEL, payload)))
    assert got.values.shape == want.values.shape
    assert relative_change(want.values, got.values).max() <= 1e-5
    if want.poses is None:
        assert got.poses is None
    else:
        np.testing.assert_array_equal(got.poses, want.poses)


def test_concurrent_batches(backend: TorchServeBackend, loop) -> None:
    async def many() -> list[bytes]:
        return await asyncio.gather(*(backend.run(MODEL, batch(2, seed=s)) for s in range(8)))

    answers = loop.run_until_complete(many())
    assert [serving.decode_output(a).values.shape[0] for a in answers] == [2] * 8


@pytest.mark.parametrize(
    ("payload", "words"),
    [(b"garbage", "bad model batch"), (batch(projection="nope"), "no projection 'nope'")],
    ids=["garbage", "unknown-projection"],
)
def test_bad_payload_is_invalid_argument_and_backend_keeps_working(
    backend: TorchServeBackend, loop, payload: bytes, words: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        loop.run_until_complete(backend.run(MODEL, payload))
    assert words in info.value.message
    assert "org.pytorch" not in info.value.message  # TorchServe's Java class line is dropped
    assert (
        serving.decode_output(loop.run_until_complete(backend.run(MODEL, batch()))).values.shape[0]
        == 5
    )


def test_unknown_model_is_not_found(backend: TorchServeBackend, loop) -> None:
    with pytest.raises(NotFound):
        loop.run_until_complete(backend.run("nope", batch()))


def test_an_expired_token_is_read_again(backend: TorchServeBackend, loop) -> None:
    backend._key = "expired"  # what a call sees after TorchServe rotated its keys
    assert loop.run_until_complete(backend.run(MODEL, batch()))
    assert backend._key != "expired"


def test_stop_leaves_no_process(backend: TorchServeBackend, loop) -> None:
    pgid = backend._proc.pid if backend._proc else None
    assert pgid is not None
    marker = str(backend._tmp)
    assert any("java" in p for p in processes_mentioning(marker))  # the JVM and its worker
    loop.run_until_complete(backend.stop())
    assert processes_mentioning(marker) == []
    assert live_group_members(pgid) == []
    assert not loop.run_until_complete(backend.ready())
    loop.run_until_complete(backend.stop())  # idempotent
