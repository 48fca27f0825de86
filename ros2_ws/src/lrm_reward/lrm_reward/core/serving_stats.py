"""Running statistics a serving process reports about itself: latency percentiles, event rates, and
faults counted per kind (each kind logged once, not once per frame).

For the reward node's /diagnostics and for benchmarks. Plain Python with an injectable clock, so it is
tested without ROS; it is not a metrics system (no export, no persistence).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


class LatencyWindow:
    """The last `size` latencies (seconds) and their percentiles. Thread-safe."""

    def __init__(self, size: int = 500) -> None:
        if size < 1:
            raise ValueError(f"LatencyWindow size must be >= 1, got {size}")
        self._values: deque[float] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0  # latencies ever added, not only those still in the window

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(float(seconds))
            self.total += 1

    def percentile(self, q: float) -> float | None:
        """Nearest-rank percentile, q in [0, 100]; None while empty."""
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile q must be in [0, 100], got {q}")
        with self._lock:
            ordered = sorted(self._values)
        if not ordered:
            return None
        rank = max(1, -(-len(ordered) * q // 100))  # ceil(n*q/100), at least the first value
        return ordered[int(rank) - 1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)


class RateWindow:
    """Events per second over the last `window_s` seconds of the clock. Thread-safe."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError(f"RateWindow window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()
        self._started = clock()

    def add(self, count: int = 1) -> None:
        now = self._clock()
        with self._lock:
            self._events.append((now, count))
            self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            total = sum(count for _, count in self._events)
        # Right after start the window is not full yet: divide by the time really covered.
        span = min(self.window_s, max(now - self._started, 1e-9))
        return total / span

    def _trim(self, now: float) -> None:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()


@dataclass(frozen=True)
class FaultSnapshot:
    counts: dict[str, int]
    last_kind: str
    last_message: str


class FaultCounter:
    """Counts faults per kind and keeps the last message.

    `report` returns True only the first time a kind is seen, so callers log once per kind and still
    count every occurrence (a bad camera at 30 Hz must not flood the log). Thread-safe.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._last_kind = ""
        self._last_message = ""
        self._lock = threading.Lock()

    def report(self, kind: str, message: str) -> bool:
        with self._lock:
            first = kind not in self._counts
            self._counts[kind] = self._counts.get(kind, 0) + 1
            self._last_kind = kind
            self._last_message = message
            return first

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return sum(self._counts.values())
            return self._counts.get(kind, 0)

    def snapshot(self) -> FaultSnapshot:
        with self._lock:
            return FaultSnapshot(dict(self._counts), self._last_kind, self._last_message)
