"""The public gRPC API with ``--backend torchserve`` against the same API with the embedded backend:
same embeddings (max relative difference 1e-5) and poses for every projection, and a bad input
answered the same way; then faults under load: a killed worker, a killed TorchServe (JVM). One
TorchServe start for the module, with 3 s inference tokens (renewed all along). The fault tests
print what they measured (run with ``-s``)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc
from quotient_models.invariance import relative_change
from quotient_service.servicer import SERVICE_NAME

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("java") is None, reason="TorchServe needs a Java runtime (`java` not on PATH)"
    ),
]

MODEL = "tiny-c4"
PROJECTIONS = ["align", "maxfilter", "mean", "max", "raw"]


@pytest.fixture(scope="module")
def torchserve_target(torchserve_service_at, tiny_model_store: Path) -> Iterator[str]:
    with torchserve_service_at(
        tiny_model_store, health_check_interval_s=0.5, torchserve_token_expiration_min=0.05
    ) as target:
        yield target


@pytest.fixture(scope="module")
def embedded_target(start_service, tiny_model_store: Path) -> str:
    return start_service(model_store=str(tiny_model_store)).target


def embed(target: str, data: list[bytes], projection: str) -> pb.EmbedResponse:
    with grpc.insecure_channel(target) as channel:
        request = pb.EmbedRequest(
            model=MODEL,
            projection=projection,
            inputs=[pb.Input(image=pb.Image(data=d)) for d in data],
        )
        return pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=60)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_both_backends_give_the_same_embeddings(
    torchserve_target: str, embedded_target: str, png, digits, projection: str
) -> None:
    data = [png(np.rot90(digits(s), s % 4).copy()) for s in range(9)]
    ts, emb = embed(torchserve_target, data, projection), embed(embedded_target, data, projection)
    ts_values = np.array([e.values for e in ts.embeddings], dtype=np.float32)
    emb_values = np.array([e.values for e in emb.embeddings], dtype=np.float32)
    assert ts_values.shape == emb_values.shape == (9, ts_values.shape[1])
    assert relative_change(emb_values, ts_values).max() <= 1e-5
    assert [e.pose.rotation_degrees for e in ts.embeddings] == [
        e.pose.rotation_degrees for e in emb.embeddings
    ]
    assert (ts.projection, ts.invariant) == (emb.projection, emb.invariant)


def test_both_backends_describe_the_model_alike(torchserve_target: str, embedded_target: str):
    """GetModel, metric and normalisation of each projection included, does not depend on the
    backend (both describe a model from its directory, as TorchServe's workers project by it)."""
    models = []
    for target in (torchserve_target, embedded_target):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            models.append(stub.GetModel(pb.GetModelRequest(name=MODEL), timeout=30))
    assert models[0] == models[1]
    assert [p.metric for p in models[0].projections] == [pb.DISTANCE_METRIC_L2] * len(PROJECTIONS)


def test_a_bad_input_is_answered_alike(
    torchserve_target: str, embedded_target: str, png, digits
) -> None:
    data = [png(digits(0)), b"not an image"]
    codes = []
    for target in (torchserve_target, embedded_target):
        with pytest.raises(grpc.RpcError) as info:
            embed(target, data, "align")
        # the reason names the item; its tail may hold an object address, so compare the head
        codes.append((info.value.code(), info.value.details().split(":")[0]))
    assert codes[0] == codes[1] == (grpc.StatusCode.INVALID_ARGUMENT, "input 1")
    # and TorchServe still serves afterwards
    assert len(embed(torchserve_target, data[:1], "align").embeddings) == 1


@dataclass
class Outcome:
    started: float  # monotonic
    ended: float
    code: grpc.StatusCode
    reason: str = ""  # the ErrorInfo reason of a failure
    right: bool = True  # a success with the expected embedding


@dataclass
class Load:
    """A client thread sending one Embed call after another (each up to 10 s, for at most 120 s),
    recording every outcome; successes are checked against ``want``."""

    target: str
    request: pb.EmbedRequest
    want: np.ndarray
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        end = time.monotonic() + 120
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.EmbeddingServiceStub(channel)
            while not self._stop.is_set() and time.monotonic() < end:
                started = time.monotonic()
                try:
                    answer = stub.Embed(self.request, timeout=10)
                    got = np.array([e.values for e in answer.embeddings], dtype=np.float32)
                    right = got.shape == self.want.shape and bool(
                        relative_change(self.want, got).max() <= 1e-5
                    )
                    self.outcomes.append(
                        Outcome(started, time.monotonic(), grpc.StatusCode.OK, right=right)
                    )
                    time.sleep(0.01)
                except grpc.RpcError as err:
                    code, reason = err.code(), _reason(err)  # type: ignore[attr-defined]
                    self.outcomes.append(Outcome(started, time.monotonic(), code, reason))
                    time.sleep(0.05)

    def first_success_after(self, moment: float, within: float) -> float:
        """When the first call started after ``moment`` succeeded."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            done = [o for o in list(self.outcomes) if o.started >= moment and o.code == OK]
            if done:
                return done[0].ended
            time.sleep(0.05)
        raise AssertionError(f"no successful call {within:.0f} s after the fault")

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != OK]

    def summary(self) -> str:
        failed = Counter(f"{o.code.name}/{o.reason}" for o in self.failures())
        return f"{len(self.failures())} of {len(self.outcomes)} calls failed {dict(failed)}"


OK = grpc.StatusCode.OK
LOGGER = "quotient_service.backends.torchserve"


def _reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def _torchserve() -> tuple[int, list[int]]:
    """(JVM pid, worker pids) of this module's TorchServe (its working directory is ts-work*)."""
    jvms = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b"org.pytorch.serve.ModelServer" in _read(p) and "ts-work" in _cwd(p.parent)
    ]
    assert len(jvms) == 1, jvms
    workers = [
        int(p.parent.name)
        for p in Path("/proc").glob("[0-9]*/cmdline")
        if b"model_service_worker" in _read(p) and _ppid(p.parent) == jvms[0]
    ]
    return jvms[0], workers


