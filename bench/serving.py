"""Serving benchmark: the service against the model it serves, side by side, in one run.

    make bench-serving    # or: .venv/bin/python bench/serving.py --out bench/results/serving.json

For each model (rotmnist-c8 on MNIST test digits as PNG files, qm9-vae on QM9 test SMILES):

1. **raw**: the model in-process, as a program that needs no service would run it
   (``load_model(dir, "onnx")``; ``prepare_noted`` + ``collate`` + ``embed_batch``): throughput
   at batches of 64 (the limit the service is measured against) and single-item latency;
2. **service** (``quotient-server`` as ``make serve`` starts it, embedded backend, on loopback;
   then again with ``--processes 2`` (two server processes on the port) and with
   ``--decode-in processes``), called over gRPC by a load generator in another process, as
   ``CONNECTIONS`` (4) clients on a connection each:
   - ``single``: 1 item per request, ``--concurrency`` (32) requests in flight;
   - ``large``: 64 items per request, 4 in flight;
   - ``idle``: 1 item per request, one at a time (latency at idle).

Every configuration runs ``--warmup`` seconds, then counts the items answered within the next
``--duration`` seconds. The load generator sends pre-serialised requests (the bytes of an
``EmbedRequest``; it never builds or parses a message in the timed loop, except one answer in
``--check-every`` whose row count it checks) and reports its own CPU time, so a reader can see
whether it was the bottleneck: client and service share this machine's cores. The service's own
CPU time and its resident memory (peak over the run, sampled) are reported too.

**gRPC floor**: the ``single`` load against a gRPC Python server whose Embed method returns a
ready answer of the model's size without reading the request, in a process of its own: what gRPC
costs per call (CPU on the server and in the load generator) before any service code runs. With
the raw model's CPU per item it bounds the ``single`` shape for *any* gRPC Python service here:
each item costs at least the model's CPU plus both floors, on ``os.cpu_count()`` cores (and
without the load generator's part, were the client on other cores).

Memory: the raw process's resident memory before and after loading the model; the service
serving each model alone (``--models``), resident at ready and at peak under the ``large`` load.
``--soak SECONDS`` (``make bench SOAK=1``: 600) then saturates a service serving every measured
model with both request shapes at once and samples its resident memory every second: growth is
the median of the last ``--soak-window`` seconds minus that of the first (after ``--warmup``).

``--device cuda --engine torch`` (bench/gpu.sh) measures the same on a GPU; ``--inputs-from DIR``
reads the client inputs from ``DIR/<model>.npz`` (``make gpu-pack`` writes them) instead of data/.

Prints a table (items/s, service ÷ raw, p50/p99) and writes everything to ``--out`` (JSON),
with the machine it ran on. Figures, not pass/fail: the targets are issue 12's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # free_port, as the tests pick ports

MODELS = ("rotmnist-c8", "qm9-vae")
EMBED = "/quotient.v1.EmbeddingService/Embed"
MAX_MESSAGE = 64 << 20
RAW_BATCH = 64
SERVICES = {  # name in the results: quotient-server's extra flags
    "embedded": [],
    "embedded, 2 processes": ["--processes", "2"],
    "embedded, decode in processes": ["--decode-in", "processes"],
    "torchserve backend": ["--backend", "torchserve"],
}
PLAIN = "plain torchserve"
CONNECTIONS = 4  # the load generator's clients: one connection each, callers spread over them
SHAPES = {  # name: (items per request, requests in flight)
    "single": (1, 32),
    "large": (64, 4),
    "idle": (1, 1),
}


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def percentiles(seconds: list[float] | np.ndarray) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    if ms.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


# ---------------------------------------------------------------------- inputs
def chunks(items: list, size: int) -> Iterator[list]:
    """Successive ``size``-item chunks of ``items``, cycling over them without end."""
    at = 0
    while True:
        yield [items[(at + j) % len(items)] for j in range(size)]
        at = (at + size) % len(items)


def client_inputs(model: str, limit: int, source: Path | None = None) -> list[bytes]:
    """What a client sends for ``model``: PNG files of MNIST test digits, or QM9 test SMILES;
    from ``source/<model>.npz`` when given (``data``: the inputs' bytes one after another,
    ``ends``: where each ends; bench/gpu_pack.py writes it)."""
    if source is not None:
        with np.load(source / f"{model}.npz") as saved:
            data, ends = saved["data"].tobytes(), saved["ends"][:limit]
        return [data[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    if model == "rotmnist-c8":
        from io import BytesIO

        from PIL import Image

        from quotient_models.images.data import load_mnist

        images = load_mnist(ROOT / "data" / "mnist")["test"][0][:limit]
        out = []
        for image in images:
            buffer = BytesIO()
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(buffer, "PNG")
            out.append(buffer.getvalue())
        return out
    from quotient_models.molecules.data import load

    qm9 = load(ROOT / "data" / "qm9")
    return [str(s).encode() for s in qm9.arrays["smiles"][qm9.rows("test")[:limit]]]


def requests(model: str, inputs: list[bytes]) -> Callable[[int, int], list[bytes]]:
    """``build(per_request, count)``: ``count`` serialised EmbedRequests of ``per_request``
    items each, cycling over ``inputs``."""
    from quotient_client.proto import embedding_service_pb2 as pb

    def item(data: bytes) -> Any:
        if model == "rotmnist-c8":
            return pb.Input(image=pb.Image(data=data))
        return pb.Input(molecule=pb.Molecule(smiles=data.decode()))

    def build(per_request: int, count: int) -> list[bytes]:
        return [
            pb.EmbedRequest(model=model, inputs=[item(d) for d in chosen]).SerializeToString()
            for chosen in itertools.islice(chunks(inputs, per_request), count)
        ]

    return build


# ---------------------------------------------------------------------- raw model
def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def raw_model(
    model: str,
    inputs: list[bytes],
    warmup: float,
    duration: float,
    engine: str = "onnx",
    device: str = "cpu",
) -> dict:
    """The model in this process: throughput at batches of RAW_BATCH, single-item latency,
    resident memory before and after loading it."""
    from quotient_models.runtime import InputLimits, PrepareOptions, load_model

    before = rss_mb()
    loaded = load_model(ROOT / "model_store" / "models" / model, engine, device)
    loaded_rss = rss_mb()
    limits, options = InputLimits(), PrepareOptions()

    def embed(items: list[bytes]) -> int:
        prepared = [loaded.prepare_noted(data, limits, options)[0] for data in items]
        out = loaded.embed_batch(loaded.collate(prepared), None)
        return len(out.values)

    def timed(batch: int, seconds: float) -> tuple[int, list[float]]:
        done, latencies, batches = 0, [], chunks(inputs, batch)
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            items = next(batches)
            start = time.perf_counter()
            done += embed(items)
            latencies.append(time.perf_counter() - start)
        return done, latencies

    timed(RAW_BATCH, warmup)
    start, cpu = time.perf_counter(), time.process_time()
    done, _ = timed(RAW_BATCH, duration)
    throughput = done / (time.perf_counter() - start)
    cpu_per_item = (time.process_time() - cpu) / max(done, 1)  # every thread of the process
    timed(1, min(warmup, 1.0))
    _, latencies = timed(1, duration)
    return {
        "batch": RAW_BATCH,
        "engine": engine,
        "device": device,
        "items_per_s": throughput,
        "cpu_ms_per_item": cpu_per_item * 1000,
        "idle": {"requests": len(latencies), **percentiles(latencies)},
        "rss_mb": {"before_load": before, "loaded": loaded_rss, "after_bench": rss_mb()},
    }


# ---------------------------------------------------------------------- load generator
PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


def load(target: str, payloads: list[bytes], per_request: int, concurrency: int,
         warmup: float, duration: float, check_every: int,
         plain: tuple[tuple[str, str], ...] | None = None) -> dict:  # fmt: skip
    """Runs in its own process: ``concurrency`` callers send ``payloads`` in turn for ``warmup``
    + ``duration`` seconds; counts what completed in the second window. ``plain``: the payloads
    are TorchServe ``PredictionsRequest``s, sent with this call metadata (its token)."""
    return asyncio.run(
        _load(target, payloads, per_request, concurrency, warmup, duration, check_every, plain)
    )


def _rows(answer: bytes, plain: bool) -> tuple[int, Any]:
    """Rows of an answer and its ResponseMetadata (None for plain TorchServe)."""
    if plain:
        from quotient_models import serving
        from quotient_service.backends.torchserve import inference_stubs

        pb2, _ = inference_stubs()
        prediction = pb2.PredictionResponse.FromString(answer).prediction
        return len(serving.decode_output(bytes(prediction)).values), None
    from quotient_client.proto import embedding_service_pb2 as pb

    parsed = pb.EmbedResponse.FromString(answer)
    return len(parsed.embeddings), parsed.metadata


async def _load(target: str, payloads: list[bytes], per_request: int, concurrency: int,
                warmup: float, duration: float, check_every: int,
                plain: tuple[tuple[str, str], ...] | None) -> dict:  # fmt: skip
    import grpc

    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.max_receive_message_length", MAX_MESSAGE),
    ]
    # CONNECTIONS clients, each on a connection of its own (its own subchannel pool), as
    # separate clients are: a server of several processes gets connections, not calls, spread
    options.append(("grpc.use_local_subchannel_pool", 1))
    channels = [
        grpc.aio.insecure_channel(target, options=options)
        for _ in range(min(CONNECTIONS, concurrency))
    ]
    async with contextlib.AsyncExitStack() as stack:
        for channel in channels:
            await stack.enter_async_context(channel)
        # bytes in, bytes out: no (de)serialising in the timed loop
        calls = [c.unary_unary(EMBED if plain is None else PREDICTIONS) for c in channels]
        metadata = plain or ()
        begin = time.perf_counter()
        window = (begin + warmup, begin + warmup + duration)
        latencies: list[float] = []
        counted = [0, 0]  # items answered in the window, answers checked
        errors: list[str] = []
        server: dict[str, list[float]] = {"total": [], "queue": [], "inference": []}
        sent = 0

        async def caller(offset: int) -> None:
            nonlocal sent
            at, call = offset, calls[offset % len(calls)]
            while time.perf_counter() < window[1] and not errors:
                payload = payloads[at % len(payloads)]
                at += concurrency
                start = time.perf_counter()
                try:
                    answer = await call(payload, timeout=60, metadata=metadata)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    return
                end = time.perf_counter()
                sent += 1
                if sent % check_every == 0:
                    rows, meta = _rows(answer, plain is not None)
                    counted[1] += 1
                    if rows != per_request:
                        errors.append(f"{rows} rows for {per_request} items")
                    if meta is not None and window[0] <= start and end <= window[1]:
                        for key, d in (("total", meta.total_time), ("queue", meta.queue_time),
                                       ("inference", meta.inference_time)):  # fmt: skip
                            server[key].append(d.seconds + d.nanos * 1e-9)
                if window[0] <= start and end <= window[1]:
                    latencies.append(end - start)
                if window[0] <= end <= window[1]:
                    counted[0] += per_request

        cpu = time.process_time()
        await asyncio.gather(*(caller(i) for i in range(concurrency)))
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - begin
    result = {
        "items_per_request": per_request,
        "concurrency": concurrency,
        "items_per_s": counted[0] / duration,
        "requests": len(latencies),
        "answers_checked": counted[1],
        "errors": errors,
        "loadgen_cpu_share": cpu / wall,  # of one core, over warm-up and window
        "window": window,  # perf_counter (one clock for every process here)
        **percentiles(latencies),
    }
    if plain is None:
        # the server's own account (ResponseMetadata) of the checked answers: time in the
        # server, in the queue and in the model (p50, ms); the rest of the latency is gRPC,
        # the network stack and the client
        result["server_p50_ms"] = {k: percentiles(v)["p50_ms"] for k, v in server.items()}
    return result


# ---------------------------------------------------------------------- gRPC floor
def floor_answer(model: str) -> bytes:
    """An EmbedResponse of one embedding of ``model``'s default projection, with metadata,
    about the size of the service's answer to a 1-item request."""
    from google.protobuf.duration_pb2 import Duration

    from quotient_client.proto import embedding_service_pb2 as pb
    from quotient_models.runtime import load_model

    loaded = load_model(ROOT / "model_store" / "models" / model, engine=None)
    default = loaded.resolve_projection(None)
    dim = next(p.dimension for p in loaded.projections() if p.name == default)
    took = Duration(nanos=1_000_000)
    return pb.EmbedResponse(
        embeddings=[pb.Embedding(values=np.linspace(-1, 1, dim).tolist())],
        model=model,
        projection=default,
        invariant=True,
        model_version=loaded.spec.version,
        metadata=pb.ResponseMetadata(
            total_time=took,
            queue_time=took,
            inference_time=took,
            batch_size=1,
        ),
    ).SerializeToString()


