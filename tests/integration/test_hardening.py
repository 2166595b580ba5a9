"""Heavy and hostile requests through the public gRPC API (embedded backend, real models): cheap
bounds before parsing, the per-request pixel budget, fair decoding between requests, deadlines and
cancellation that stop decoding, and admission control by items, bytes and concurrent calls.

Each test counts the items the server really prepared (a counter around the model's own
``prepare``) instead of timing it: "refused before decoding" means the counter did not move.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from quotient_client.proto import embedding_service_pb2 as pb
from quotient_client.proto import embedding_service_pb2_grpc as pb_grpc

pytest.importorskip("rdkit", reason="molecule models need RDKit (make install-molecules)")

IMAGE, MOLECULE = "rotmnist-c8", "qm9-vae"


class Counted:
    """Counts the calls of one model's ``prepare`` in a running server."""

    def __init__(self, service, model: str) -> None:
        self.model = service.app.backend.models()[model]
        self.inner, self.count, self.lock = self.model.prepare, 0, threading.Lock()
        self.model.prepare = self  # an instance attribute shadows the method

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.count += 1
        return self.inner(*args, **kwargs)

    def restore(self) -> None:
        del self.model.prepare


@pytest.fixture(scope="module")
def black() -> bytes:
    """16 KB of PNG that decodes to 4096 x 4096 pixels (the largest allowed)."""
    from conftest import encode_png

    return encode_png(np.zeros((4096, 4096), dtype=np.uint8))


@pytest.fixture(scope="module")
def service(start_service):
    """Room for very large requests, so that only the limit under test applies."""
    return start_service(max_request_pixels=1 << 34, max_inflight_items=64)


@pytest.fixture
def counted(service) -> Iterator[Counted]:
    c = Counted(service, IMAGE)
    yield c
    c.restore()


def images(data: bytes, n: int) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=IMAGE, inputs=[pb.Input(image=pb.Image(data=data))] * n)


def stub(target: str) -> pb_grpc.EmbeddingServiceStub:
    return pb_grpc.EmbeddingServiceStub(grpc.insecure_channel(target))


def wait_for(condition, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.01)


def error_info(err: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo, float | None]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    info, retry = error_details_pb2.ErrorInfo(), None
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            hint = error_details_pb2.RetryInfo()
            detail.Unpack(hint)
            retry = hint.retry_delay.ToTimedelta().total_seconds()
    return info, retry


# ---------------------------------------------------------------- cheap bounds (point 3)


