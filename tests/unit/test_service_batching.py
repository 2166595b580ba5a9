"""The batcher with a fake model and a fake backend: merging, ordering, bounds, failures, deadlines,
cancellation, and a lone item of an idle model run at once (``run_alone``). Each test runs its
own event loop (``asyncio.run``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from quotient_models import serving
from quotient_models.projections import ProjectionInfo, ProjectionOutput
from quotient_models.runtime import EmbeddingModel, InputLimits
from quotient_models.spec import ModelSpec
from quotient_service.backends.base import Backend
from quotient_service.batching import Batcher
from quotient_service.config import Settings
from quotient_service.errors import DeadlineExceeded, ResourceExhausted, Unavailable


class FakeModel(EmbeddingModel):
    """Items are 3-vectors; the embedding of x is [sum(x), x0 * 2]; pose = x0 (degrees)."""

    def __init__(self) -> None:
        self.spec = ModelSpec("fake", "1", "", "image", "fake", {}, "p", Path("."), {})

    def projections(self) -> list[ProjectionInfo]:
        return [ProjectionInfo("p", 2, True, "")]

    def prepare(self, data: bytes, limits: InputLimits) -> np.ndarray:
        raise NotImplementedError

    def warmup_inputs(self) -> list[bytes]:
        raise NotImplementedError

    def collate(self, items: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {"x": np.stack(items)}

    def embed_batch(self, arrays, projection=None) -> ProjectionOutput:
        x = arrays["x"]
        return ProjectionOutput(np.stack([x.sum(1), x[:, 0] * 2], 1).astype(np.float32), x[:, 0])


class FakeBackend(Backend):
    def __init__(self, model: EmbeddingModel) -> None:
        self.model, self.batches, self.fail_next = model, [], False
        self.gate = asyncio.Event()
        self.gate.set()

    async def start(self): ...
    async def stop(self): ...
    async def ready(self):
        return True

    def models(self):
        return {"fake": self.model}

    async def run(self, model_name: str, payload: bytes) -> bytes:
        await self.gate.wait()
        arrays = serving._decode_batch(payload)[0]
        self.batches.append(len(arrays["x"]))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("backend crashed")
        return serving.handle_payload(self.model, payload)


def items(*values: float) -> list[np.ndarray]:
    return [np.array([v, 1.0, 2.0], np.float32) for v in values]


def expected(vals) -> np.ndarray:
    return np.array([[v + 3.0, v * 2] for v in vals], np.float32)


def make(**overrides) -> tuple[Batcher, FakeBackend, FakeModel]:
    model = FakeModel()
    backend = FakeBackend(model)
    settings = Settings(**{"max_batch_delay_ms": 20.0, **overrides})
    return Batcher(backend, settings), backend, model


def later(seconds: float = 5.0) -> float:
    return time.monotonic() + seconds


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_concurrent_requests_merge_into_one_batch_and_keep_their_own_rows():
    async def main():
        batcher, backend, model = make(max_batch_delay_ms=50.0)
        requests = [[1.0], [2.0, 3.0], [4.0, 5.0, 6.0], [7.0]]
        results = await asyncio.gather(
            *(batcher.submit(model, "p", items(*r), later()) for r in requests)
        )
        assert backend.batches == [7]
        for r, res in zip(requests, results, strict=True):
            np.testing.assert_array_equal(res.values, expected(r))
            np.testing.assert_array_equal(res.poses, r)
            assert res.batch_size == 7
        await batcher.stop()

    run(main())


def test_a_large_request_spans_batches_and_reassembles_in_order():
    async def main():
        batcher, backend, model = make(max_batch_items=4)
        vals = [float(v) for v in range(10)]
        res = await batcher.submit(model, "p", items(*vals), later())
        assert backend.batches == [4, 4, 2]
        np.testing.assert_array_equal(res.values, expected(vals))
        assert res.batch_size == 10
        await batcher.stop()

    run(main())


def test_cost_budget_limits_a_batch():
    async def main():
        batcher, backend, model = make(max_batch_cost=6)  # each item costs 3 (its size)
        await batcher.submit(model, "p", items(1, 2, 3, 4, 5), later())
        assert backend.batches == [2, 2, 1]
        await batcher.stop()

    run(main())


def test_queue_overflow_is_refused_at_once():
    async def main():
        batcher, backend, model = make(max_queue_items=4, max_batch_items=2, max_batch_delay_ms=0)
        backend.gate.clear()  # the first batch blocks in the backend
        first = asyncio.create_task(batcher.submit(model, "p", items(1, 2), later()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(model, "p", items(3, 4, 5, 6), later()))
        await asyncio.sleep(0.05)
        assert batcher.queued == 4
        with pytest.raises(ResourceExhausted):
            await batcher.submit(model, "p", items(7), later())
        backend.gate.set()
        assert len((await first).values) == 2 and len((await second).values) == 4
        assert batcher.queued == 0
        await batcher.stop()

    run(main())


def test_a_failed_batch_fails_only_its_requests_and_the_worker_goes_on():
    async def main():
        batcher, backend, model = make(max_batch_delay_ms=0)
        backend.fail_next = True
        with pytest.raises(Unavailable):
            await batcher.submit(model, "p", items(1), later())
        res = await batcher.submit(model, "p", items(2), later())
        np.testing.assert_array_equal(res.values, expected([2]))
        await batcher.stop()

    run(main())


def test_stale_items_are_dropped_before_they_cost_a_batch():
    async def main():
        batcher, backend, model = make(max_batch_delay_ms=0, max_batch_items=1)
        backend.gate.clear()
        first = asyncio.create_task(batcher.submit(model, "p", items(1), later()))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(model, "p", items(2, 3), later(0.1))
        assert batcher.queued == 0
        backend.gate.set()
        await first
        await asyncio.sleep(0.05)
        assert backend.batches == [1]  # the stale request's items never ran
        await batcher.stop()

    run(main())


def test_a_cancelled_call_leaves_the_queue():
    async def main():
        batcher, backend, model = make(max_batch_delay_ms=0, max_batch_items=1)
        backend.gate.clear()
        first = asyncio.create_task(batcher.submit(model, "p", items(1), later()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(batcher.submit(model, "p", items(2, 3, 4), later()))
        await asyncio.sleep(0.05)
        assert batcher.queued == 3
        second.cancel()
        await asyncio.sleep(0.01)
        assert batcher.queued == 0
        backend.gate.set()
        await first
        assert backend.batches == [1]
        await batcher.stop()

    run(main())


def test_stop_fails_waiting_requests():
    async def main():
        batcher, backend, model = make(max_batch_delay_ms=0, max_batch_items=1)
        backend.gate.clear()
        running = asyncio.create_task(batcher.submit(model, "p", items(1), later()))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(batcher.submit(model, "p", items(2, 3), later()))
        await asyncio.sleep(0.05)
        await batcher.stop()
        for task in (running, waiting):  # in a running batch or still queued: both fail at once
            with pytest.raises(Unavailable):
                await asyncio.wait_for(task, 1.0)

    run(main())


def test_a_call_that_would_outwait_its_deadline_in_the_backlog_is_refused_at_once():
    """After full batches have run slowly, a backlog of several batches means a call with a
    short deadline cannot be served in time: QUEUE_TOO_LONG at once, with a retry hint; a call
    with a long deadline still queues."""

    class Slow(FakeBackend):
        async def run(self, model_name: str, payload: bytes) -> bytes:
            await asyncio.sleep(0.1)  # 4 items per 0.1 s: 40 items/s
            return await super().run(model_name, payload)

    async def main():
        model = FakeModel()
        batcher = Batcher(Slow(model), Settings(max_batch_items=4, max_batch_delay_ms=1.0))
        await batcher.submit(model, "p", items(1, 2, 3, 4), later())  # one full batch: a speed
        backlog = asyncio.ensure_future(batcher.submit(model, "p", items(*range(16)), later()))
        await asyncio.sleep(0.01)  # 12+ items queued: ~0.3 s of work
        with pytest.raises(ResourceExhausted) as caught:
            await batcher.submit(model, "p", items(9), time.monotonic() + 0.05)
        assert not backlog.done()  # refused while the backlog was still there, not after waiting
        assert caught.value.reason == "QUEUE_TOO_LONG"
        assert 0.05 <= caught.value.retry_after_s <= 10
        assert len((await batcher.submit(model, "p", items(9), later())).values) == 1
        assert len((await backlog).values) == 16
        await batcher.stop()

    run(main())


class LocalBackend(FakeBackend):
    """A backend whose model runs in this process: ``embed_alone`` prepares and embeds one item
    (held at ``gate`` like a batch); ``alone`` counts those calls."""

    runs_locally = True

    def __init__(self, model: EmbeddingModel) -> None:
        super().__init__(model)
        self.alone, self.stopping = 0, False

    async def embed_alone(self, model_name, prepare, projection) -> ProjectionOutput:
        item = prepare()  # the InputError of a bad item comes out of here, as in a thread
        await self.gate.wait()
        if self.stopping:  # a pool shut down with cancel_futures cancels the waiting work
            raise asyncio.CancelledError
        self.alone += 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("backend crashed")
        return self.model.embed_batch(self.model.collate([item]))


def make_local(**overrides) -> tuple[Batcher, LocalBackend, FakeModel]:
    model = FakeModel()
    backend = LocalBackend(model)
    return Batcher(backend, Settings(**{"max_batch_delay_ms": 20.0, **overrides})), backend, model


def test_a_lone_item_of_an_idle_model_runs_at_once_and_calls_meanwhile_batch_after_it():
    async def main():
        batcher, backend, model = make_local()
        assert batcher.idle(model)
        alone = await batcher.run_alone(model, "p", lambda: items(5)[0], later())
        assert alone is not None and alone.batch_size == 1 and alone.queue_seconds == 0
        np.testing.assert_array_equal(alone.values, expected([5]))
        np.testing.assert_array_equal(alone.poses, [5])
        assert backend.alone == 1 and backend.batches == []  # not through the queue

        backend.gate.clear()  # a lone item in flight: the model is busy for everyone else
        first = asyncio.create_task(batcher.run_alone(model, "p", lambda: items(1)[0], later()))
        await asyncio.sleep(0.02)
        assert not batcher.idle(model)
        assert await batcher.run_alone(model, "p", lambda: items(9)[0], later()) is None
        queued = []
        for v in (2, 3, 4):  # one after another, while the lone item runs
            queued.append(asyncio.create_task(batcher.submit(model, "p", items(v), later())))
            await asyncio.sleep(0.02)
        assert backend.batches == []  # the worker waits for the lone item, as for a batch
        backend.gate.set()
        np.testing.assert_array_equal((await first).values, expected([1]))
        results = await asyncio.gather(*queued)
        assert backend.batches == [3]  # what queued meanwhile ran as one batch
        for v, r in zip((2, 3, 4), results, strict=True):
            np.testing.assert_array_equal(r.values, expected([v]))
        await asyncio.sleep(0.01)
        assert batcher.idle(model)
        await batcher.stop()

    run(main())


def test_a_lone_item_that_fails_fails_alone_and_the_model_stays_usable():
    from quotient_models.errors import InputError

    async def main():
        batcher, backend, model = make_local()

        def bad() -> np.ndarray:
            raise InputError("not a decodable image")

        with pytest.raises(InputError, match="not a decodable image"):
            await batcher.run_alone(model, "p", bad, later())
        backend.fail_next = True
        with pytest.raises(Unavailable, match="failed a batch of model 'fake'"):
            await batcher.run_alone(model, "p", lambda: items(1)[0], later())
        backend.gate.clear()
        with pytest.raises(DeadlineExceeded):
            await batcher.run_alone(model, "p", lambda: items(1)[0], later(0.05))
        backend.gate.set()
        await asyncio.sleep(0.01)
        assert batcher.idle(model) and batcher.queued == 0
        ok = await batcher.run_alone(model, "p", lambda: items(7)[0], later())
        assert ok is not None
        np.testing.assert_array_equal(ok.values, expected([7]))
        backend.stopping = True  # the backend stops under it: UNAVAILABLE, not a cancelled call
        with pytest.raises(Unavailable, match="shutting down"):
            await batcher.run_alone(model, "p", lambda: items(1)[0], later())
        backend.stopping = False
        backend.gate.clear()  # the caller gives up: its cancellation goes through as such
        call = asyncio.create_task(batcher.run_alone(model, "p", lambda: items(1)[0], later()))
        await asyncio.sleep(0.02)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert batcher.idle(model)
        await batcher.stop()

    run(main())


def test_a_backend_that_runs_models_elsewhere_never_runs_an_item_alone():
    async def main():
        batcher, _, model = make()
        assert not batcher.idle(model)
        assert await batcher.run_alone(model, "p", lambda: items(1)[0], later()) is None
        await batcher.stop()

    run(main())
