"""The TorchServe backend: model batches run in TorchServe 0.12 on loopback, called over gRPC.

Lifecycle (see ``Backend``):
1. ``start()`` writes ``config.properties`` into the work directory, launches
   ``torchserve --start --foreground`` from this virtual environment in its own process group
   (output to ``<workdir>/torchserve.log``), then waits until ``Ping`` says Healthy and one warm-up
   batch per model succeeds, or fails with the log's tail and leaves no process behind;
2. ``run()`` sends one model batch as ``Predictions(model_name, input={"body": payload})`` with the
   inference token and a deadline, and maps TorchServe's coarse errors to ours (``_map_error``);
3. ``stop()`` SIGTERMs the process group (Java frontend and Python workers) and SIGKILLs it after a
   grace period.

Token authorization stays on: TorchServe writes ``key_file.json`` into its working directory; the
key is re-read when a call is refused (keys expire after 60 minutes). Each instance keeps its own
``TMPDIR``: TorchServe's pid file, worker sockets and unpacked archives live there, so two
instances (tests, a second service) never see each other.
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
from collections.abc import Callable
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


class TorchServeError(RuntimeError):
    """TorchServe did not start (the message carries the tail of its log) or answered oddly."""


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


def _map_error(err: grpc.RpcError, model: str) -> Exception:
    """TorchServe's gRPC error → our vocabulary. Measured against TorchServe 0.12.0:
    handler ``PredictionException(msg, 400)`` → INVALID_ARGUMENT; handler crash → UNAVAILABLE
    "Prediction failed"; unknown model/version and a full queue → INTERNAL; MemoryError/CUDA →
    INTERNAL "Out of resources" (507); a request over ``max_request_size`` → CANCELLED."""
    code, message = err.code(), _describe(err)  # type: ignore[attr-defined]
    meta = {"backend": "torchserve", "model": model}
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument(message, reason="BAD_BATCH")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"TorchServe did not answer in time ({model})")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "has no worker to serve" in message:
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


class TorchServeBackend(Backend):
    name = "torchserve"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.workdir = Path(settings.torchserve_workdir).resolve()
        self.log_path = self.workdir / "torchserve.log"
        self._specs: list[ModelSpec] | None = None
        self._models: dict[str, EmbeddingModel] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: Path | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._key: str | None = None
        self._ready = False
        self.startup_seconds: float | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        specs = self._discover()
        archives = self._archives(specs)
        java = self._java()
        self._prepare_workdir()
        config = self._write_config(archives)
        began = time.monotonic()
        try:
            self._launch(config, archives[0].parent, java)
            await self._connect()
            await self._wait_until_serving(
                specs, began + self.settings.torchserve_startup_timeout_s
            )
        except BaseException:
            await self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        self.models()
        self._ready = True
        log.info(
            "TorchServe serving %s after %.1f s (log: %s)",
            ", ".join(s.name for s in specs),
            self.startup_seconds,
            self.log_path,
        )

    async def stop(self) -> None:
        self._ready = False
        if self._channel is not None:
            await self._channel.close()
            self._channel, self._stub = None, None
        if self._proc is not None:
            await _terminate_group(self._proc, _STOP_GRACE_S)
            atexit.unregister(self._kill_now)
            log.info("TorchServe stopped (log: %s)", self.log_path)
            self._proc = None
        if self._tmp is not None and not self._tmp.is_relative_to(self.workdir):
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def models(self) -> dict[str, EmbeddingModel]:
        if not self._models:
            # Preparation only: the encoders run in TorchServe.
            self._models = {s.name: load_model(s.directory, engine=None) for s in self._discover()}
        return dict(self._models)

    async def run(self, model_name: str, payload: bytes) -> bytes:
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
        try:
            response = await self._call(
                self._stub.Predictions, request, self.settings.request_timeout_s
            )
        except grpc.RpcError as err:
            raise _map_error(err, model_name) from None
        return bytes(response.prediction)

    async def ready(self) -> bool:
        alive = self._proc is not None and self._proc.poll() is None
        return self._ready and alive and await self._healthy(timeout=2.0)

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

    def _prepare_workdir(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A stale key file would hand us an old token; stale sockets and pid files confuse
        # TorchServe.
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        tmp = self.workdir / "tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if len(str(tmp)) > _SOCKET_PATH_MAX - 20:
            tmp = Path(tempfile.mkdtemp(prefix="quotient-ts-"))
        tmp.mkdir(parents=True, exist_ok=True)
        self._tmp = tmp

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
            "metrics_mode": "prometheus",
            "disable_system_metrics": "true",  # our service exports its own process metrics
            "max_request_size": s.max_message_bytes,
            "max_response_size": s.max_message_bytes,
            "default_workers_per_model": s.torchserve_workers_per_model,
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
            ],
        )
        _, services = inference_stubs()
        self._stub = services.InferenceAPIsServiceStub(self._channel)

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

    # ------------------------------------------------------------------ calls
    def _read_key(self) -> str | None:
        try:
            keys = json.loads((self.workdir / "key_file.json").read_text())
            return str(keys["inference"]["key"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float) -> Any:
        """A unary call with the inference token; a refused token is re-read once (expiry)."""
        for attempt in (0, 1):
            if self._key is None or attempt:
                self._key = self._read_key()
            metadata = (("authorization", f"Bearer {self._key}"),) if self._key else ()
            try:
                return await method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.PERMISSION_DENIED or attempt:  # type: ignore[attr-defined]
                    raise
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


async def _terminate_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group (launcher, JVM, workers), SIGKILL what is left after ``grace_s``."""
    pgid = proc.pid  # start_new_session: the launcher leads its own group
    _signal_group(pgid, signal.SIGTERM)
    for sig_deadline, sig in ((grace_s, signal.SIGKILL), (5.0, None)):
        end = time.monotonic() + sig_deadline
        while time.monotonic() < end:
            proc.poll()  # reap the launcher so it does not count as alive
            if not _group_alive(pgid):
                return
            await asyncio.sleep(0.1)
        if sig is None:
            break
        log.warning("TorchServe did not stop within %.0f s; killing it", grace_s)
        _signal_group(pgid, sig)
    raise TorchServeError(f"TorchServe processes of group {pgid} survived SIGKILL")
