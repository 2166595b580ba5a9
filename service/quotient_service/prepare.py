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

With ``processes`` (``--decode-in processes``) each thread hands its items to a worker process of
its own and waits for the answer with the GIL released: decoding and featurising (Python and
RDKit code that holds the GIL) then run beside the server's event loop and the model's Python
code instead of taking turns with them. A task runs in the worker when it says how
(``RemoteTask``: a function such as ``prepare_remote`` and picklable arguments), else in the
thread. A worker found dead is replaced; one that dies on an item (a crash in a decoder, the
kernel's OOM killer) is replaced and the item tried once more, and an item that ends the new
worker too is refused with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

__all__ = ["NOT_STARTED", "PreparePool", "RemoteTask", "WorkerProcess", "prepare_remote"]

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


class RemoteTask(Protocol):
    """A task that can run in a worker process: called in this process as ``task(item)``, or
    there as ``fn(*args, item)`` with ``(fn, args) = task.remote`` (a module-level function and
    picklable arguments, such as ``prepare_remote`` and a model's directory)."""

    remote: tuple[Callable[..., Any], tuple[Any, ...]]

    def __call__(self, item: Any) -> Any: ...


_WORKER_MODELS: dict[str, Any] = {}  # in a worker process: model directory → loaded input side


def prepare_remote(directory: str, limits: Any, options: Any, data: bytes) -> Any:
    """In a worker process: ``prepare_noted`` of the model at ``directory`` (loaded once,
    input side only, as the TorchServe backend loads it)."""
    model = _WORKER_MODELS.get(directory)
    if model is None:
        from quotient_models.runtime import load_model

        model = _WORKER_MODELS[directory] = load_model(directory, engine=None)
    return model.prepare_noted(data, limits, options)


def _worker_main(conn: Any) -> None:
    """A worker process: answers each ``(fn, args)`` with ``(True, fn(*args))`` or ``(False,
    exception)`` until its pipe closes."""
    from quotient_models.errors import InputError

    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer: tuple[bool, Any] = (True, fn(*args))
        except InputError as exc:
            answer = (False, InputError(exc.reason))
        except Exception as exc:  # a fault: sent as words (its class may not unpickle)
            answer = (False, RuntimeError(f"{type(exc).__name__}: {exc}"))
        conn.send(answer)


class WorkerProcess:
    """One worker process (spawned: no state inherited from the server) and its pipe; ``call``
    runs one item there, replacing the process when it has died."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(theirs,), name=self.name, daemon=True)
        self.process.start()
        theirs.close()

    def call(self, task: RemoteTask, item: Any) -> Any:
        """``task``'s function on ``item`` in the worker. A worker found dead is replaced first;
        one that dies on the item is replaced and the item tried once more on the new one, so
        only an item that ends a worker twice is refused for it (``InputError``)."""
        from quotient_models.errors import InputError

        fn, args = task.remote
        for attempt in (1, 2):
            if not self.process.is_alive() and not self.closed:
                self._restart()
            try:
                self._conn.send((fn, (*args, item)))
                ok, out = self._conn.recv()
                break
            except (EOFError, OSError):
                self.process.join(5)
                code = self.process.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                if self.closed or attempt == 2:
                    raise InputError(
                        f"decoding this input ended the worker process ({how}), twice"
                    ) from None
                self._restart()
        if ok:
            return out
        raise out

    def _restart(self) -> None:
        self._conn.close()
        with contextlib.suppress(Exception):
            self.process.kill()
            self.process.join(5)
        self._start()

    def close(self) -> None:
        self.closed = True
        self._conn.close()  # the worker sees the pipe close and returns
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


class PreparePool:
    """``threads`` daemon threads that run ``fn(item)`` for the items of all requests in turn;
    with ``processes``, each thread runs a ``RemoteTask``'s items in a worker process of its
    own."""

    def __init__(self, threads: int, name: str = "prepare", processes: bool = False) -> None:
        self._ring: deque[_Job] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._workers = [
            WorkerProcess(f"{name}-worker-{i}") for i in range(threads if processes else 0)
        ]
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(self._workers[i] if self._workers else None,),
                name=f"{name}-{i}",
                daemon=True,
            )
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' ids (none without ``processes``)."""
        return [w.process.pid for w in self._workers if w.process.pid is not None]

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
        if self._workers:  # a thread waiting on its worker finishes that item first
            for thread in self._threads:
                thread.join(5)
            for worker in self._workers:
                worker.close()

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

    def _work(self, worker: WorkerProcess | None) -> None:
        while (task := self._next()) is not None:
            job, index = task
            try:
                if worker is not None and hasattr(job.fn, "remote"):
                    result: Any = worker.call(cast(RemoteTask, job.fn), job.items[index])
                else:
                    result = job.fn(job.items[index])
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