def floor_server(port: int, answer: bytes) -> None:
    """Runs in its own process: a gRPC Python (asyncio) server on ``port`` whose Embed method
    returns ``answer`` to every call, without parsing the request: what any Python service
    costs per call before it does anything."""
    import grpc

    async def embed(request: bytes, context: Any) -> bytes:
        return answer

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE)])
        handler = grpc.unary_unary_rpc_method_handler(embed)  # bytes in, bytes out
        service, method = EMBED.strip("/").split("/")
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def grpc_floor(
    pool: ProcessPoolExecutor, model: str, inputs: list[bytes], raw: dict, args: argparse.Namespace
) -> dict:
    """The ``single`` load against ``floor_server`` answering like the service: gRPC's own CPU
    per call, on the server and in the load generator. With the raw model's CPU per item, it
    bounds what any gRPC Python service can reach at 1 item per request on this machine: each
    item costs at least the model's CPU plus both floors, on ``os.cpu_count()`` cores."""
    import grpc
    from conftest import free_port

    port = free_port()
    server = get_context("spawn").Process(
        target=floor_server, args=(port, floor_answer(model)), daemon=True
    )
    server.start()
    target = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        payloads = requests(model, inputs)(1, len(inputs))
        sampler = Sampler(server.pid or 0)
        cpu, started = sampler.cpu(), time.perf_counter()
        result = run_load(pool, target, payloads, "single", args).result()
        server_share = (sampler.cpu() - cpu) / (time.perf_counter() - started)
        sampler.stop()
    finally:
        server.terminate()
        server.join(10)
    if result["errors"]:
        raise SystemExit(f"{model} gRPC floor: {result['errors'][0]}")
    rate = result["items_per_s"]  # calls/s: 1 item per call
    server_ms = 1000 * server_share / rate
    client_ms = 1000 * result["loadgen_cpu_share"] / rate
    model_ms = raw["cpu_ms_per_item"]
    cores = os.cpu_count() or 1
    ceiling = 1000 * cores / (model_ms + server_ms + client_ms)
    server_only = 1000 * cores / (model_ms + server_ms)  # a client on other cores
    return {
        "calls_per_s": rate,
        "p50_ms": result["p50_ms"],
        "server_cpu_ms_per_call": server_ms,
        "client_cpu_ms_per_call": client_ms,
        "model_cpu_ms_per_item": model_ms,
        "cores": cores,
        "single_ceiling_items_per_s": ceiling,
        "single_ceiling_ratio_to_raw": ceiling / raw["items_per_s"],
        "single_ceiling_server_only_ratio_to_raw": server_only / raw["items_per_s"],
    }