@pytest.mark.parametrize(
    ("molecule", "reason"),
    [
        (pb.Molecule(smiles="C" * 1_000_000), "SMILES of 1000000 characters is longer than"),
        (
            pb.Molecule(
                molblock="\n  RDKit          3D\n\n  0  0  0  0  0  0  0  0  0  0999 V3000\n"
                "M  V30 BEGIN CTAB\nM  V30 COUNTS 100000000 0 0 0 0\nM  V30 END CTAB\nM  END\n"
            ),
            "declares 100000000 atoms",
        ),
    ],
    ids=["smiles-1M", "v3000-counts"],
)
def test_expensive_molecules_are_refused_before_parsing(service, molecule, reason):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = pb.EmbedRequest(
        model=MOLECULE,
        inputs=[pb.Input(molecule=pb.Molecule(smiles="CCO")), pb.Input(molecule=molecule)],
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub(service.target).Embed(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("input 1: ") and reason in caught.value.details()
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"peak RSS grew by {grown_mb:.0f} MB"  # 930 MB and 3.1 GB before


# ---------------------------------------------------------------- decode work (point 4)


def test_a_request_over_the_pixel_budget_is_refused_before_decoding(start_service, black):
    service = start_service()  # the default budget: 64 Mi pixels per request
    counted = Counted(service, IMAGE)
    with pytest.raises(grpc.RpcError) as caught:
        stub(service.target).Embed(images(black, 256), timeout=30)  # 4.2 MB, 4.3 G pixels
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info, _ = error_info(caught.value)
    assert info.reason == "TOO_MANY_PIXELS" and info.metadata["index"] == "4"
    assert "--max-request-pixels" in caught.value.details()
    assert counted.count == 0
    assert stub(service.target).Embed(images(black, 4), timeout=60).embeddings  # at the limit


def test_a_small_request_is_not_starved_by_a_large_one(service, counted, black):
    target = service.target
    done: dict[str, float] = {}

    def run(name: str, request: pb.EmbedRequest) -> None:
        stub(target).Embed(request, timeout=120)
        done[name] = time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        large = pool.submit(run, "large", images(black, 48))
        wait_for(lambda: counted.count >= 4)
        from conftest import digit, encode_png

        small = pool.submit(run, "small", images(encode_png(digit(1)), 2))
        small.result(120)
        prepared_when_small_done = counted.count
        large.result(120)
    assert done["small"] < done["large"]
    # the large request's items decoded meanwhile: at most one per free thread and turn
    assert prepared_when_small_done < 48, prepared_when_small_done
    print(f"\nsmall request done after {prepared_when_small_done} of 48 large items were started")


def test_the_server_deadline_covers_decoding_and_stops_it(start_service, black):
    service = start_service(request_timeout_s=0.5, max_request_pixels=1 << 34)
    counted = Counted(service, IMAGE)
    with pytest.raises(grpc.RpcError) as caught:
        stub(service.target).Embed(images(black, 64), timeout=60)  # no client deadline
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "decoding 64 inputs did not finish within the deadline" in caught.value.details()
    time.sleep(0.6)  # items already running finish; no new one starts
    settled = counted.count
    time.sleep(0.6)
    assert counted.count == settled < 64, (settled, counted.count)


def test_a_cancelled_call_stops_its_decoding(service, counted, black):
    future = stub(service.target).Embed.future(images(black, 64), timeout=120)
    wait_for(lambda: counted.count >= 2)
    assert future.cancel()
    time.sleep(0.6)
    settled = counted.count
    time.sleep(0.6)
    assert counted.count == settled < 64, (settled, counted.count)
    assert service.app.engine._pool.waiting == 0


# ---------------------------------------------------------------- admission (point 5)


def test_items_over_the_inflight_limit_are_refused_with_a_retry_hint(service, counted, black):
    from conftest import digit, encode_png

    small = encode_png(digit(2))
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(stub(service.target).Embed, images(black, 48), timeout=120)
        wait_for(lambda: counted.count >= 1)
        before = counted.count
        with pytest.raises(grpc.RpcError) as caught:
            stub(service.target).Embed(images(small, 20), timeout=30)  # 48 + 20 > 64
        assert counted.count - before <= 2  # refused before its own items were decoded
        decode = pb.DecodeRequest(model=MOLECULE, embeddings=[pb.Embedding(values=[0.0] * 72)] * 20)
        with pytest.raises(grpc.RpcError) as decode_caught:
            stub(service.target).Decode(decode, timeout=30)  # Decode rows count as items
        assert stub(service.target).Embed(images(small, 8), timeout=60).embeddings  # fits
        large.result(120)
    for err in (caught.value, decode_caught.value):
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info, retry = error_info(err)
        assert info.reason == "INFLIGHT_LIMIT" and retry is not None and 0 < retry <= 10
        assert "--max-inflight-items" in err.details()
    from prometheus_client import generate_latest

    exposition = generate_latest(service.app.metrics.registry).decode()  # counted by method
    assert 'quotient_shed_calls_total{limit="items",method="Embed"}' in exposition
    assert 'quotient_shed_calls_total{limit="items",method="Decode"}' in exposition


def test_bytes_over_the_inflight_limit_are_refused(start_service, black):
    from conftest import encode_png

    service = start_service(max_inflight_bytes=1 << 20, max_request_pixels=1 << 34)
    counted = Counted(service, IMAGE)
    noise = encode_png(np.random.default_rng(0).integers(0, 256, (600, 600), dtype=np.uint8))
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(stub(service.target).Embed, images(black, 16), timeout=120)
        wait_for(lambda: counted.count >= 1)
        with pytest.raises(grpc.RpcError) as caught:
            stub(service.target).Embed(images(noise, 3), timeout=30)  # ~1.1 MB more
        large.result(120)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-inflight-bytes" in caught.value.details()
    assert stub(service.target).Embed(images(noise, 3), timeout=60).embeddings  # alone: fine


def test_calls_over_the_concurrency_limit_are_refused_before_their_message(start_service, black):
    service = start_service(max_concurrent_calls=2, max_request_pixels=1 << 34)
    counted = Counted(service, IMAGE)
    with ThreadPoolExecutor(2) as pool:
        running = [
            pool.submit(stub(service.target).Embed, images(black, 8), timeout=120) for _ in range(2)
        ]
        wait_for(lambda: counted.count >= 2)
        with pytest.raises(grpc.RpcError) as caught:
            stub(service.target).Embed(images(black, 1), timeout=30)
        for call in running:
            call.result(120)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert counted.count == 16


def test_decode_calls_do_not_hold_up_embed(start_service):
    """20 concurrent 256-row Decode calls delayed an Embed by 13 s: now they share the model's
    threads one 32-row chunk at a time and count against the in-flight items."""
    service = start_service()  # default limits: 2,048 items in flight
    s = stub(service.target)
    smiles = ["CCO", "c1ccccc1", "CC(=O)N", "OC1CC1", "CCN", "C#N", "CC(C)O", "O=CO"]
    request = pb.EmbedRequest(
        model=MOLECULE, inputs=[pb.Input(molecule=pb.Molecule(smiles=m)) for m in smiles]
    )
    rows = [e for e in s.Embed(request, timeout=30).embeddings]
    decode = pb.DecodeRequest(model=MOLECULE, embeddings=(rows * 13)[:100])
    codes: list[str] = []
    finished: list[float] = []

    def one() -> None:
        try:
            s.Decode(decode, timeout=120)
            codes.append("OK")
        except grpc.RpcError as err:
            codes.append(err.code().name)
        finished.append(time.monotonic())

    with ThreadPoolExecutor(20) as pool:
        calls = [pool.submit(one) for _ in range(20)]
        time.sleep(0.2)
        start = time.monotonic()
        answer = s.Embed(pb.EmbedRequest(model=MOLECULE, inputs=request.inputs[:1]), timeout=30)
        embed_seconds = time.monotonic() - start
        for call in calls:
            call.result(120)
    assert len(answer.embeddings) == 1
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and "OK" in codes, codes
    ok_last = max(finished)
    assert start + embed_seconds < ok_last, "the Embed waited for every Decode call"
    print(
        f"\nEmbed during 20 Decode calls of 100 rows: {embed_seconds * 1000:.0f} ms; decode calls "
        f"{codes.count('OK')} OK, {codes.count('RESOURCE_EXHAUSTED')} shed; last decode "
        f"{ok_last - start:.2f} s after the Embed began"
    )


def test_a_non_finite_model_output_is_never_sent(start_service, png, digits, caplog):
    """Fault injection: the encoder answers NaN for one row; the call fails INTERNAL with its
    call id, and no response carries the value."""
    service = start_service()
    model = service.app.backend.models()[IMAGE]
    encoder = model.encoder

    def broken(x):
        out = [np.array(o, copy=True) for o in encoder(x)]
        out[0][1] = np.nan
        return out

    model.encoder = broken
    try:
        with (
            caplog.at_level("ERROR", logger="quotient_service.errors"),
            pytest.raises(grpc.RpcError) as caught,
        ):
            stub(service.target).Embed(images(png(digits(0)), 3), timeout=30)
    finally:
        model.encoder = encoder
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    call = error_info(caught.value)[0].metadata["call_id"]
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and call in lines[0] and "non-finite values for inputs [1]" in lines[0]
    assert stub(service.target).Embed(images(png(digits(0)), 3), timeout=30).embeddings


def test_a_stream_message_over_the_limit_is_answered_and_the_stream_goes_on(
    service, counted, black, png, digits
):
    """Each EmbedStream message is admitted on its own: one over --max-inflight-items gets its
    RESOURCE_EXHAUSTED answer in the stream, the next is served."""
    small = png(digits(3))
    requests = [
        pb.EmbedRequest(model=IMAGE, request_id="over", inputs=images(small, 20).inputs),
        pb.EmbedRequest(model=IMAGE, request_id="fits", inputs=images(small, 4).inputs),
    ]
    with ThreadPoolExecutor(1) as pool:
        large = pool.submit(stub(service.target).Embed, images(black, 48), timeout=120)
        wait_for(lambda: counted.count >= 1)
        s = stub(service.target)
        answers = list(s.EmbedStream(iter(requests), timeout=60))  # stream_concurrency 8
        large.result(120)
    assert [a.request_id for a in answers] == ["over", "fits"]
    assert answers[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "--max-inflight-items" in answers[0].error.message
    assert len(answers[1].response.embeddings) == 4


def test_a_call_with_less_time_left_than_calls_take_is_refused_before_work(start_service):
    """Under overload calls reach the servicer late; one whose remaining time is below what
    calls like it take now is refused (retryable) before it costs decoding or a batch slot."""
    from quotient_service.errors import ResourceExhausted

    service = start_service()
    engine, counted = service.app.engine, Counted(service, MOLECULE)
    for _ in range(5):
        service.lt.run(engine.embed(MOLECULE, [("molecule", b"CCO")], "", 30.0))
    before = counted.count
    with pytest.raises(ResourceExhausted) as caught:
        service.lt.run(engine.embed(MOLECULE, [("molecule", b"CCO")], "", 1e-5))
    assert caught.value.reason == "DEADLINE_TOO_CLOSE" and caught.value.retry_after_s > 0
    assert counted.count == before
    large = [("molecule", b"CCO")] * 100  # more than one batch: no such estimate, served
    assert len(service.lt.run(engine.embed(MOLECULE, large, "", 30.0)).values) == 100
