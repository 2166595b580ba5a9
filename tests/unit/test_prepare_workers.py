"""PreparePool with worker processes (``--decode-in processes``): results and errors come back
per item as from threads, and an item that ends its worker is refused for it, alone."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from quotient_models.errors import InputError
from quotient_service.prepare import PreparePool


def twice_or_die(poison: str, item: str) -> str:
    """Runs in the worker: ``poison`` ends the process, ``bad`` is refused, others doubled."""
    if item == poison:
        os._exit(7)
    if item == "bad":
        raise InputError("bad item")
    return item * 2


class Task:
    remote = (twice_or_die, ("poison",))

    def __call__(self, item: str) -> str:
        return twice_or_die("poison", item)


@pytest.fixture
def pool():
    p = PreparePool(2, name="test-prepare", processes=True)
    yield p
    p.close()


def run(pool: PreparePool, items: list[str]) -> list:
    return asyncio.run(pool.map(Task(), items, time.monotonic() + 60))


def test_results_come_back_in_order_from_the_workers(pool) -> None:
    assert run(pool, ["a", "b", "c", "d"]) == ["aa", "bb", "cc", "dd"]
    assert len(pool.worker_pids) == 2 and os.getpid() not in pool.worker_pids


def test_a_refused_item_is_returned_as_its_error(pool) -> None:
    out = run(pool, ["a", "bad"])
    assert out[0] == "aa" and isinstance(out[1], InputError) and out[1].reason == "bad item"


def test_an_item_that_ends_the_worker_is_refused_and_the_next_call_works(pool) -> None:
    out = run(pool, ["poison"])
    assert isinstance(out[0], InputError)
    assert "ended the worker process (exit code 7), twice" in out[0].reason
    assert run(pool, ["a", "b", "c"]) == ["aa", "bb", "cc"]


def test_close_ends_the_workers() -> None:
    import psutil

    pool = PreparePool(1, processes=True)
    assert run(pool, ["a"]) == ["aa"]
    pids = pool.worker_pids
    pool.close()
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in pids)