# ---------------------------------------------------------------------- service
class Sampler:
    """Samples the resident memory of a process and its children (worker processes, TorchServe)
    every ``every`` seconds in a thread; ``peak`` in bytes, the largest sum seen; ``timeline``
    (``time.perf_counter()``, bytes) when ``keep``."""

    def __init__(self, pid: int, every: float = 0.05, keep: bool = False) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self.every, self.keep = every, keep
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list:
        return [self.process, *self.process.children(recursive=True)]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self._tree())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):
                rss = self.rss()
                self.peak = max(self.peak, rss)
                if self.keep:
                    self.timeline.append((time.perf_counter(), rss))

    def cpu(self) -> float:
        """CPU seconds of the process and its live children so far."""
        total = 0.0
        for p in self._tree():
            with contextlib.suppress(Exception):
                times = p.cpu_times()
                total += times.user + times.system
        return total

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextlib.contextmanager
def quotient_server(workdir: Path, *extra: str) -> Iterator[tuple[str, int]]:
    """``quotient-server`` as ``make serve`` runs it, on a free loopback port: (target, pid)."""
    from conftest import free_port

    from quotient_client import Client

    port, health = free_port(), free_port()
    log = (workdir / "server.log").open("w")
    script = Path(sys.executable).parent / "quotient-server"
    # without an installed console script (bench/gpu.sh's bare machine): the same entry point
    server = [str(script)] if script.exists() else [sys.executable, "-m", "quotient_service.server"]
    args = ["--host", "127.0.0.1", "--port", str(port), "--health-port", str(health)]
    proc = subprocess.Popen(
        [*server, *args, "--metrics-port", "0", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "QUOTIENT_HOST": "127.0.0.1"},
    )
    target = f"127.0.0.1:{port}"
    try:
        with Client(target) as client:
            client.wait_for_serving(180)
        yield target, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def prepared_items(model: str, inputs: list[bytes]) -> tuple[Any, list[np.ndarray]]:
    """``model`` loaded without an engine and ``inputs`` prepared as the service prepares them
    (ready to ``collate``)."""
    from quotient_models.runtime import InputLimits, PrepareOptions, load_model

    loaded = load_model(ROOT / "model_store" / "models" / model, engine=None)
    limits, options = InputLimits(), PrepareOptions()
    return loaded, [loaded.prepare_noted(d, limits, options)[0] for d in inputs]


