"""Admission control: the bytes and items a server works on at once, bounded before any decoding.

Every Embed (each message of an EmbedStream included) and every Decode asks ``Admission.admit``
for its request's bytes (the protobuf size) and its items (inputs, or embeddings to decode) before
anything is decoded, and gives them back when it has answered. A call that would pass
``max_inflight_bytes`` or ``max_inflight_items`` is refused at once with RESOURCE_EXHAUSTED and a
retry hint (``google.rpc.RetryInfo``): the time the server needs, at its recent throughput, to
finish the work that is over the limit. One call larger than a limit on its own is admitted when
nothing else is in flight, so that every request the other limits allow can be served.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Iterator

from quotient_service.errors import ResourceExhausted
from quotient_service.metrics import Metrics

__all__ = ["Admission", "Throughput"]

_WINDOW_S = 10.0  # throughput of the last seconds, for the retry hint
_HINT_MIN_S, _HINT_MAX_S = 0.05, 10.0


class Throughput:
    """Items answered over the last seconds, and the retry hint it implies."""

    def __init__(self, window_s: float = _WINDOW_S) -> None:
        self.window_s = window_s
        self._done: deque[tuple[float, int]] = deque()  # (time, items) answered

    def record(self, items: int) -> None:
        now = time.monotonic()
        self._done.append((now, items))
        self._trim(now)

    def retry_hint(self, excess_items: int) -> float:
        """Seconds until ``excess_items`` more could be taken at the recent throughput (1 s
        when nothing was answered lately), within [0.05, 10]."""
        self._trim(time.monotonic())
        rate = sum(n for _, n in self._done) / self.window_s
        if rate <= 0:
            return 1.0
        return min(_HINT_MAX_S, max(_HINT_MIN_S, max(excess_items, 1) / rate))

    def _trim(self, now: float) -> None:
        while self._done and self._done[0][0] < now - self.window_s:
            self._done.popleft()


class Admission:
    def __init__(self, max_bytes: int, max_items: int, metrics: Metrics | None = None) -> None:
        self.max_bytes, self.max_items = max_bytes, max_items
        self.metrics = metrics
        self.bytes = self.items = 0
        self.throughput = Throughput()

    @contextlib.contextmanager
    def admit(self, method: str, nbytes: int, items: int) -> Iterator[None]:
        """Hold ``nbytes`` and ``items`` for the duration of the block, or raise
        ``ResourceExhausted`` with a retry hint without holding anything."""
        busy = self.bytes or self.items
        over_bytes = busy and self.bytes + nbytes > self.max_bytes
        over_items = busy and self.items + items > self.max_items
        if over_bytes or over_items:
            if self.metrics is not None:
                self.metrics.shed.labels(method, "bytes" if over_bytes else "items").inc()
            what = (
                f"{self.bytes} request bytes in flight, limit {self.max_bytes} "
                "(--max-inflight-bytes)"
                if over_bytes
                else f"{self.items} items in flight, limit {self.max_items} (--max-inflight-items)"
            )
            hint = self.throughput.retry_hint(self.items + items - self.max_items)
            raise ResourceExhausted(
                f"server overloaded: {what}; retry in {hint:.2f} s",
                reason="INFLIGHT_LIMIT",
                metadata={"inflight_bytes": self.bytes, "inflight_items": self.items},
                retry_after_s=hint,
            )
        self._add(nbytes, items)
        try:
            yield
        finally:
            self._add(-nbytes, -items)
            self.throughput.record(items)

    def _add(self, nbytes: int, items: int) -> None:
        self.bytes += nbytes
        self.items += items
        if self.metrics is not None:
            self.metrics.inflight_bytes.set(self.bytes)
            self.metrics.inflight_items.set(self.items)
