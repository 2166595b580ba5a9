"""The gRPC server: wiring, lifecycle and the ``quotient-server`` entry point.

``create_server(settings)`` builds and binds everything (port 0 picks a free port; a port another
process holds is a ``StartupError``) but loads nothing; ``App.start()`` starts serving health
(NOT_SERVING), starts the backend (loads and warms up the models), turns health SERVING and then
keeps health in step with ``backend.ready()``. ``App.drain(s)`` turns health NOT_SERVING for good
and keeps answering for ``s`` seconds; ``App.stop()`` stops accepting calls, lets in-flight ones
finish for the grace period, then stops the batcher and the backend. With ``--processes N`` the
entry point supervises N such servers on one port instead (processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection

from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_models.errors import DeviceUnavailable, MissingRuntime
from quotient_service.auth import ApiKeys, AuthInterceptor, server_credentials
from quotient_service.backends import Backend, create_backend
from quotient_service.batching import Batcher
from quotient_service.config import ConfigError, Settings, load_settings
from quotient_service.engine import Engine
from quotient_service.errors import ErrorInterceptor, LateAnswerFilter, StartupError
from quotient_service.health import HEALTH_SERVICE_NAME, Health
from quotient_service.metrics import Metrics
from quotient_service.processes import CHILD_ENV, reuse_port, supervise, watch_supervisor
from quotient_service.servicer import SERVICE_NAME, EmbeddingServicer

__all__ = ["App", "create_server", "main", "serve"]

log = logging.getLogger("quotient_service")


@dataclass
class App:
    """Everything one server owns, and its lifecycle."""

    settings: Settings
    server: grpc.aio.Server
    backend: Backend
    batcher: Batcher
    engine: Engine
    health: Health
    metrics: Metrics
    metrics_port: int = 0  # the bound /metrics port once started; 0 when disabled
    health_server: grpc.aio.Server | None = None  # --health-port, when set
    health_port: int = 0
    _monitor: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.health.set(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        self.metrics_port = self.metrics.serve(
            self.settings.metrics_host, self.settings.metrics_port
        )
        await self.backend.start()
        self.metrics.known_models = frozenset(self.backend.models())
        self.engine.ready = True
        await self.health.set(True)
        self.metrics.backend_up.set(1)
        self._monitor = asyncio.create_task(self._watch_backend())
        log.info(
            "serving %d model(s): %s",
            len(self.backend.models()),
            ", ".join(sorted(self.backend.models())),
        )

    async def _watch_backend(self) -> None:
        """Health follows the backend: NOT_SERVING while it cannot run batches."""
        up = True
        while True:
            await asyncio.sleep(self.settings.health_check_interval_s)
            try:
                now = await self.backend.ready()
            except Exception:  # a check that fails says "not ready", it must not stop watching
                log.exception("backend health check failed")
                now = False
            if now != up:
                up = now
                self.metrics.backend_up.set(int(up))
                await self.health.set(up)
                if up:
                    log.info("backend %s is ready again: health SERVING", self.backend.name)
                else:
                    log.error("backend %s is not ready: health NOT_SERVING", self.backend.name)

    async def drain(self, seconds: float) -> None:
        """Health NOT_SERVING for good, while calls are still accepted for ``seconds``."""
        if self._monitor is not None:
            self._monitor.cancel()
        await self.health.shutdown()
        if seconds > 0:
            log.info("draining: health NOT_SERVING, still answering for %.1f s", seconds)
            await asyncio.sleep(seconds)

    async def stop(self, grace: float | None = None) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.health.shutdown()
        await self.server.stop(grace)  # refuses new calls, lets running ones finish
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.batcher.stop()
        self.engine.close()
        await self.backend.stop()
        self.metrics.close()


_MAX_PENDING_CALLS = 20_000


def _options(settings: Settings) -> list[tuple[str, int]]:
    size = settings.max_message_bytes
    options = [
        ("grpc.max_receive_message_length", size),
        ("grpc.max_send_message_length", size),
        # a second server on the port must fail, not share it; only the processes of one
        # supervisor share theirs (--processes, processes.py)
        ("grpc.so_reuseport", int(reuse_port())),
        # calls gRPC has received but the event loop has not taken yet: gRPC's defaults (1,000
        # soft, 3,000 hard) cancel the excess, which clients see as a bare CANCELLED. Waiting
        # calls hold no message yet; they end by their deadline (DEADLINE_EXCEEDED) or are
        # taken and admitted or refused (RESOURCE_EXHAUSTED) like any call
        ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS),
    ]
    if settings.max_connection_age_s > 0:
        age_ms = int(settings.max_connection_age_s * 1000)
        options += [
            ("grpc.max_connection_age_ms", age_ms),
            # calls in flight when the age is reached may finish
            ("grpc.max_connection_age_grace_ms", int(settings.shutdown_grace_s * 1000)),
        ]
    return options


def _bind(
    server: grpc.aio.Server,
    host: str,
    port: int,
    flag: str,
    credentials: grpc.ServerCredentials | None = None,
) -> int:
    """Bind ``host:port`` (TLS with ``credentials``); a port held by another process is a
    ``StartupError`` naming it and ``flag``."""
    address = f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(
            f"{flag}: cannot bind {address}: the port is in use by another process (or the "
            "address is not this host's); pick another port"
        )
    return bound


def _bind_health(health: Health, settings: Settings) -> tuple[grpc.aio.Server, int]:
    """The plaintext server of ``--health-port``: grpc.health.v1 only, no key needed."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port()))])
    health.attach(server)
    flag = "--health-port / QUOTIENT_HEALTH_PORT"
    return server, _bind(server, settings.host, settings.health_port, flag)