def model_batches(model: str, inputs: list[bytes]) -> Callable[[int, int], list[bytes]]:
    """``build(per_request, count)``: what a client of plain TorchServe sends to the same
    archive, ``count`` model batches of ``per_request`` items as TorchServe
    ``PredictionsRequest``s; the inputs are decoded and featurised once, here (not timed)."""
    from quotient_models import serving
    from quotient_service.backends.torchserve import inference_stubs

    pb2, _ = inference_stubs()
    loaded, prepared = prepared_items(model, inputs)
    projection = loaded.resolve_projection(None)

    def build(per_request: int, count: int) -> list[bytes]:
        bodies = (
            serving.encode_batch(loaded.collate(items), projection)
            for items in itertools.islice(chunks(prepared, per_request), count)
        )
        return [
            pb2.PredictionsRequest(model_name=model, input={"body": b}).SerializeToString()
            for b in bodies
        ]

    return build


def run_load(
    pool: ProcessPoolExecutor,
    target: str,
    payloads: list[bytes],
    shape: str,
    args: argparse.Namespace,
    seconds: float | None = None,
    plain: tuple[tuple[str, str], ...] | None = None,
) -> Any:
    """Submit one load of ``shape`` to ``pool`` (a future of ``load``'s result); every idle
    answer is checked."""
    per_request, concurrency = SHAPES[shape]
    if shape == "single":
        concurrency = args.concurrency
    return pool.submit(
        load,
        target,
        payloads,
        per_request,
        concurrency,
        args.warmup,
        args.duration if seconds is None else seconds,
        1 if shape == "idle" else args.check_every,
        plain,
    )


