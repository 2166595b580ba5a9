"""The gRPC server: wiring, lifecycle and the ``quotient-server`` entry point.

``create_server(settings)`` builds and binds everything (port 0 picks a free port) but loads
nothing; ``App.start()`` starts serving health (NOT_SERVING), starts the backend (loads and warms
up the models), then turns health SERVING. ``App.stop()`` turns health NOT_SERVING, stops accepting
calls, lets in-flight ones finish for the grace period, then stops the batcher and the backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc_reflection.v1alpha import reflection

from quotient.v1 import embedding_service_pb2_grpc as pb_grpc
from quotient_service.backends import Backend, create_backend
from quotient_service.batching import Batcher
from quotient_service.config import ConfigError, Settings, load_settings
from quotient_service.engine import Engine
from quotient_service.errors import ErrorInterceptor
from quotient_service.health import HEALTH_SERVICE_NAME, Health
from quotient_service.metrics import Metrics
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

    async def start(self) -> None:
        await self.health.set(False)
        await self.server.start()
        self.metrics_port = self.metrics.serve(
            self.settings.metrics_host, self.settings.metrics_port
        )
        await self.backend.start()
        self.metrics.known_models = frozenset(self.backend.models())
        self.engine.ready = True
        await self.health.set(True)
        log.info(
            "serving %d model(s): %s",
            len(self.backend.models()),
            ", ".join(sorted(self.backend.models())) or "none",
        )

    async def stop(self, grace: float | None = None) -> None:
        await self.health.shutdown()
        await self.server.stop(grace)  # refuses new calls, lets running ones finish
        await self.batcher.stop()
        self.engine.close()
        await self.backend.stop()
        self.metrics.close()


async def create_server(settings: Settings) -> tuple[grpc.aio.Server, int, App]:
    """Build and bind the server (not started). Returns (server, bound port, app)."""
    metrics = Metrics()
    backend = create_backend(settings)
    batcher = Batcher(backend, settings, metrics)
    engine = Engine(backend, batcher, settings)
    size = settings.max_message_bytes
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor(f"/{SERVICE_NAME}/", metrics.observe_call)],
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
    )
    pb_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServicer(engine, settings, metrics), server
    )
    health = Health(server, [SERVICE_NAME])
    reflection.enable_server_reflection(
        [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise RuntimeError(f"cannot bind {settings.host}:{settings.port}")
    return server, port, App(settings, server, backend, batcher, engine, health, metrics)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then shut down gracefully. Returns the exit status."""
    _, port, app = await create_server(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    log.info("listening on %s:%d (backend %s)", settings.host, port, settings.backend)
    status = 0
    starting = asyncio.create_task(app.start())
    stop_wait = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a failed start (bad model store, ...) raises here
            await stop_wait
        log.info("shutting down (grace %.1f s)", settings.shutdown_grace_s)
    except Exception:
        log.exception("the server failed to start")
        status = 1
    finally:
        starting.cancel()
        stop_wait.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await app.stop(settings.shutdown_grace_s)
    log.info("stopped")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quotient-server``: parse settings, log them, serve."""
    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"quotient-server: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log.info("settings %s", json.dumps(settings.redacted(), sort_keys=True))
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
