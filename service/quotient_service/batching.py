"""Dynamic batching: one bounded queue and one worker per (model, projection).

A request's prepared items enter the queue of its (model, projection) as separate entries, so a
large request may span several batches; each entry remembers its request and its index in it, and
the request's future resolves once every row is back, in request order. A worker waits until it
has a free slot (``model_workers`` batches in flight per queue). When no batch of the queue is
running it takes what is queued at once (up to ``max_batch_items`` or the ``max_batch_cost``
budget, cost from ``model.item_cost``): an idle model does not wait for company, and under load
the next batch fills while the current one runs, as continuous batchers do. A further batch while
others run (``model_workers`` > 1) waits for a full batch or until the oldest entry has waited
``max_batch_delay_ms``. Overload is refused at the door
(``ResourceExhausted``); stale and cancelled requests leave the queue before they cost a batch; a
failed batch fails only its own requests and never the worker. ``run_alone`` runs one item of a
model that is ``idle`` as a batch at once, prepared in the model's thread in the same hand-off
(the engine's path for a lone small item: at idle, the hand-offs to the decode thread and then
through the queue to the model's thread cost more than the item).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from quotient_models.errors import InputError
from quotient_models.runtime import EmbeddingModel
from quotient_service.admission import Throughput
from quotient_service.backends.base import Backend
from quotient_service.config import Settings
from quotient_service.errors import DeadlineExceeded, QuotientError, ResourceExhausted, Unavailable
from quotient_service.metrics import Metrics

__all__ = ["BatchResult", "Batcher", "loop_time"]

log = logging.getLogger(__name__)
_batch_ids = itertools.count()


@dataclass
class BatchResult:
    """One request's rows, in its order, and how they were computed."""

    values: np.ndarray  # [n, D] float32
    poses: np.ndarray | None  # [n] degrees, or None
    queue_seconds: float  # longest wait of one of its items
    inference_seconds: float  # backend time of the batches that computed it
    batch_size: int  # items in those batches, together


class _Request:
    def __init__(self, n: int, deadline: float) -> None:
        self.future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self.rows: list[np.ndarray | None] = [None] * n
        self.poses: list[float] = [0.0] * n
        self.has_poses = False
        self.remaining, self.deadline, self.enqueued = n, deadline, time.monotonic()
        self.queue_seconds = 0.0
        self.batches: dict[int, tuple[int, float]] = {}  # batch id → (size, seconds)

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def deliver(
        self, index: int, row: np.ndarray, pose: float | None, batch: tuple[int, int, float]
    ) -> None:
        if self.future.done():
            return
        batch_id, size, seconds = batch
        self.rows[index], self.batches[batch_id] = row, (size, seconds)
        if pose is not None:
            self.poses[index], self.has_poses = pose, True
        self.remaining -= 1
        if self.remaining == 0:
            self.future.set_result(
                BatchResult(
                    np.stack(self.rows).astype(np.float32),  # type: ignore[arg-type]
                    np.asarray(self.poses, dtype=np.float64) if self.has_poses else None,
                    self.queue_seconds,
                    sum(s for _, s in self.batches.values()),
                    sum(n for n, _ in self.batches.values()),
                )
            )


@dataclass
class _Entry:
    request: _Request
    index: int
    item: np.ndarray
    cost: int


@dataclass
class _Queue:
    model: EmbeddingModel
    projection: str
    slots: asyncio.Semaphore
    entries: deque[_Entry] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    worker: asyncio.Task[None] | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)
    full_rate: float = 0.0  # items/s of full batches (moving average); 0 until one ran
    alone: int = 0  # run_alone batches running


