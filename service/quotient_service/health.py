"""Standard ``grpc.health.v1`` for the whole server ("") and for quotient.v1.EmbeddingService.

NOT_SERVING until the backend has started and warmed up every model, SERVING after, NOT_SERVING
for good once shutdown begins (so load balancers stop sending before the drain).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import OVERALL_HEALTH
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio

__all__ = ["HEALTH_SERVICE_NAME", "Health"]


class Health:
    """The health servicer of one server and the names it reports on."""

    def __init__(self, server: grpc.aio.Server, services: list[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.names = [OVERALL_HEALTH, *services]
        self.attach(server)

    def attach(self, server: grpc.aio.Server) -> None:
        """Serve the same statuses on another server too (the plaintext ``--health-port``)."""
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else (health_pb2.HealthCheckResponse.NOT_SERVING)
        )
        for name in self.names:
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        """NOT_SERVING everywhere; later ``set`` calls are ignored."""
        await self.servicer.enter_graceful_shutdown()