async def create_server(settings: Settings) -> tuple[grpc.aio.Server, int, App]:
    """Build and bind the server (not started). Returns (server, bound port, app)."""
    metrics = Metrics()
    backend = create_backend(settings)
    batcher = Batcher(backend, settings, metrics)
    engine = Engine(backend, batcher, settings)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.api_key_file:
        interceptors.append(AuthInterceptor(ApiKeys(settings.api_key_file), metrics.refused))
    interceptors.append(
        ErrorInterceptor(
            f"/{SERVICE_NAME}/",
            metrics.observe_call,
            lambda method: metrics.malformed.labels(method).inc(),
        )
    )
    server = grpc.aio.server(
        interceptors=interceptors,
        options=_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_calls,
    )
    pb_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServicer(engine, settings, metrics), server
    )
    health = Health(server, [SERVICE_NAME])
    reflection.enable_server_reflection(
        [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    credentials = None
    if settings.tls_cert_file:
        credentials = server_credentials(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
        )
    port = _bind(server, settings.host, settings.port, "--port / QUOTIENT_PORT", credentials)
    app = App(settings, server, backend, batcher, engine, health, metrics)
    if settings.health_port:
        app.health_server, app.health_port = _bind_health(health, settings)
    return server, port, app


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully. Returns the exit status.

    SIGTERM (an orchestrator) drains first: health NOT_SERVING for ``drain_s`` while calls are
    still answered, so that load balancers stop routing here; SIGINT (Ctrl-C) skips the drain.
    A configuration the server cannot start with is one ERROR line and exit status 1.
    """
    try:
        _, port, app = await create_server(settings)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    received: list[signal.Signals] = []
    stopping = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    orphan = None  # a child of --processes stops (no drain) if its supervisor is killed
    if reuse_port():
        orphan = asyncio.create_task(watch_supervisor(lambda: on_signal(signal.SIGINT)))
    scheme = "TLS" if settings.tls_cert_file else "plaintext"
    log.info("listening on %s:%d (%s, backend %s)", settings.host, port, scheme, settings.backend)
    status = 0
    starting = asyncio.create_task(app.start())
    stop_wait = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start (bad model store, ...) raises here
            await stop_wait
            if received and received[0] == signal.SIGTERM:
                await app.drain(settings.drain_s)
        log.info("shutting down (grace %.1f s)", settings.shutdown_grace_s)
    except (StartupError, DeviceUnavailable, MissingRuntime) as exc:
        log.error("cannot start: %s", exc)
        status = 1
    except Exception:
        log.exception("the server failed to start")
        status = 1
    finally:
        starting.cancel()
        stop_wait.cancel()
        if orphan is not None:
            orphan.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await app.stop(settings.shutdown_grace_s if status == 0 else 0)
    log.info("stopped")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quotient-server``: parse settings, log them, serve."""
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"quotient-server: {exc}", file=sys.stderr)
        return 2
    process = f" [process {os.environ[CHILD_ENV]}]" if reuse_port() else ""
    logging.basicConfig(
        level=settings.log_level,
        format=f"%(asctime)s %(levelname)s %(name)s{process}: %(message)s",
    )
    logging.getLogger("grpc._cython.cygrpc").addFilter(LateAnswerFilter())
    if not reuse_port():  # a child of --processes: its settings are its supervisor's, logged
        log.info("settings %s", json.dumps(settings.redacted(), sort_keys=True))
        if settings.processes > 1:
            return supervise(settings, sys.argv[1:] if argv is None else argv)
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