def _health(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status  # type: ignore[no-any-return]


def _load(target: str, png, digits) -> Load:
    request = pb.EmbedRequest(model=MODEL, inputs=[pb.Input(image=pb.Image(data=png(digits(3))))])
    with grpc.insecure_channel(target) as channel:
        answer = pb_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=60)
    want = np.array([e.values for e in answer.embeddings], dtype=np.float32)
    return Load(target, request, want)


def test_a_killed_worker_costs_only_retryable_failures(
    torchserve_target: str, png, digits, caplog
) -> None:
    """SIGKILL of the Python worker under load: the batch it held fails UNAVAILABLE (NO_WORKER),
    TorchServe starts a new worker, calls succeed again within 30 s; no other code, no wrong
    answer."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    jvm, workers = _torchserve()
    assert len(workers) == 1, workers
    with _load(torchserve_target, png, digits) as load:
        load.first_success_after(time.monotonic(), within=30)
        os.kill(workers[0], signal.SIGKILL)
        killed = time.monotonic()
        recovered = load.first_success_after(killed, within=30) - killed
        time.sleep(0.5)
    print(f"\nworker SIGKILL: served again {recovered:.2f} s after the kill; {load.summary()}")
    assert {(o.code, o.reason) for o in load.failures()} <= {
        (grpc.StatusCode.UNAVAILABLE, "NO_WORKER")
    }
    assert all(o.right for o in load.outcomes)
    assert recovered < 30
    new_jvm, new_workers = _torchserve()
    assert new_jvm == jvm and len(new_workers) == 1 and new_workers != workers
    assert not [r for r in caplog.records if r.getMessage().startswith("TorchServe died")]


def test_a_killed_torchserve_is_restarted(torchserve_target: str, png, digits, caplog) -> None:
    """Last in the module. SIGKILL of the JVM under load: health turns NOT_SERVING, calls fail
    UNAVAILABLE (mostly TORCHSERVE_RESTARTING, answered at once) while the supervisor restarts
    TorchServe; then health is SERVING, calls succeed (within 60 s) and keep succeeding across
    the new instance's token renewals."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    jvm, _ = _torchserve()
    with (
        grpc.insecure_channel(torchserve_target) as channel,
        _load(torchserve_target, png, digits) as load,
    ):
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING
        load.first_success_after(time.monotonic(), within=30)
        os.kill(jvm, signal.SIGKILL)
        killed = time.monotonic()
        while _health(channel) != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() - killed < 15, "health still SERVING 15 s after the kill"
            time.sleep(0.05)
        not_serving = time.monotonic() - killed
        while _health(channel) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() - killed < 60, "health not SERVING 60 s after the kill"
            time.sleep(0.1)
        serving = time.monotonic() - killed
        recovered = load.first_success_after(killed, within=60) - killed
        after = time.monotonic()
        time.sleep(4.0)  # more than one token lifetime of the new TorchServe
    print(
        f"\nJVM SIGKILL: health NOT_SERVING after {not_serving:.2f} s, SERVING again after "
        f"{serving:.2f} s; served again {recovered:.2f} s after the kill; {load.summary()}"
    )
    failures = load.failures()
    assert {o.code for o in failures} == {grpc.StatusCode.UNAVAILABLE}
    assert "TORCHSERVE_RESTARTING" in {o.reason for o in failures}
    assert all(o.right for o in load.outcomes)
    assert recovered < 60
    assert [o for o in load.outcomes if o.started > after and o.code != OK] == []
    new_jvm, workers = _torchserve()
    assert new_jvm != jvm and len(workers) == 1
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    died = [m for m in messages if m[1].startswith("TorchServe died")]
    assert len(died) == 1 and died[0][0] == logging.ERROR and "exit code" in died[0][1], died
    assert any(m[1].startswith("TorchServe serving again after") for m in messages)
    assert any("token renewed" in m[1] for m in messages)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _cwd(proc: Path) -> str:
    try:
        return os.readlink(proc / "cwd")
    except OSError:
        return ""


def _ppid(proc: Path) -> int:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0
