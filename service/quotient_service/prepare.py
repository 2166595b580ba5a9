"""The threads that decode and featurise inputs, shared fairly between requests.

A plain thread pool runs its work in arrival order: one request of 256 large images (16 KB of PNG
each, 4096x4096 pixels decoded) kept both threads busy for 55 s while every other client waited.
Here each request is a *job* with its own list of items, and a free thread takes the next item of
the job at the head of a ring, then puts that job at the back: requests advance in turn, one item
each, so a small request waits for at most one item of each other request, never for all of them.

A job stops early, and its remaining items are never started, when its call is cancelled, its
deadline passes, or one of its items is refused (``InputError``): items start in index order, so
every item before the refused one has started and the first bad item by index is still the one
reported. An item that has started runs to its end (a Python thread cannot be interrupted); its
cost is bounded by the per-item limits (``--max-pixels``, ``--max-input-bytes``) instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["NOT_STARTED", "PreparePool"]

NOT_STARTED: Any = object()  # the result of an item that was never started (its job stopped)


class _Job:
    def __init__(
        self,
        fn: Callable[[Any], Any],
        items: Sequence[Any],
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.fn, self.items, self.deadline, self.loop = fn, items, deadline, loop
        self.results: list[Any] = [NOT_STARTED] * len(items)
        self.next = 0  # index of the next item to start
        self.running = 0
        self.stop_after = len(items)  # items after this index are not started
        self.cancelled = False
        self.done: asyncio.Future[None] = loop.create_future()

    def startable(self) -> bool:
        return (
            not self.cancelled and self.next < self.stop_after and time.monotonic() < self.deadline
        )

    def finish_if_idle(self) -> None:
        if self.running == 0 and not self.startable():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
                self.loop.call_soon_threadsafe(_resolve, self.done)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class PreparePool:
    """``threads`` daemon threads that run ``fn(item)`` for the items of all requests in turn."""

    def __init__(self, threads: int, name: str = "prepare") -> None:
        self._ring: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def waiting(self) -> int:
        """Requests with items not yet started."""
        with self._lock:
            return len(self._ring)

    async def map(
        self, fn: Callable[[Any], Any], items: Sequence[Any], deadline: float
    ) -> list[Any]:
        """``fn`` over ``items`` by index: each result, the ``InputError`` it raised, or
        ``NOT_STARTED``. Raises ``TimeoutError`` at ``deadline`` (a ``time.monotonic()``
        instant) and stops the job when cancelled; other exceptions are returned as results."""
        job = _Job(fn, items, deadline, asyncio.get_running_loop())
        with self._lock:
            if self._closed:
                raise RuntimeError("the prepare pool is closed")
            if not items:
                return []
            self._ring.append(job)
            self._lock.notify()
        try:
            await asyncio.wait_for(asyncio.shield(job.done), deadline - time.monotonic())
        except BaseException:  # deadline, or the call was cancelled: start nothing more
            with self._lock:
                job.cancelled = True
                with contextlib.suppress(ValueError):
                    self._ring.remove(job)
            raise
        stopped = not any(isinstance(r, Exception) for r in job.results)
        if stopped and any(r is NOT_STARTED for r in job.results):  # deadline passed waiting
            raise TimeoutError
        return job.results

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for job in self._ring:
                job.cancelled = True
                job.finish_if_idle()
            self._ring.clear()
            self._lock.notify_all()

    def _next(self) -> tuple[_Job, int] | None:
        """The next (job, index) to run, round-robin; None when the pool closes."""
        with self._lock:
            while True:
                while self._ring:
                    job = self._ring.popleft()
                    if not job.startable():  # cancelled, past its deadline or stopped
                        job.finish_if_idle()
                        continue
                    index = job.next
                    job.next += 1
                    job.running += 1
                    if job.startable():
                        self._ring.append(job)  # its turn again after every other request
                    return job, index
                if self._closed:
                    return None
                self._lock.wait()

    def _work(self) -> None:
        while (task := self._next()) is not None:
            job, index = task
            try:
                result: Any = job.fn(job.items[index])
            except Exception as exc:  # InputError, or a fault the engine re-raises
                result = exc
            with self._lock:
                job.results[index] = result
                job.running -= 1
                if isinstance(result, Exception):
                    job.stop_after = min(job.stop_after, index + 1)
                    with contextlib.suppress(ValueError):
                        self._ring.remove(job)
                job.finish_if_idle()
