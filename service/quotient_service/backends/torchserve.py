"""The TorchServe backend: model batches run in TorchServe 0.12 on loopback, called over gRPC.

Lifecycle (see ``Backend``):
1. ``start()`` writes ``config.properties`` into the work directory, launches
   ``torchserve --start --foreground`` from this virtual environment in its own process group
   (output to ``<workdir>/torchserve.log``), then waits until ``Ping`` says Healthy and one warm-up
   batch per model succeeds, or fails with the log's tail and leaves no process behind; then it
   starts the supervisor (``_supervise``);
2. ``run()`` sends one model batch as ``Predictions(model_name, input={"body": payload})`` with the
   inference token and a deadline, and maps TorchServe's coarse errors to ours (``_map_error``);
3. ``stop()`` stops the supervisor, SIGTERMs the process group (Java frontend and Python workers)
   and SIGKILLs it after a grace period.

Token authorization stays on: TorchServe writes ``key_file.json`` into its working directory, with
an inference key that expires after ``--torchserve-token-expiration-min`` and an "API" key that
does not. The supervisor renews the inference key at 80% of its lifetime through TorchServe's token
API (``POST /token?type=inference`` on the management address, authorized by the API key; TorchServe
rewrites ``key_file.json``); a call refused with PERMISSION_DENIED renews it too, then is retried
once. The management key also expires; nothing here uses it.

Supervision: when the launcher exits (it does as soon as the JVM dies) or ``Ping`` fails
``_PING_FAILURES`` times in a row, the supervisor kills what is left of the group and starts
TorchServe again, after 1 s, then 2, 4, ... up to ``--torchserve-restart-backoff-max-s`` while it
keeps dying (the log of the run that died is kept as ``torchserve.log.1``). Meanwhile ``ready()``
is False and ``run()`` raises ``Unavailable`` (reason ``TORCHSERVE_RESTARTING``). A dead Python
worker is TorchServe's to restart; the batch it held fails ``Unavailable`` (reason ``NO_WORKER``).

Each instance keeps its own ``TMPDIR``: TorchServe's pid file, worker sockets and unpacked archives
live there, so two instances (tests, a second service) never see each other.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import grpc

from quotient_models.runtime import EmbeddingModel, load_model
from quotient_models.spec import ModelSpec
from quotient_service.backends.base import Backend, served_specs
from quotient_service.backends.embedded import warmup_payload
from quotient_service.config import Settings, resolve_repo_path
from quotient_service.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)

__all__ = ["TorchServeBackend", "TorchServeError", "inference_stubs"]

log = logging.getLogger(__name__)

_PROTO = "quotient_service/protos/inference.proto"
_PROTO_LOCK = threading.Lock()
_STOP_GRACE_S = 20.0  # TorchServe needs ~4 s to stop a worker and its JVM
_REQUEST_OVERHEAD = 1024  # PredictionsRequest bytes besides the payload (name, map framing)
_MODEL_LOG = "MODEL_LOG - "  # prefix of the Python worker's lines in TorchServe's output
_LOAD_FAILED = "MODEL_LOG - Failed to load model"  # ts/model_service_worker.py, on each attempt
_SOCKET_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes; TorchServe adds "/.ts.sock.9000"
_JOB_QUEUE_SIZE = 100  # TorchServe's default job_queue_size, written into config.properties
_KEY_FILE = "key_file.json"
_TOKEN_RENEW_AT = 0.8  # renew the inference key after this fraction of its lifetime
_TOKEN_MIN_S = 2  # TorchServe keeps whole seconds: a shorter lifetime expires keys at once
_TOKEN_RETRY_S = 2.0  # after a failed renewal, the next try
_TOKEN_HTTP_TIMEOUT_S = 2.0  # loopback: TorchServe answers in milliseconds
_SUPERVISE_TICK_S = 0.25  # how often the supervisor looks at the launcher
_PING_EVERY_S = 2.0
_PING_TIMEOUT_S = 2.0
_PING_FAILURES = 3  # Pings failed in a row before a running TorchServe counts as dead
_RESTART_BACKOFF_MIN_S = 1.0
_STABLE_AFTER_S = 60.0  # serving this long after a restart resets the restart back-off
_RESTARTING = "TORCHSERVE_RESTARTING"
_NO_WORKER = "NO_WORKER"


class TorchServeError(RuntimeError):
    """TorchServe did not start (the message carries the tail of its log) or answered oddly."""


class _ChannelClosed(grpc.RpcError):
    """A call that the supervisor's closing of the channel cancelled (a restart): it failed like
    any call to a TorchServe that went away, UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the channel to TorchServe was closed (a restart or stop)"


