"""Prometheus metrics of the service, on their own registry, served over HTTP.

Each ``Metrics`` owns a ``CollectorRegistry`` (not the process-global one) so several servers can
live in one process (tests) without duplicate-registration errors. Under ``--processes N`` each
server process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's
multiprocess mode) and the supervisor serves their sum (processes.py); a gauge says how: the live
processes' sum, or for ``quotient_backend_up`` their minimum (1 only while every process is up).
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from quotient_service.errors import StartupError

__all__ = ["Metrics", "serve_registry"]

log = logging.getLogger(__name__)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The counters, histograms and gauge listed in docs/api.md."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "quotient_requests",
            "Calls (EmbedStream: messages) by method, model and status code.",
            ["method", "model", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "quotient_request_duration_seconds",
            "Time in the server per call (per stream message).",
            ["method", "model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.items = Counter("quotient_items", "Items embedded, by model.", ["model"], registry=r)
        self.batch_size = Histogram(
            "quotient_batch_size_items",
            "Items per model batch.",
            ["model"],
            buckets=_SIZES,
            registry=r,
        )
        self.queue_wait = Histogram(
            "quotient_queue_wait_seconds",
            "Time an item waited for its batch.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inference = Histogram(
            "quotient_batch_duration_seconds",
            "Time the backend took per batch.",
            ["model"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_failures = Counter(
            "quotient_batch_failures", "Batches the backend failed.", ["model"], registry=r
        )
        self.queued = Gauge(
            "quotient_queued_items",
            "Items waiting for a batch.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.auth_failures = Counter(
            "quotient_auth_failures",
            "Calls refused for a missing, malformed or unknown API key, by method and reason.",
            ["method", "reason"],
            registry=r,
        )
        self.backend_up = Gauge(
            "quotient_backend_up",
            "1 while the backend can run batches (health SERVING).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.inflight_bytes = Gauge(
            "quotient_inflight_bytes",
            "Request bytes admitted and not yet answered (--max-inflight-bytes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight_items = Gauge(
            "quotient_inflight_items",
            "Inputs and Decode rows admitted and not yet answered (--max-inflight-items).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "quotient_shed_calls",
            "Calls refused RESOURCE_EXHAUSTED by admission control, by method and limit.",
            ["method", "limit"],
            registry=r,
        )
        self.malformed = Counter(
            "quotient_malformed_requests",
            "Request bodies that are not valid protobuf of the method's type (INVALID_ARGUMENT).",
            ["method"],
            registry=r,
        )
        # Model labels come from clients; only served names become labels (bounded cardinality).
        self.known_models: frozenset[str] = frozenset()
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_call(self, method: str, model: str, code: grpc.StatusCode, seconds: float) -> None:
        label = model if model in self.known_models else ("-" if not model else "unknown")
        self.requests.labels(method, label, code.name).inc()
        self.latency.labels(method, label).observe(seconds)

    def refused(self, method: str, reason: str) -> None:
        self.auth_failures.labels(method, reason).inc()

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint in a daemon thread; returns its port (0 = disabled).
        A port that cannot be bound is a ``StartupError`` naming the port and the flag."""
        if port == 0:
            return 0
        self._http, self._thread = serve_registry(self.registry, host, port)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_registry(
    registry: CollectorRegistry, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """``registry`` on http://host:port/metrics from a daemon thread; a port that cannot be
    bound is a ``StartupError`` naming it and the flag."""
    try:
        http, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise StartupError(
            f"--metrics-port / QUOTIENT_METRICS_PORT: cannot serve metrics on {host}:{port}: "
            f"{exc.strerror or exc} (another process holds it? pick another port, or 0 to "
            "turn metrics off)"
        ) from None
    log.info("metrics on http://%s:%d/metrics", host, http.server_port)
    return http, thread
