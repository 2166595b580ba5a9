"""The TorchServe backend against a real TorchServe (Java frontend, Python worker) on loopback.

One TorchServe start serves the whole module (start-up takes seconds to tens of seconds); the
archive of the tiny test model is built with the same CLI the Makefile runs. Its inference token
lives 3 s (``TOKEN_MIN``), so every test here also runs across token renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from quotient_models import serving
from quotient_models.invariance import relative_change
from quotient_models.runtime import load_model
from quotient_models.testing import write_tiny_image_model
from quotient_service.backends.torchserve import TorchServeBackend, TorchServeError, _map_error
from quotient_service.config import Settings
from quotient_service.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-c4"
PROJECTIONS = ["align", "maxfilter", "mean", "max", "raw"]
TOKEN_MIN = 0.05  # TorchServe's token_expiration_min: inference keys live 3 s
LOGGER = "quotient_service.backends.torchserve"


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


def key_file(backend: TorchServeBackend) -> dict[str, dict[str, str]]:
    keys: dict[str, dict[str, str]] = json.loads((backend.workdir / "key_file.json").read_text())
    return keys


def group_member(pgid: int, marker: bytes) -> int:
    """The pid of the one live process of the group whose command line holds ``marker``."""
    members = live_group_members(pgid)
    found = [pid for pid in members if marker in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(found) == 1, found
    return found[0]


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
    b = TorchServeBackend(torchserve_settings(root, torchserve_token_expiration_min=TOKEN_MIN))
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


def test_a_replaced_token_is_read_again(backend: TorchServeBackend, loop) -> None:
    backend._key = "replaced"  # what a call sees after a restarted TorchServe wrote new keys
    assert loop.run_until_complete(backend.run(MODEL, batch()))
    assert backend._key == key_file(backend)["inference"]["key"]


def test_the_token_is_renewed_before_it_expires(backend: TorchServeBackend, loop, caplog) -> None:
    """Calls for three token lifetimes all succeed: the supervisor renews the key at 80%."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    first = key_file(backend)["inference"]["key"]

    async def calls(seconds: float) -> list[str]:
        outcomes, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                await backend.run(MODEL, batch(2))
                outcomes.append("OK")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.1)
        return outcomes

    outcomes = loop.run_until_complete(calls(3 * TOKEN_MIN * 60))
    assert set(outcomes) == {"OK"}, [o for o in outcomes if o != "OK"][:3]
    due = [r.getMessage() for r in caplog.records if "token renewed (due" in r.getMessage()]
    assert len(due) >= 2, due
    assert key_file(backend)["inference"]["key"] not in (first, None)


def test_an_expired_token_is_renewed_through_the_token_api(
    backend: TorchServeBackend, loop, caplog
) -> None:
    """No proactive renewal, the key expires: the refused call renews it (POST /token with the
    API key) and is retried, so it succeeds."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    loop.run_until_complete(backend.run(MODEL, batch()))
    backend._renew_at = None  # the supervisor (its loop is idle now anyway) will not renew
    stale = backend._key
    time.sleep(TOKEN_MIN * 60 + 0.5)
    assert loop.run_until_complete(backend.run(MODEL, batch()))
    assert backend._key != stale
    assert backend._key == key_file(backend)["inference"]["key"]
    assert any("token renewed (refused" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_token_lifetime_under_two_seconds_is_refused(root: Path, loop) -> None:
    b = TorchServeBackend(torchserve_settings(root, torchserve_token_expiration_min=0.02))
    with pytest.raises(TorchServeError, match="under 2 s"):
        loop.run_until_complete(b.start())
    assert b._proc is None


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


NO_WORKER = (
    'Model "tiny-c4" has no worker to serve inference request. Please use scale workers API to '
    "add workers. If this is a sequence inference, please check if it is closed, or expired; or "
    "exceeds maxSequenceJobQueueSize\norg.pytorch.serve.http.ServiceUnavailableException"
)


@pytest.mark.parametrize(
    ("code", "details", "in_flight", "kind", "reason"),
    [
        # TorchServe 0.12, measured: a worker SIGKILLed under a batch (exit 137 reads as OOM)
        ("RESOURCE_EXHAUSTED", "Worker died.\norg.pytorch.serve.http.InternalServerException",
         1, Unavailable, "NO_WORKER"),
        ("INTERNAL", "Worker died.", 1, Unavailable, "NO_WORKER"),  # any other worker exit
        ("INTERNAL", NO_WORKER, 1, Unavailable, "NO_WORKER"),  # no worker registered
        ("INTERNAL", NO_WORKER, 101, ResourceExhausted, "QUEUE_FULL"),  # job queue (100) full
        ("RESOURCE_EXHAUSTED", "something else", 1, ResourceExhausted, "QUEUE_FULL"),
    ],
    ids=["worker-killed", "worker-died", "no-worker", "queue-full", "other-exhausted"],
)  # fmt: skip
def test_torchserve_errors_map_to_ours(
    code: str, details: str, in_flight: int, kind: type, reason: str
) -> None:
    mapped = _map_error(FakeRpcError(grpc.StatusCode[code], details), MODEL, in_flight)
    assert type(mapped) is kind
    assert mapped.reason == reason  # type: ignore[attr-defined]
    assert "org.pytorch" not in str(mapped)


def test_a_hung_torchserve_is_restarted(backend: TorchServeBackend, loop, caplog) -> None:
    """A JVM that stops answering (SIGSTOP) is killed and replaced after three unanswered Pings;
    meanwhile calls are UNAVAILABLE and ready() is False."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert backend._proc is not None
    old_pgid = backend._proc.pid
    jvm = group_member(old_pgid, b"org.pytorch.serve.ModelServer")
    restarts = backend.restarts
    os.kill(jvm, signal.SIGSTOP)
    stopped = time.monotonic()

    async def until_restarted() -> list[str]:
        codes = []
        while backend.restarts == restarts:
            assert time.monotonic() - stopped < 60, "no restart 60 s after SIGSTOP"
            try:
                await backend.run(MODEL, batch())
                codes.append("OK")
            except Exception as exc:
                codes.append(f"{type(exc).__name__}/{getattr(exc, 'reason', '')}")
            await asyncio.sleep(0.5)
        return codes

    try:
        codes = loop.run_until_complete(until_restarted())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(jvm, signal.SIGCONT)
    tally = dict(Counter(codes))
    print(
        f"\nSIGSTOP of the JVM: restarted after {time.monotonic() - stopped:.1f} s; calls: {tally}"
    )
    assert live_group_members(old_pgid) == []  # the hung group is gone
    assert {c.split("/")[0] for c in codes} <= {"Unavailable", "DeadlineExceeded", "OK"}
    assert loop.run_until_complete(backend.ready())
    assert loop.run_until_complete(backend.run(MODEL, batch()))
    died = [r for r in caplog.records if r.getMessage().startswith("TorchServe died")]
    assert len(died) == 1 and "Pings in a row failed" in died[0].getMessage()
    assert died[0].levelno == logging.ERROR


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