@cache
def inference_stubs() -> tuple[Any, Any]:
    """(messages, services) modules of our inference.proto, compiled at runtime by grpc_tools.

    The import paths are sys.path (google/rpc/status.proto comes with googleapis-common-protos)
    and grpc_tools' own protos; the root of this package is added for the duration of the import
    because an editable install does not put it on sys.path.
    """
    root = str(Path(__file__).resolve().parents[2])
    with _PROTO_LOCK:
        added = root not in sys.path
        if added:
            sys.path.append(root)
        try:
            return grpc.protos_and_services(_PROTO)
        finally:
            if added:
                sys.path.remove(root)


def _describe(err: grpc.RpcError) -> str:
    # TorchServe appends the Java exception class as a second line; keep the message only.
    details = (err.details() or "").split("\n", 1)[0].strip()  # type: ignore[attr-defined]
    return details or str(err.code())  # type: ignore[attr-defined]


def _map_error(err: grpc.RpcError, model: str, in_flight: int = 1) -> Exception:
    """TorchServe's gRPC error → our vocabulary. Measured against TorchServe 0.12.0:
    handler ``PredictionException(msg, 400)`` → INVALID_ARGUMENT; handler crash → UNAVAILABLE
    "Prediction failed"; the worker process dying under a batch → "Worker died."
    (RESOURCE_EXHAUSTED when it exited 137, i.e. SIGKILL, which TorchServe takes for the OOM
    killer; INTERNAL for any other exit, as the frontend's code reads); no worker and a full job
    queue → both INTERNAL "Model ... has no worker to serve inference request"
    (``ModelManager.addJob`` answers false for either), told apart here by the number of our
    calls in flight for the model (``in_flight``, this one included); unknown model/version →
    INTERNAL "Model not found"; MemoryError/CUDA → INTERNAL "Out of resources" (507); a request
    over ``max_request_size`` → CANCELLED; a refused token → PERMISSION_DENIED "Token
    Authorization failed" (``_call`` renews it first)."""
    code, message = err.code(), _describe(err)  # type: ignore[attr-defined]
    meta = {"backend": "torchserve", "model": model}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, reason="BAD_BATCH")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TorchServe did not answer in time ({model})")
    if message.startswith("Worker died"):
        return Unavailable(
            f"TorchServe's worker for {model} died running this batch (TorchServe restarts it); "
            "retry",
            reason=_NO_WORKER,
            metadata=meta,
        )
    if "has no worker to serve" in message:
        if in_flight > _JOB_QUEUE_SIZE:
            return ResourceExhausted(f"TorchServe's job queue for {model} is full", metadata=meta)
        return Unavailable(
            f"TorchServe has no worker for {model} right now; retry",
            reason=_NO_WORKER,
            metadata=meta,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"TorchServe cannot take more work for {model}", metadata=meta)
    if "Out of resources" in message:
        return ResourceExhausted(f"TorchServe ran out of memory running {model}", metadata=meta)
    if "not found" in message.lower() or "does not exist" in message:
        log.error("TorchServe does not serve %s: %s (archive out of date?)", model, message)
        return Unavailable(f"TorchServe does not serve model {model!r}", metadata=meta)
    if code in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return Unavailable(f"TorchServe could not run {model}: {message}", metadata=meta)
    log.error("unexpected TorchServe error for %s: %s %s", model, code, message)
    return TorchServeError(f"TorchServe answered {code.name}: {message}")


@dataclass(frozen=True)
class _Keys:
    """What ``key_file.json`` holds that we use."""

    inference: str
    api: str  # authorizes the token API; never expires
    expires: float | None  # the inference key's expiry (epoch seconds), if TorchServe wrote it


