"""``--processes N``: N server processes on one port, started and stopped by a supervisor.

One Python process serves calls on one event loop and runs its decoding and its models' Python
under one GIL; at one small item per call that loop, not the CPU, is the limit. With N > 1,
``quotient-server`` becomes a supervisor: it reserves ``--port`` (and ``--health-port``) with
SO_REUSEPORT, starts N children that bind the same ports (each a whole server with its own copy
of the models and its own limits), and the kernel spreads incoming *connections* over them (a
client's calls on one connection all go to one process). Children's Prometheus values go to files
in a private ``PROMETHEUS_MULTIPROC_DIR`` and the supervisor serves their sum on
``--metrics-port``. SIGTERM / SIGINT are passed on to every child (each drains and stops as a lone
server does); a child that exits on its own (a failed start, a crash) stops the others and the
supervisor exits with status 1, so the orchestrator restarts the whole pod.

The port is checked before it is shared: a port held by another process is a start-up error, as
it is for a lone server. What SO_REUSEPORT cannot tell apart is a second multi-process server of
the same user started on the same port: it would join this one. Do not start two on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

from quotient_service.config import Settings
from quotient_service.errors import StartupError

__all__ = ["CHILD_ENV", "reuse_port", "supervise", "watch_supervisor"]

log = logging.getLogger("quotient_service")

CHILD_ENV = "QUOTIENT_PROCESS_INDEX"  # set by the supervisor in each child: its index, 0..N-1
SUPERVISOR_ENV = "QUOTIENT_SUPERVISOR_PID"  # and the supervisor's pid
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STOP_MARGIN_S = 15.0  # after drain and grace, how long a child may take to exit before SIGKILL


def reuse_port() -> bool:
    """Whether this process is a child of ``supervise`` (it binds its ports shared)."""
    return CHILD_ENV in os.environ


async def watch_supervisor(stop: Callable[[], None], every: float = 1.0) -> None:
    """In a child: ``stop()`` once the supervisor is gone (killed without passing a signal on),
    so no server outlives it holding the port."""
    parent = int(os.environ.get(SUPERVISOR_ENV, os.getppid()))  # gone before we got here too
    while os.getppid() == parent:
        await asyncio.sleep(every)
    log.error("the supervisor (process %d) is gone: stopping", parent)
    stop()


def _reserve(host: str, port: int, flag: str) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on ``host:port`` that holds the port for the
    children (port 0: the kernel picks one). A port another process holds is a StartupError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(f"{flag}: cannot resolve {host!r}: {exc}") from None
    if port:  # exclusive first: a port another process holds must fail here, not be shared
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    f"{flag}: cannot bind {host}:{port}: {exc.strerror or exc} (the port is in "
                    "use by another process?); pick another port"
                ) from None
    held = socket.socket(family, kind, proto)
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        held.bind(address)
    except OSError as exc:
        held.close()
        raise StartupError(f"{flag}: cannot bind {host}:{port}: {exc.strerror or exc}") from None
    return held


def _child_args(argv: Sequence[str], port: int, health_port: int) -> list[str]:
    """The child's command line: the supervisor's, with one process each, the reserved ports
    and no /metrics endpoint of its own (argparse: the last occurrence of a flag wins)."""
    return [
        sys.executable,
        "-m",
        "quotient_service.server",
        *argv,
        "--processes",
        "1",
        "--port",
        str(port),
        "--health-port",
        str(health_port),
        "--metrics-port",
        "0",
    ]


@contextlib.contextmanager
def _metrics_endpoint(settings: Settings) -> Iterator[dict[str, str]]:
    """The children's environment for multiprocess metrics, and the supervisor's /metrics that
    sums them (none when ``--metrics-port 0``)."""
    if not settings.metrics_port:
        yield {}
        return
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from quotient_service.metrics import serve_registry

    directory = tempfile.mkdtemp(prefix="quotient-metrics-")
    try:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        http, _ = serve_registry(registry, settings.metrics_host, settings.metrics_port)
        try:
            yield {MULTIPROC_ENV: directory}
        finally:
            http.shutdown()
            http.server_close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def supervise(settings: Settings, argv: Sequence[str]) -> int:
    """Run ``settings.processes`` servers on one port until SIGTERM / SIGINT or until one exits
    on its own; the exit status (0: stopped by a signal, every child cleanly)."""
    try:
        held = [_reserve(settings.host, settings.port, "--port / QUOTIENT_PORT")]
        if settings.health_port:
            flag = "--health-port / QUOTIENT_HEALTH_PORT"
            held.append(_reserve(settings.host, settings.health_port, flag))
        with contextlib.ExitStack() as stack:
            for sock in held:
                stack.callback(sock.close)
            env = stack.enter_context(_metrics_endpoint(settings))
            return _run(settings, argv, [s.getsockname()[1] for s in held], env)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1


def _run(settings: Settings, argv: Sequence[str], ports: list[int], env: dict[str, str]) -> int:
    port, health_port = ports[0], (ports[1] if len(ports) > 1 else 0)
    received: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        received.append(sig)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    children: list[subprocess.Popen[bytes]] = []
    try:
        for k in range(settings.processes):
            children.append(
                subprocess.Popen(
                    _child_args(argv, port, health_port),
                    env={**os.environ, **env, CHILD_ENV: str(k), SUPERVISOR_ENV: str(os.getpid())},
                )
            )
        scheme = "TLS" if settings.tls_cert_file else "plaintext"
        log.info(
            "listening on %s:%d (%s, %d processes: %s)",
            settings.host,
            port,
            scheme,
            len(children),
            ", ".join(str(c.pid) for c in children),
        )
        while not received and all(c.poll() is None for c in children):
            time.sleep(0.1)
        status = 0
        if not received:
            gone = next(c for c in children if c.poll() is not None)
            log.error(
                "server process %d exited with status %s; stopping the others",
                gone.pid,
                gone.returncode,
            )
            status = 1
        _stop(children, received[0] if received else signal.SIGTERM, settings)
        if status == 0 and any(c.returncode != 0 for c in children):
            status = 1
        log.info("stopped (%d processes)", len(children))
        return status
    finally:
        for child in children:  # on any failure here, no child outlives the supervisor
            if child.poll() is None:
                child.kill()
                child.wait()
        if MULTIPROC_ENV in env:
            from prometheus_client.multiprocess import mark_process_dead

            for child in children:
                mark_process_dead(child.pid, env[MULTIPROC_ENV])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(children: list[subprocess.Popen[bytes]], sig: int, settings: Settings) -> None:
    """Pass ``sig`` on to every running child and wait for them: a drain (SIGTERM) and the grace
    period, then a margin, before SIGKILL."""
    for child in children:
        if child.poll() is None:
            child.send_signal(sig)
    drain = settings.drain_s if sig == signal.SIGTERM else 0.0
    deadline = time.monotonic() + drain + settings.shutdown_grace_s + STOP_MARGIN_S
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("server process %d did not stop in time: killed", child.pid)
            child.kill()
            child.wait()
