"""SharedEngine: one model call at a time, live calls before background ones, background not starved."""

from __future__ import annotations

import threading
import time

import pytest

from lrm_reward.core.engine_sharing import SharedEngine
from lrm_reward.core.types import Answer, Modality, Query


class GatedEngine:
    """Records the order of calls; a call named in `gates` blocks until its event is set."""

    model_id = "gated-test-engine"

    def __init__(self, seconds: float = 0.0) -> None:
        self.order: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.inside = 0
        self.max_inside = 0
        self.seconds = seconds
        self._lock = threading.Lock()

    def score(self, queries):
        name = queries[0].task
        with self._lock:
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            self.order.append(name)
        if name in self.gates:
            assert self.gates[name].wait(10.0)
        time.sleep(self.seconds)
        with self._lock:
            self.inside -= 1
        return [Answer(q.modality, 0.5, parsed=True) for q in queries]


def query(name: str) -> list[Query]:
    return [Query(Modality.COMPLETION, name, [])]


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_a_waiting_live_call_goes_before_the_next_background_call():
    engine = GatedEngine()
    engine.gates["bg1"] = threading.Event()
    shared = SharedEngine(engine, max_yield_s=30.0)
    background = shared.background()
    assert background.model_id == "gated-test-engine"
    threads = [threading.Thread(target=background.score, args=(query("bg1"),))]
    threads[0].start()
    wait_until(lambda: engine.order == ["bg1"])  # bg1 holds the model
    threads.append(threading.Thread(target=background.score, args=(query("bg2"),)))
    threads[-1].start()
    time.sleep(0.05)  # bg2 is waiting for the model ...
    threads.append(threading.Thread(target=shared.score, args=(query("live"),)))
    threads[-1].start()
    wait_until(lambda: shared._live_waiting == 1)  # ... and so is the live call, which came later
    engine.gates["bg1"].set()
    for t in threads:
        t.join(10.0)
    assert engine.order == ["bg1", "live", "bg2"]
    assert engine.max_inside == 1
    assert (shared.live_calls, shared.background_calls) == (1, 2)


def test_background_calls_progress_while_live_calls_keep_the_model_busy():
    engine = GatedEngine(seconds=0.01)
    shared = SharedEngine(engine, max_yield_s=0.05)
    stop = threading.Event()

    def live_loop(name: str) -> None:  # two cameras back to back: a live call is always waiting
        while not stop.is_set():
            shared.score(query(name))

    cameras = [threading.Thread(target=live_loop, args=(f"live{i}",)) for i in range(2)]
    for t in cameras:
        t.start()
    try:
        wait_until(lambda: shared.live_calls > 5)
        finished = threading.Event()

        def judge() -> None:
            for _ in range(3):
                shared.background().score(query("bg"))
            finished.set()

        threading.Thread(target=judge).start()
        assert finished.wait(20.0), "background calls starved by live ones"
    finally:
        stop.set()
        for t in cameras:
            t.join(10.0)
    assert engine.order.count("bg") == 3 and engine.max_inside == 1
    assert shared.background_wait_s > 0


def test_rejects_a_negative_yield():
    with pytest.raises(ValueError, match="max_yield_s"):
        SharedEngine(GatedEngine(), max_yield_s=-1.0)