class TorchServeBackend(Backend):
    name = "torchserve"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.workdir = Path(settings.torchserve_workdir).resolve()
        self.log_path = self.workdir / "torchserve.log"
        self._specs: list[ModelSpec] | None = None
        self._models: dict[str, EmbeddingModel] = {}
        self._archive_paths: list[Path] = []
        self._java_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._ready = False
        self.startup_seconds: float | None = None
        # the token (see the module docstring)
        self._key: str | None = None
        self._api_key: str | None = None
        self._key_lock = asyncio.Lock()
        self._renew_at: float | None = None  # epoch seconds of the next proactive renewal
        self._renewal_failing = False  # logged once until a renewal succeeds
        # supervision
        self._supervisor: asyncio.Task[None] | None = None
        self._down_since: float | None = None  # monotonic; set while TorchServe is restarting
        self._serving_since = 0.0  # monotonic
        self._restarted = False  # the last start was a restart
        self._backoff_s = _RESTART_BACKOFF_MIN_S
        self._in_flight: Counter[str] = Counter()
        self.restarts = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        specs = self._discover()
        self._archive_paths = self._archives(specs)
        self._java_path = self._java()
        if self._token_lifetime_s() < _TOKEN_MIN_S:
            raise TorchServeError(
                "--torchserve-token-expiration-min / QUOTIENT_TORCHSERVE_TOKEN_EXPIRATION_MIN: "
                f"{self.settings.torchserve_token_expiration_min} min is under {_TOKEN_MIN_S} s"
            )
        began = time.monotonic()
        try:
            await self._bring_up(began)
        except BaseException:
            await self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.models()
        self._ready = True
        self._serving_since = time.monotonic()
        self._supervisor = asyncio.create_task(self._supervise(), name="torchserve-supervisor")
        log.info(
            "TorchServe serving %s after %.1f s (log: %s)",
            ", ".join(s.name for s in specs),
            self.startup_seconds,
            self.log_path,
        )

    async def stop(self) -> None:
        self._ready = False
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        self._down_since = None
        await self._close_channel()
        if self._proc is not None:
            await _terminate_group(self._proc, _STOP_GRACE_S)
            atexit.unregister(self._kill_now)
            log.info("TorchServe stopped (log: %s)", self.log_path)
            self._proc = None
        self._remove_tmp()

    def models(self) -> dict[str, EmbeddingModel]:
        if not self._models:
            # Preparation only: the encoders run in TorchServe.
            self._models = {s.name: load_model(s.directory, engine=None) for s in self._discover()}
        return dict(self._models)

    async def run(self, model_name: str, payload: bytes) -> bytes:
        if self._is_down():
            raise self._restarting(model_name)
        if not self._ready or self._stub is None:
            raise Unavailable("the TorchServe backend is not running")
        if model_name not in self._models:
            raise NotFound(f"model {model_name!r} is not loaded", metadata={"model": model_name})
        if len(payload) + _REQUEST_OVERHEAD > self.settings.max_message_bytes:
            raise ResourceExhausted(
                f"model batch of {len(payload)} bytes exceeds --max-message-bytes "
                f"({self.settings.max_message_bytes})",
                metadata={"model": model_name},
            )
        pb2, _ = inference_stubs()
        request = pb2.PredictionsRequest(model_name=model_name, input={"body": payload})
        self._in_flight[model_name] += 1
        try:
            response = await self._call(
                self._stub.Predictions, request, self.settings.request_timeout_s
            )
        except grpc.RpcError as err:
            if self._is_down():  # died under this call (the supervisor may not know yet)
                raise self._restarting(model_name) from None
            raise _map_error(err, model_name, self._in_flight[model_name]) from None
        finally:
            self._in_flight[model_name] -= 1
        return bytes(response.prediction)

    async def ready(self) -> bool:
        return self._ready and not self._is_down() and await self._healthy(timeout=2.0)

    def direct_access(self) -> tuple[str, tuple[tuple[str, str], ...], int | None]:
        """How a client reaches this TorchServe's gRPC inference API directly, as the plain
        TorchServe deployment ``make bench-serving`` compares us with: (target, call metadata
        with the current inference token, frontend process id)."""
        keys = self._read_keys()
        if keys is not None and keys.inference != self._key:
            self._use_keys(keys)
        metadata = (("authorization", f"Bearer {self._key}"),) if self._key else ()
        pid = self._proc.pid if self._proc is not None else None
        return f"127.0.0.1:{self.settings.torchserve_grpc_port}", metadata, pid

    # ------------------------------------------------------------------ start-up steps
    def _discover(self) -> list[ModelSpec]:
        if self._specs is None:
            self._specs = served_specs(self.settings)
        return self._specs

    def _archives(self, specs: list[ModelSpec]) -> list[Path]:
        archive_dir = resolve_repo_path(self.settings.archive_dir)
        archives = [archive_dir / f"{s.name}.mar" for s in specs]
        missing = [str(a) for a in archives if not a.is_file()]
        if missing:
            raise TorchServeError(f"missing TorchServe archives {missing}: run `make archives`")
        stale = [str(a) for a, s in zip(archives, specs, strict=True) if _older(a, s.directory)]
        if stale:
            log.warning(
                "archives older than their model directory: %s (run `make archives`)", stale
            )
        return archives

    def _java(self) -> Path:
        found = shutil.which(self.settings.torchserve_java)
        if not found:
            raise TorchServeError(
                f"java not found ({self.settings.torchserve_java!r}); TorchServe needs a Java 11+ "
                "runtime (Debian: openjdk-17-jre-headless) or --torchserve-java /path/to/bin/java"
            )
        return Path(found).resolve()

    async def _bring_up(self, began: float) -> None:
        """Launch TorchServe and wait until every model answers (``start`` and each restart)."""
        assert self._java_path is not None and self._archive_paths
        self._forget_keys()
        self._prepare_workdir()
        config = self._write_config(self._archive_paths)
        self._launch(config, self._archive_paths[0].parent, self._java_path)
        await self._connect()
        await self._wait_until_serving(
            self._discover(), began + self.settings.torchserve_startup_timeout_s
        )

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A stale key file would hand us an old token; stale sockets and pid files confuse
        # TorchServe.
        (self.workdir / _KEY_FILE).unlink(missing_ok=True)
        self._remove_tmp()
        tmp = self.workdir / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if len(str(tmp)) > _SOCKET_PATH_MAX - 20:
            tmp = Path(tempfile.mkdtemp(prefix="quotient-ts-"))
        tmp.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp

    def _remove_tmp(self) -> None:
        if self._tmp is not None and not self._tmp.is_relative_to(self.workdir):
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def _write_config(self, archives: list[Path]) -> Path:
        s = self.settings
        store = archives[0].parent
        lines = {
            "inference_address": f"http://127.0.0.1:{s.torchserve_inference_port}",
            "management_address": f"http://127.0.0.1:{s.torchserve_management_port}",
            "metrics_address": f"http://127.0.0.1:{s.torchserve_metrics_port}",
            "grpc_inference_address": "127.0.0.1",
            "grpc_inference_port": s.torchserve_grpc_port,
            "grpc_management_address": "127.0.0.1",
            "grpc_management_port": s.torchserve_grpc_management_port,
            "model_store": store,
            "load_models": ",".join(a.name for a in archives),
            "enable_model_api": "false",
            "allowed_urls": f"file://{store}/.*",
            "disable_token_authorization": "false",
            # read as a double; keys live int(minutes * 60) seconds
            "token_expiration_min": repr(float(s.torchserve_token_expiration_min)),
            "metrics_mode": "prometheus",
            "disable_system_metrics": "true",  # our service exports its own process metrics
            "max_request_size": s.max_message_bytes,
            "max_response_size": s.max_message_bytes,
            "default_workers_per_model": s.torchserve_workers_per_model,
            "job_queue_size": _JOB_QUEUE_SIZE,
        }
        path = self.workdir / "config.properties"
        body = "".join(f"{k}={v}\n" for k, v in lines.items())
        path.write_text("# written by quotient_service.backends.torchserve on every start\n" + body)
        return path

    def _launch(self, config: Path, store: Path, java: Path) -> None:
        venv_bin = Path(sys.executable).parent
        torchserve = venv_bin / "torchserve"
        if not torchserve.exists():
            raise TorchServeError(f"{torchserve} not found: install requirements/torchserve.txt")
        assert self._tmp is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("TS_")}
        env.update(
            PATH=os.pathsep.join([str(venv_bin), str(java.parent), env.get("PATH", "")]),
            JAVA_HOME=str(java.parent.parent),
            TMPDIR=str(self._tmp),  # the launcher's pid file (tempfile.gettempdir())
            TEMP=str(self._tmp),  # java.io.tmpdir: worker sockets, unpacked archives
            LOG_LOCATION=str(self.workdir / "logs"),
            METRICS_LOCATION=str(self.workdir / "logs"),
            PYTHONUNBUFFERED="1",
        )
        cmd = [
            str(torchserve), "--start", "--foreground", "--ncs",
            "--model-store", str(store),
            "--ts-config", str(config),
        ]  # fmt: skip
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        atexit.unregister(self._kill_now)
        atexit.register(self._kill_now)
        log.info("TorchServe starting (pid %d, log: %s)", self._proc.pid, self.log_path)

    async def _connect(self) -> None:
        limit = self.settings.max_message_bytes
        self._channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{self.settings.torchserve_grpc_port}",
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.enable_http_proxy", 0),  # loopback: never through $http_proxy
                # a restarted TorchServe is back within seconds: reconnect soon, not after 2 min
                ("grpc.initial_reconnect_backoff_ms", 250),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        _, services = inference_stubs()
        self._stub = services.InferenceAPIsServiceStub(self._channel)

    async def _close_channel(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None

    async def _wait_until_serving(self, specs: list[ModelSpec], deadline: float) -> None:
        pending = {s.name: warmup_payload(load_model(s.directory, engine=None)) for s in specs}
        pb2, _ = inference_stubs()
        healthy = False
        while pending:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise TorchServeError(
                    f"TorchServe exited (code {code}) during start-up\n{self._tail()}"
                )
            failure = self._load_failure()
            if failure:
                raise TorchServeError(
                    f"a model worker keeps failing to load:\n{failure}\n(log: {self.log_path})"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = (
                    "models not answering: " + ", ".join(pending) if healthy else "Ping not Healthy"
                )
                limit = self.settings.torchserve_startup_timeout_s
                raise TorchServeError(
                    f"TorchServe not ready after {limit:.0f} s ({state})\n{self._tail()}"
                )
            healthy = healthy or await self._healthy(timeout=min(2.0, remaining))
            if healthy:
                for name, payload in list(pending.items()):
                    request = pb2.PredictionsRequest(model_name=name, input={"body": payload})
                    try:
                        await self._call(
                            self._stub.Predictions, request, min(5.0, max(remaining, 0.1))
                        )
                        del pending[name]
                    except grpc.RpcError as err:
                        log.debug("warm-up of %s: %s %s", name, err.code(), _describe(err))  # type: ignore[attr-defined]
            if pending:
                await asyncio.sleep(0.25)

    # ------------------------------------------------------------------ supervision
    def _is_down(self) -> bool:
        """Whether TorchServe is restarting, or has died and the supervisor is about to notice."""
        if self._down_since is not None:
            return True
        started = self._supervisor is not None
        return started and (self._proc is None or self._proc.poll() is not None)

    def _restarting(self, model: str) -> Unavailable:
        down = 0.0 if self._down_since is None else time.monotonic() - self._down_since
        return Unavailable(
            f"TorchServe is restarting (down for {down:.1f} s); retry shortly",
            reason=_RESTARTING,
            metadata={"backend": "torchserve", "model": model},
        )

    async def _supervise(self) -> None:
        """Keep TorchServe serving: renew the token before it expires, restart TorchServe when
        it dies. Runs from ``start()`` until ``stop()`` cancels it; never stops on an error."""
        next_ping = time.monotonic() + _PING_EVERY_S
        unanswered: list[str] = []
        while True:
            wait = _SUPERVISE_TICK_S
            if self._renew_at is not None:
                wait = min(wait, max(self._renew_at - time.time(), 0.0))
            await asyncio.sleep(wait)
            try:
                death = self._death()
                if death is None and time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + _PING_EVERY_S
                    error = await self._ping_error()
                    unanswered = [*unanswered, error] if error else []
                    if len(unanswered) >= _PING_FAILURES:
                        death = f"{len(unanswered)} Pings in a row failed, last: {error}"
                if death is not None:
                    unanswered = []
                    await self._restart(death)
                    next_ping = time.monotonic() + _PING_EVERY_S
                elif not unanswered and self._renew_at and time.time() >= self._renew_at:
                    await self._renew_key(self._key, why="due")  # (not while Ping goes unanswered)
            except Exception:  # the supervisor must outlive anything that goes wrong in it
                log.exception("TorchServe supervisor step failed")
                await asyncio.sleep(1.0)

    def _death(self) -> str | None:
        """Why TorchServe is dead, or None while its launcher runs (in --foreground it exits as
        soon as the JVM does)."""
        if self._proc is None:
            return "no process"
        code = self._proc.poll()
        return None if code is None else f"exit code {code}"

    async def _ping_error(self) -> str | None:
        """None when Ping is answered (Healthy or not: workers restart on their own)."""
        if self._stub is None:
            return "no channel"
        from google.protobuf import empty_pb2

        try:
            await self._call(self._stub.Ping, empty_pb2.Empty(), _PING_TIMEOUT_S)
            return None
        except grpc.RpcError as err:
            return f"{err.code().name} {_describe(err)}"  # type: ignore[attr-defined]

    async def _restart(self, death: str) -> None:
        """Bring a dead TorchServe back: after a back-off that doubles while it keeps dying;
        until then ``run()`` answers TORCHSERVE_RESTARTING."""
        self._ready = False
        self._down_since = time.monotonic()
        recently = self._restarted and self._down_since - self._serving_since < _STABLE_AFTER_S
        cap = self.settings.torchserve_restart_backoff_max_s
        delay = min(self._backoff_s * 2, cap) if recently else min(_RESTART_BACKOFF_MIN_S, cap)
        kept = self.log_path.with_name(self.log_path.name + ".1")
        with contextlib.suppress(OSError):
            self.log_path.replace(kept)
        log.error(
            "TorchServe died (%s); restarting in %.0f s (log of the run that died: %s)",
            death,
            delay,
            kept,
        )
        attempt = 0
        while True:
            await asyncio.sleep(delay)
            attempt += 1
            try:
                await self._relaunch()
                break
            except Exception as err:  # any failure is one more try, never the end of it
                delay = min(delay * 2, cap)
                first = str(err).split("\n", 1)[0]
                log.warning(
                    "TorchServe restart %d failed (%s); next try in %.0f s", attempt, first, delay
                )
        self._backoff_s = delay
        self._restarted = True
        self.restarts += 1
        self._serving_since = time.monotonic()
        downtime = self._serving_since - self._down_since
        self._down_since = None
        self._ready = True
        log.info(
            "TorchServe serving again after %.1f s down (%d attempt%s)",
            downtime,
            attempt,
            "" if attempt == 1 else "s",
        )

    async def _relaunch(self) -> None:
        if self._proc is not None:  # what is left: an orphaned JVM or worker, a hung JVM
            await _terminate_group(self._proc, 0.0, signal.SIGKILL)
        await self._close_channel()
        await self._bring_up(time.monotonic())

    # ------------------------------------------------------------------ calls and the token
    def _token_lifetime_s(self) -> int:
        return int(self.settings.torchserve_token_expiration_min * 60)  # as TorchServe does

    def _read_keys(self) -> _Keys | None:
        path = self.workdir / _KEY_FILE
        try:
            keys = json.loads(path.read_text())
            inference = keys["inference"]
            expires: float | None
            try:
                expires = datetime.fromisoformat(inference["expiration time"]).timestamp()
            except (KeyError, TypeError, ValueError):
                expires = path.stat().st_mtime + self._token_lifetime_s()
            return _Keys(str(inference["key"]), str(keys["API"]["key"]), expires)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _use_keys(self, keys: _Keys) -> None:
        self._key, self._api_key = keys.inference, keys.api
        lifetime = self._token_lifetime_s()
        expires = keys.expires if keys.expires is not None else time.time() + lifetime
        self._renew_at = expires - (1 - _TOKEN_RENEW_AT) * lifetime

    def _forget_keys(self) -> None:
        self._key = self._api_key = self._renew_at = None
        self._renewal_failing = False

    async def _renew_key(self, stale: str | None, why: str) -> None:
        """Replace the inference key ``stale``: with the one in key_file.json if TorchServe wrote
        a new one (a restart), else through the token API. One renewal at a time; a call refused
        with a key that another renewal has replaced only picks up the new key."""
        async with self._key_lock:
            if self._key != stale:
                return
            keys = self._read_keys()
            if keys is None:  # TorchServe is starting (no key file yet)
                return
            if keys.inference != stale:
                self._use_keys(keys)
                return
            try:
                await asyncio.to_thread(self._post_token, keys.api)
                renewed = self._read_keys()
                if renewed is None or renewed.inference == stale:
                    raise TorchServeError(f"{_KEY_FILE} holds no new inference key")
            except (OSError, TorchServeError) as err:
                self._renew_at = time.time() + _TOKEN_RETRY_S
                if not self._renewal_failing:
                    self._renewal_failing = True
                    log.error(
                        "could not renew TorchServe's inference token (%s): %s; calls fail once "
                        "it expires (log: %s)",
                        why,
                        err,
                        self.log_path,
                    )
                return
            self._renewal_failing = False
            self._use_keys(renewed)
            left = "?" if renewed.expires is None else f"{renewed.expires - time.time():.0f}"
            log.info("TorchServe inference token renewed (%s; valid for %s s)", why, left)

    def _post_token(self, api_key: str) -> None:
        """TorchServe 0.12's token API: a new inference key, written into key_file.json."""
        url = f"http://127.0.0.1:{self.settings.torchserve_management_port}/token?type=inference"
        request = urllib.request.Request(
            url, method="POST", headers={"Authorization": f"Bearer {api_key}"}
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
        try:
            with opener.open(request, timeout=_TOKEN_HTTP_TIMEOUT_S) as answer:
                answer.read()
        except urllib.error.HTTPError as err:
            body = err.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                body = str(json.loads(body).get("message", body))
            raise TorchServeError(f"the token API answered {err.code}: {body.strip()}") from None

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        """A unary call with the inference token; a refused token is renewed (or re-read from
        key_file.json), then the call is retried once."""
        if self._key is None:
            keys = self._read_keys()
            if keys is not None:
                self._use_keys(keys)
        for attempt in (0, 1):
            key = self._key
            metadata = (("authorization", f"Bearer {key}"),) if key else ()
            try:
                return await method(request, timeout=timeout, metadata=metadata)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():  # our caller is being cancelled
                    raise
                raise _ChannelClosed() from None
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.PERMISSION_DENIED or attempt:  # type: ignore[attr-defined]
                    raise
                await self._renew_key(key, why="refused")
        raise AssertionError("unreachable")

    async def _healthy(self, timeout: float) -> bool:
        if self._stub is None:
            return False
        from google.protobuf import empty_pb2

        try:
            reply = await self._call(self._stub.Ping, empty_pb2.Empty(), timeout)
            return json.loads(reply.health).get("status") == "Healthy"
        except (grpc.RpcError, ValueError, AttributeError):
            return False

    # ------------------------------------------------------------------ helpers
    def _tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {len(text)} lines of {self.log_path}\n" + "\n".join(text)

    def _load_failure(self, attempts: int = 2) -> str | None:
        """The worker's traceback once TorchServe has failed ``attempts`` times to load a model
        (it retries forever with a growing back-off; a broken archive never recovers)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return None
        starts = [i for i, line in enumerate(lines) if _LOAD_FAILED in line]
        if len(starts) < attempts:
            return None
        block = []
        for line in lines[starts[-1] : starts[-1] + 60]:
            if _MODEL_LOG in line:
                text = line.split(_MODEL_LOG, 1)[1]
                if text.startswith("Backend worker process died"):
                    break
                block.append(text)
        return "\n".join(block)

    def _kill_now(self) -> None:
        """atexit: never leave a JVM behind if the service exits without ``stop()``."""
        if self._proc is not None:
            _signal_group(self._proc.pid, signal.SIGKILL)


def _older(archive: Path, model_dir: Path) -> bool:
    newest = max((p.stat().st_mtime for p in model_dir.iterdir() if p.is_file()), default=0.0)
    return archive.stat().st_mtime < newest


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is still in the group."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


async def _terminate_group(
    proc: subprocess.Popen[bytes], grace_s: float, first: signal.Signals = signal.SIGTERM
) -> None:
    """Send ``first`` to the group (launcher, JVM, workers), SIGKILL what is left after
    ``grace_s``."""
    pgid = proc.pid  # start_new_session: the launcher leads its own group
    _signal_group(pgid, first)
    for sig_deadline, sig in ((grace_s, signal.SIGKILL), (5.0, None)):
        end = time.monotonic() + sig_deadline
        while time.monotonic() < end:
            proc.poll()  # reap the launcher so it does not count as alive
            if not _group_alive(pgid):
                return
            await asyncio.sleep(0.1)
        if sig is None:
            break
        if first != signal.SIGKILL:
            log.warning("TorchServe did not stop within %.0f s; killing it", grace_s)
        _signal_group(pgid, sig)
    raise TorchServeError(f"TorchServe processes of group {pgid} survived SIGKILL")
