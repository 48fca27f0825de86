"""One loaded reward engine, two kinds of callers: live scoring first, long background jobs in between.

What it is for: reward_node holds the only copy of the reward model on its GPU (an 8B model fills most of a
24 GB card) and serves both the camera streams (live, latency matters) and judging of recorded episodes
(the ``~/judge_episodes`` action: minutes of queries, throughput matters). ``SharedEngine.score`` is the
live path; ``SharedEngine.background()`` gives the judge an engine-like view whose every ``score`` call
first lets waiting live calls go.

The rule, enforced with one condition variable:
- one call runs on the model at a time (the engine itself is not reentrant: one adapter active at a time);
- a live call waits only for the call that is running now: at most one background call, whose size the
  caller keeps small (the judge's ``max_queries_per_call``), so the live worst case is one judge chunk;
- a background call waits while a live call is waiting, but never longer than ``max_yield_s`` in a row, so a
  camera stream that keeps the model busy slows judging down without stopping it.

Side effect worth knowing: judging fills the engine's prefix cache (bounded LRU) with the recorded
episodes' prefixes, which can evict a live episode's prefix; the next live query then prefills it again
(one slower query, same answers).

What it is not: a scheduler across processes or GPUs, or a queue: callers block in their own threads.
No ROS, no model code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from lrm_reward.core.types import Answer, Query


class SharedEngine:
    """Wraps a loaded engine (anything with ``score(queries)`` and ``model_id``) for live + background use."""

    def __init__(self, engine, max_yield_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if max_yield_s < 0:
            raise ValueError(f"max_yield_s must be >= 0, got {max_yield_s}")
        self.engine = engine
        self.max_yield_s = max_yield_s
        self._clock = clock
        self._cond = threading.Condition()
        self._running = False  # a call is on the model
        self._live_waiting = 0
        self._background_due = False  # a background call has yielded max_yield_s: it goes next
        self.live_calls = 0
        self.background_calls = 0
        self.background_wait_s = 0.0  # total time background calls waited for the model (yielding)

    @property
    def model_id(self) -> str:
        return str(getattr(self.engine, "model_id", "unknown"))

    def score(self, queries: list[Query]) -> list[Answer]:
        """Live scoring: runs as soon as the call on the model now (if any) is done."""
        with self._cond:
            self._live_waiting += 1
            try:
                while self._running or self._background_due:
                    self._cond.wait()
            finally:
                self._live_waiting -= 1
            self._running = True
            self.live_calls += 1
        try:
            return self.engine.score(queries)
        finally:
            self._release()

    def score_background(self, queries: list[Query]) -> list[Answer]:
        """A background call: lets waiting live calls go first for up to max_yield_s, then runs."""
        started = self._clock()
        deadline = started + self.max_yield_s
        with self._cond:
            while self._running or self._live_waiting:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    # yielded long enough: live calls wait for this one call (after the one running now)
                    self._background_due = True
                    try:
                        while self._running:
                            self._cond.wait()
                    finally:
                        self._background_due = False
                    break
                self._cond.wait(timeout=remaining)
            self._running = True
            self.background_calls += 1
            self.background_wait_s += self._clock() - started
        try:
            return self.engine.score(queries)
        finally:
            self._release()

    def background(self) -> BackgroundEngine:
        """An engine-like view for a background job (``score`` and ``model_id``), e.g. the judge."""
        return BackgroundEngine(self)

    def _release(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()


class BackgroundEngine:
    """What a background job sees: ``score(queries)`` that yields to live calls, and the model's id."""

    def __init__(self, shared: SharedEngine) -> None:
        self._shared = shared
        self.model_id = shared.model_id

    def score(self, queries: list[Query]) -> list[Answer]:
        return self._shared.score_background(queries)