class Batcher:
    """Merges concurrent requests into model batches for one backend."""

    def __init__(
        self, backend: Backend, settings: Settings, metrics: Metrics | None = None
    ) -> None:
        self.backend, self.settings = backend, settings
        self.metrics = metrics or Metrics()
        self._queues: dict[tuple[str, str], _Queue] = {}
        self._queued = 0
        self.throughput = Throughput()  # for the retry hint of a full queue

    @property
    def queued(self) -> int:
        """Items waiting in all queues (not those in running batches)."""
        return self._queued

    async def submit(
        self, model: EmbeddingModel, projection: str, items: list[np.ndarray], deadline: float
    ) -> BatchResult:
        """Queue one request's prepared items; their rows come back in order.
        ``deadline`` is a ``time.monotonic()`` instant."""
        if self._queued + len(items) > self.settings.max_queue_items:
            hint = self.throughput.retry_hint(
                self._queued + len(items) - self.settings.max_queue_items
            )
            raise ResourceExhausted(
                f"server overloaded: {self._queued} items queued, limit "
                f"{self.settings.max_queue_items}; retry in {hint:.2f} s",
                metadata={"queued": self._queued, "limit": self.settings.max_queue_items},
                retry_after_s=hint,
            )
        queue = self._queue(model, projection)
        self._check_wait(queue, deadline)
        request = _Request(len(items), deadline)
        queue.entries.extend(
            _Entry(request, i, item, model.item_cost(item)) for i, item in enumerate(items)
        )
        self._count(len(items))
        queue.wake.set()
        try:
            return await asyncio.wait_for(request.future, deadline - time.monotonic())
        except TimeoutError:
            raise DeadlineExceeded(
                f"the request did not finish within its deadline ({len(items)} items)"
            ) from None
        finally:  # finished, failed, timed out or cancelled by the client: leave the queue
            self._discard(queue, request)

    def idle(self, model: EmbeddingModel) -> bool:
        """Whether ``model`` has no item queued and no batch running (any projection), and the
        backend can prepare and embed one item in one hand-off (``run_alone``)."""
        if not self.backend.runs_locally:
            return False
        name = model.spec.name
        return not any(
            q.entries or q.running or q.alone for (n, _), q in self._queues.items() if n == name
        )

    async def run_alone(
        self,
        model: EmbeddingModel,
        projection: str,
        prepare: Callable[[], np.ndarray],
        deadline: float,
    ) -> BatchResult | None:
        """A batch of one item that ``prepare()`` makes in the model's thread, run at once if
        ``model`` is ``idle`` (else None: the caller queues it as usual). While it runs the
        model is not idle, and the queue's worker starts no batch: calls that arrive meanwhile
        queue and batch together after it. ``prepare``'s ``InputError`` is raised as it is."""
        if not self.idle(model):
            return None
        queue = self._queue(model, projection)
        name, start = model.spec.name, time.monotonic()
        self.metrics.queue_wait.labels(name).observe(0.0)
        queue.alone += 1
        try:
            async with asyncio.timeout_at(loop_time(deadline)):
                out = await self.backend.embed_alone(name, prepare, projection)
            if len(out.values) != 1:
                raise Unavailable(f"backend returned {len(out.values)} rows for 1 item")
        except TimeoutError:
            raise DeadlineExceeded(
                "the request did not finish within its deadline (1 item)"
            ) from None
        except InputError:
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the caller was cancelled
                raise
            # the model's pool cancelled the work: the backend is stopping
            raise Unavailable("the server is shutting down") from None
        except Exception as exc:
            raise self._error(name, 1, exc) from None
        finally:
            queue.alone -= 1
            queue.wake.set()  # the worker may take what queued meanwhile
        seconds = time.monotonic() - start
        self._record(name, 1, seconds)
        return BatchResult(
            np.asarray(out.values[:1], dtype=np.float32),
            None if out.poses is None else np.asarray(out.poses[:1], dtype=np.float64),
            0.0,
            seconds,
            1,
        )

    def _check_wait(self, queue: _Queue, deadline: float) -> None:
        """Refuse at once a call that would wait in a backlog longer than its deadline allows,
        instead of letting it wait and expire: under overload the server then spends its time
        on calls that can still be answered. The wait is estimated from the backlog and the
        measured speed of full batches (there is no estimate before a full batch has run)."""
        backlog, rate = len(queue.entries), queue.full_rate * self.settings.model_workers
        if rate <= 0 or backlog < self.settings.max_batch_items:
            return
        wait, remaining = backlog / rate, deadline - time.monotonic()
        if wait > remaining:
            name = queue.model.spec.name
            raise ResourceExhausted(
                f"server overloaded: about {wait:.2f} s of queued work for {name!r}, more than "
                f"the {max(remaining, 0):.2f} s left to the call; retry with backoff",
                reason="QUEUE_TOO_LONG",
                metadata={"queued": backlog, "model": name},
                retry_after_s=min(10.0, max(0.05, wait - max(remaining, 0))),
            )

    async def stop(self) -> None:
        """Cancel the workers and fail every request still waiting (Unavailable)."""
        for queue in self._queues.values():
            tasks = [t for t in (queue.worker, *queue.running) if t is not None]
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            for entry in queue.entries:
                entry.request.fail(Unavailable("the server is shutting down"))
            self._count(-len(queue.entries))
            queue.entries.clear()
        self._queues.clear()

    # --- queue bookkeeping

    def _queue(self, model: EmbeddingModel, projection: str) -> _Queue:
        key = (model.spec.name, projection)
        if key not in self._queues:
            queue = _Queue(model, projection, asyncio.Semaphore(self.settings.model_workers))
            queue.worker = asyncio.create_task(self._work(queue), name=f"batcher:{key}")
            self._queues[key] = queue
        return self._queues[key]

    def _count(self, delta: int) -> None:
        self._queued += delta
        self.metrics.queued.set(self._queued)

    def _discard(self, queue: _Queue, request: _Request) -> None:
        kept = deque(e for e in queue.entries if e.request is not request)
        self._count(len(kept) - len(queue.entries))
        queue.entries = kept

    def _full(self, queue: _Queue) -> bool:
        budget, cost = self.settings.max_batch_cost, 0
        for n, entry in enumerate(queue.entries, 1):
            cost += entry.cost
            if n >= self.settings.max_batch_items or (budget and cost >= budget):
                return True
        return False

    def _take(self, queue: _Queue) -> list[_Entry]:
        batch: list[_Entry] = []
        cost, budget, now = 0, self.settings.max_batch_cost, time.monotonic()
        while queue.entries and len(batch) < self.settings.max_batch_items:
            entry = queue.entries[0]
            if entry.request.future.done():  # failed or cancelled meanwhile
                queue.entries.popleft()
                self._count(-1)
            elif entry.request.deadline <= now:  # stale: drop before it costs a batch
                entry.request.fail(DeadlineExceeded("the request waited past its deadline"))
                self._discard(queue, entry.request)
            elif batch and budget and cost + entry.cost > budget:
                break
            else:
                batch.append(queue.entries.popleft())
                self._count(-1)
                cost += entry.cost
        return batch

    # --- the worker

    async def _work(self, queue: _Queue) -> None:
        delay = self.settings.max_batch_delay_ms / 1000.0
        while True:
            await queue.slots.acquire()
            while not queue.entries or queue.alone:  # after a run_alone, as after a batch
                queue.wake.clear()
                await queue.wake.wait()
            # an idle model runs what is queued at once: waiting for company only adds latency,
            # and under load the batch fills while the previous one runs (continuous batching);
            # the delay applies to a further batch while others of this queue are running
            close_at = queue.entries[0].request.enqueued + delay
            while queue.running and queue.entries and not self._full(queue):
                queue.wake.clear()
                try:
                    await asyncio.wait_for(queue.wake.wait(), close_at - time.monotonic())
                except TimeoutError:
                    break
            batch = self._take(queue)
            if not batch:
                queue.slots.release()
                continue
            task = asyncio.create_task(self._run(queue, batch))
            queue.running.add(task)
            task.add_done_callback(self._finished(queue))

    @staticmethod
    def _finished(queue: _Queue) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            queue.running.discard(task)
            queue.slots.release()

        return done

    async def _run(self, queue: _Queue, batch: list[_Entry]) -> None:
        name, start = queue.model.spec.name, time.monotonic()
        for entry in batch:
            wait = start - entry.request.enqueued
            entry.request.queue_seconds = max(entry.request.queue_seconds, wait)
            self.metrics.queue_wait.labels(name).observe(wait)
        try:
            arrays = queue.model.collate([e.item for e in batch])
            out = await self.backend.embed(name, arrays, queue.projection)
            if len(out.values) != len(batch):
                raise Unavailable(f"backend returned {len(out.values)} rows for {len(batch)} items")
        except asyncio.CancelledError:  # stop(): nobody will answer these requests now
            self._fail(queue, batch, Unavailable("the server is shutting down"))
            raise
        except Exception as exc:
            self._fail(queue, batch, exc)
            return
        seconds = time.monotonic() - start
        self._record(name, len(batch), seconds)
        if len(batch) >= self.settings.max_batch_items and seconds > 0:
            speed = len(batch) / seconds
            queue.full_rate = speed if not queue.full_rate else 0.8 * queue.full_rate + 0.2 * speed
        info = (next(_batch_ids), len(batch), seconds)
        for row, entry in enumerate(batch):
            pose = None if out.poses is None else float(out.poses[row])
            entry.request.deliver(entry.index, out.values[row], pose, info)

    def _record(self, name: str, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(name).observe(size)
        self.metrics.inference.labels(name).observe(seconds)
        self.metrics.items.labels(name).inc(size)
        self.throughput.record(size)

    def _error(self, name: str, size: int, exc: Exception) -> QuotientError:
        """What the requests of a failed batch are told (a fault is logged, not shown)."""
        self.metrics.batch_failures.labels(name).inc()
        if isinstance(exc, QuotientError):
            return exc
        log.error("batch of %d items for %s failed", size, name, exc_info=exc)
        return Unavailable(
            f"the backend failed a batch of model {name!r}", metadata={"model": name}
        )

    def _fail(self, queue: _Queue, batch: list[_Entry], exc: Exception) -> None:
        error = self._error(queue.model.spec.name, len(batch), exc)
        for request in {id(e.request): e.request for e in batch}.values():
            request.fail(error)
            self._discard(queue, request)  # its other items would be computed for nothing


def loop_time(deadline: float) -> float:
    """A ``time.monotonic()`` instant on the running loop's clock (``asyncio.timeout_at``)."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