def measure(
    pool: ProcessPoolExecutor,
    target: str,
    pid: int,
    model: str,
    inputs: list[bytes],
    args: argparse.Namespace,
    plain: tuple[tuple[str, str], ...] | None = None,
) -> dict:
    """Every shape against one server (``plain``: plain TorchServe, with its call metadata)."""
    out = {}
    build = requests(model, inputs) if plain is None else model_batches(model, inputs)
    for shape, (per_request, _) in SHAPES.items():
        payloads = build(per_request, max(1, len(inputs) // per_request))
        sampler = Sampler(pid)
        cpu = sampler.cpu()
        started = time.perf_counter()
        result = run_load(pool, target, payloads, shape, args, plain=plain).result()
        result["service_cpu_share"] = (sampler.cpu() - cpu) / (time.perf_counter() - started)
        sampler.stop()
        result["service_peak_rss_mb"] = sampler.peak / 2**20
        if result["errors"]:
            raise SystemExit(f"{model} {shape}: {result['errors'][0]}")
        inside = result.get("server_p50_ms")
        where = "" if inside is None else "; in the server p50 "
        where += ", ".join(f"{k} {v:.2f} ms" for k, v in (inside or {}).items())
        _log(
            f"{model} {shape}: {result['items_per_s']:.0f} items/s, p50 {result['p50_ms']:.2f} ms"
            f" (load generator {result['loadgen_cpu_share']:.0%} of a core, server "
            f"{result['service_cpu_share']:.0%}{where})"
        )
        out[shape] = result
    return out


@contextlib.contextmanager
def plain_torchserve(workdir: Path) -> Iterator[tuple[str, tuple[tuple[str, str], ...], int]]:
    """TorchServe 0.12 serving the archives of model_store/archives with the settings the
    TorchServe backend gives it (same workers per model, loopback ports), started and stopped by
    that backend's own code: (gRPC target, call metadata with its token, frontend pid)."""
    from conftest import free_port

    from quotient_service.backends.torchserve import TorchServeBackend
    from quotient_service.config import Settings

    ports = [free_port() for _ in range(5)]
    settings = Settings(
        backend="torchserve",
        torchserve_workdir=str(workdir),
        torchserve_grpc_port=ports[0],
        torchserve_grpc_management_port=ports[1],
        torchserve_inference_port=ports[2],
        torchserve_management_port=ports[3],
        torchserve_metrics_port=ports[4],
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    backend = TorchServeBackend(settings)
    try:
        asyncio.run_coroutine_threadsafe(backend.start(), loop).result(300)
        target, metadata, pid = backend.direct_access()
        if pid is None:
            raise SystemExit("TorchServe started without a process")
        yield target, metadata, pid
    finally:
        asyncio.run_coroutine_threadsafe(backend.stop(), loop).result(120)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def ts_flags(workdir: Path) -> list[str]:
    """quotient-server flags for the TorchServe backend on free loopback ports."""
    from conftest import free_port

    names = ["grpc-port", "grpc-management-port", "inference-port", "management-port",
             "metrics-port"]  # fmt: skip
    flags = ["--torchserve-workdir", str(workdir / "ts")]
    for name in names:
        flags += [f"--torchserve-{name}", str(free_port())]
    return flags


# ---------------------------------------------------------------------- memory
def model_memory(
    pool: ProcessPoolExecutor,
    model: str,
    inputs: list[bytes],
    flags: list[str],
    args: argparse.Namespace,
) -> dict:
    """The service serving ``model`` alone (``--models``): resident memory once it is ready
    (loaded and warmed up) and its peak under the ``large`` load."""
    payloads = requests(model, inputs)(SHAPES["large"][0], max(1, len(inputs) // 64))
    with (
        tempfile.TemporaryDirectory() as tmp,
        quotient_server(Path(tmp), *flags, "--models", model) as (target, pid),
    ):
        sampler = Sampler(pid)
        ready = sampler.rss()
        result = run_load(pool, target, payloads, "large", args).result()
        sampler.stop()
    if result["errors"]:
        raise SystemExit(f"{model} memory: {result['errors'][0]}")
    return {
        "ready_rss_mb": ready / 2**20,
        "peak_rss_mb": max(ready, sampler.peak) / 2**20,
        "large_items_per_s": result["items_per_s"],
    }


def soak(
    models: list[str], inputs: dict[str, list[bytes]], flags: list[str], args: argparse.Namespace
) -> dict:
    """``args.soak`` seconds of saturation on one service serving ``models``: 1-item requests
    (``--concurrency`` in flight) and 64-item requests (4 in flight) at once, every model in
    turn; resident memory (server and children) sampled every second."""
    payloads = {}
    for shape in ("single", "large"):
        per_request = SHAPES[shape][0]
        each = [
            requests(m, inputs[m])(per_request, max(1, len(inputs[m]) // per_request))
            for m in models
        ]
        payloads[shape] = [p for group in itertools.zip_longest(*each) for p in group if p]
    spawn = get_context("spawn")
    with (
        ProcessPoolExecutor(2, mp_context=spawn) as pool,
        tempfile.TemporaryDirectory() as tmp,
        quotient_server(Path(tmp), *flags, "--models", ",".join(models)) as (target, pid),
    ):
        sampler = Sampler(pid, every=1.0, keep=True)
        cpu, started = sampler.cpu(), time.perf_counter()
        runs = {s: run_load(pool, target, payloads[s], s, args, args.soak) for s in payloads}
        results = {s: f.result() for s, f in runs.items()}
        cpu_share = (sampler.cpu() - cpu) / (time.perf_counter() - started)
        sampler.stop()
    for shape, result in results.items():
        if result["errors"]:
            raise SystemExit(f"soak {shape}: {result['errors'][0]}")
    begin = max(r["window"][0] for r in results.values())  # both loads past their warm-up
    end = min(r["window"][1] for r in results.values())
    timeline = [(t - begin, rss / 2**20) for t, rss in sampler.timeline if begin <= t <= end]
    if len(timeline) < 4:
        raise SystemExit(f"soak: {len(timeline)} memory samples in the window; raise --soak")
    t, mb = np.array(timeline).T
    window = min(args.soak_window, (end - begin) / 4)
    first, last = np.median(mb[t <= window]), np.median(mb[t >= t[-1] - window])
    half = t >= t[-1] / 2
    slope = float(np.polyfit(t[half], mb[half], 1)[0]) * 60 if half.sum() > 1 else float("nan")
    return {
        "seconds": end - begin,
        "models": models,
        "shapes": {
            s: {
                k: r[k]
                for k in ("items_per_s", "p50_ms", "p99_ms", "requests", "loadgen_cpu_share")
            }
            for s, r in results.items()
        },
        "service_cpu_share": cpu_share,
        "rss_first_mb": float(first),
        "rss_last_mb": float(last),
        "rss_growth_mb": float(last - first),
        "rss_max_mb": float(mb.max()),
        "second_half_slope_mb_per_min": slope,
        "window_s": window,
        "timeline": [[round(a, 1), round(b, 1)] for a, b in timeline],
    }


def soak_plot(result: dict, path: Path) -> None:
    """Resident memory over the soak, as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no soak plot")
        return
    t, mb = np.array(result["timeline"]).T
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(t / 60, mb, lw=1)
    ax.set_xlabel("minutes at saturation")
    ax.set_ylabel("service RSS (MiB)")
    ax.set_title(
        f"soak: {', '.join(result['models'])}; growth {result['rss_growth_mb']:+.1f} MiB "
        f"(first vs last {result['window_s']:.0f} s)"
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- report
def table(results: dict) -> str:
    rows = [
        "| model | raw items/s (batch 64) | served by | 1 item × 32 | 64 items × 4 |"
        " idle p50 / p99 (ms), raw | served |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, r in results["models"].items():
        raw = r["raw"]
        for service in [s for s in (*SERVICES, PLAIN) if s in r]:
            svc = r[service]
            cells = [f"{raw['items_per_s']:,.0f}", service]
            for shape in ("single", "large"):
                rate, ratio = svc[shape]["items_per_s"], svc[shape]["ratio_to_raw"]
                versus = svc[shape].get("ratio_to_plain_torchserve")
                plain = "" if versus is None else f", {versus:.2f}× plain TorchServe"
                cells.append(f"{rate:,.0f} ({ratio:.2f}×{plain})")
            cells.append(f"{raw['idle']['p50_ms']:.2f} / {raw['idle']['p99_ms']:.2f}")
            cells.append(f"{svc['idle']['p50_ms']:.2f} / {svc['idle']['p99_ms']:.2f}")
            rows.append(f"| {model} | " + " | ".join(cells) + " |")
    floors = {m: r["grpc floor"] for m, r in results["models"].items() if "grpc floor" in r}
    if floors:
        rows += [
            "",
            "| model | gRPC floor, 1 item × 32 (calls/s) | its CPU per call: server + client (ms) "
            "| raw model's CPU per item (ms) | 1 item × 32 at most, any gRPC Python service "
            "(client here / elsewhere) |",
            "|---|---|---|---|---|",
        ]
        for model, f in floors.items():
            rows.append(
                f"| {model} | {f['calls_per_s']:,.0f} | {f['server_cpu_ms_per_call']:.3f} + "
                f"{f['client_cpu_ms_per_call']:.3f} | {f['model_cpu_ms_per_item']:.3f} | "
                f"{f['single_ceiling_ratio_to_raw']:.2f}× / "
                f"{f['single_ceiling_server_only_ratio_to_raw']:.2f}× raw |"
            )
    memory = {m: r for m, r in results["models"].items() if "memory" in r}
    if memory:
        rows += [
            "",
            "| model | raw process: RSS added by loading (MiB) | service serving it alone: "
            "RSS at ready | peak under 64 items × 4 |",
            "|---|---|---|---|",
        ]
        for model, r in memory.items():
            raw, mem = r["raw"]["rss_mb"], r["memory"]
            rows.append(
                f"| {model} | {raw['loaded'] - raw['before_load']:,.0f} | "
                f"{mem['ready_rss_mb']:,.0f} | {mem['peak_rss_mb']:,.0f} |"
            )
    if "soak" in results:
        r = results["soak"]
        rows += [
            "",
            f"Soak, {r['seconds'] / 60:.1f} min at saturation ({', '.join(r['models'])}): RSS "
            f"{r['rss_first_mb']:,.0f} → {r['rss_last_mb']:,.0f} MiB ({r['rss_growth_mb']:+.1f}; "
            f"medians of the first and last {r['window_s']:.0f} s), max {r['rss_max_mb']:,.0f}, "
            f"second half {r['second_half_slope_mb_per_min']:+.2f} MiB/min",
        ]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--inputs", type=int, default=2048, help="distinct inputs per model")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before counting")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds counted")
    parser.add_argument("--concurrency", type=int, default=32, help="in flight, shape single")
    parser.add_argument("--check-every", type=int, default=16, help="answers parsed and checked")
    parser.add_argument(
        "--no-torchserve",
        dest="torchserve",
        action="store_false",
        help="skip the TorchServe backend and plain TorchServe (no Java, no archives)",
    )
    parser.add_argument("--engine", default="onnx", choices=("onnx", "torch"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (raw and service)")
    parser.add_argument(
        "--serve",
        default="",
        help="models the service serves (--models); empty: all of model_store (as make serve)",
    )
    parser.add_argument("--inputs-from", type=Path, help="DIR/<model>.npz instead of data/")
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the service's memory per model",
    )
    parser.add_argument("--soak", type=float, default=0.0, help="seconds of soak (0: none)")
    parser.add_argument(
        "--soak-window",
        type=float,
        default=60.0,
        help="seconds at each end of the soak whose median RSS is compared",
    )
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    base = ["--engine", args.engine, "--device", args.device]
    if args.serve:
        base += ["--models", args.serve]

    spawn = get_context("spawn")
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "settings": {k: str(v) for k, v in vars(args).items()},
        "models": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    inputs = {model: client_inputs(model, args.inputs, args.inputs_from) for model in models}
    for model in models:
        _log(f"{model}: raw model in-process")
        with ProcessPoolExecutor(1, mp_context=spawn) as alone:  # a process of its own
            raw = alone.submit(
                raw_model,
                model,
                inputs[model],
                args.warmup,
                args.duration,
                args.engine,
                args.device,
            ).result()
        _log(f"{model} raw: {raw['items_per_s']:.0f} items/s, p50 {raw['idle']['p50_ms']:.2f} ms")
        results["models"][model] = {"raw": raw}
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            floor = grpc_floor(pool, model, inputs[model], raw, args)
        _log(
            f"{model} gRPC floor: {floor['calls_per_s']:.0f} calls/s, CPU per call server "
            f"{floor['server_cpu_ms_per_call']:.3f} ms + client "
            f"{floor['client_cpu_ms_per_call']:.3f} ms vs model "
            f"{floor['model_cpu_ms_per_item']:.3f} ms per item: 1 item/request at most "
            f"{floor['single_ceiling_ratio_to_raw']:.2f}× raw"
            f" ({floor['single_ceiling_server_only_ratio_to_raw']:.2f}× with the client elsewhere)"
        )
        results["models"][model]["grpc floor"] = floor
    services = [s for s in SERVICES if args.torchserve or "torchserve" not in s]
    for service in services:
        flags = base + SERVICES[service]
        with (
            ProcessPoolExecutor(1, mp_context=spawn) as pool,
            tempfile.TemporaryDirectory() as tmp,
        ):
            if "torchserve" in service:
                flags += ts_flags(Path(tmp))
            with quotient_server(Path(tmp), *flags) as (target, pid):
                for model in models:
                    _log(f"{model}: service ({service})")
                    svc = measure(pool, target, pid, model, inputs[model], args)
                    raw_rate = results["models"][model]["raw"]["items_per_s"]
                    for shape in ("single", "large"):
                        svc[shape]["ratio_to_raw"] = svc[shape]["items_per_s"] / raw_rate
                    results["models"][model][service] = {"flags": flags, **svc}
    if args.torchserve:
        with (
            ProcessPoolExecutor(1, mp_context=spawn) as pool,
            tempfile.TemporaryDirectory() as tmp,
            plain_torchserve(Path(tmp) / "ts") as (target, metadata, pid),
        ):
            for model in models:
                _log(f"{model}: {PLAIN}")
                plain = measure(pool, target, pid, model, inputs[model], args, metadata)
                backend = results["models"][model]["torchserve backend"]
                raw_rate = results["models"][model]["raw"]["items_per_s"]
                for shape in ("single", "large"):
                    rate = plain[shape]["items_per_s"]
                    plain[shape]["ratio_to_raw"] = rate / raw_rate
                    backend[shape]["ratio_to_plain_torchserve"] = (
                        backend[shape]["items_per_s"] / rate
                    )
                results["models"][model][PLAIN] = plain
    if args.memory:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            for model in models:
                _log(f"{model}: memory of the service serving it alone")
                memory = model_memory(pool, model, inputs[model], base[:4], args)
                _log(
                    f"{model}: {memory['ready_rss_mb']:.0f} MiB ready, "
                    f"{memory['peak_rss_mb']:.0f} MiB at peak"
                )
                results["models"][model]["memory"] = memory
    if args.soak:
        _log(f"soak: {args.soak:.0f} s at saturation, {', '.join(models)}")
        results["soak"] = soak(models, inputs, base[:4], args)
        soak_plot(results["soak"], args.out.with_name("soak.png"))
        r = results["soak"]
        _log(
            f"soak: {r['rss_first_mb']:.0f} → {r['rss_last_mb']:.0f} MiB "
            f"({r['rss_growth_mb']:+.1f}), max {r['rss_max_mb']:.0f}, second half "
            f"{r['second_half_slope_mb_per_min']:+.2f} MiB/min"
        )
    print(table(results))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
