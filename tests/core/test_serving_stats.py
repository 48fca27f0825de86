"""Latency percentiles, event rates and per-kind fault counting used by the reward node's diagnostics."""

import threading

import pytest

from lrm_reward.core.serving_stats import FaultCounter, LatencyWindow, RateWindow


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_latency_percentiles_nearest_rank():
    window = LatencyWindow(size=1000)
    assert window.percentile(50) is None
    for ms in range(1, 101):  # 1..100 ms, shuffled order must not matter
        window.add(((ms * 37) % 100 + 1) / 1000)
    assert window.percentile(50) == pytest.approx(0.050)
    assert window.percentile(95) == pytest.approx(0.095)
    assert window.percentile(100) == pytest.approx(0.100)
    assert window.percentile(0) == pytest.approx(0.001)


def test_latency_window_forgets_old_values_but_counts_them():
    window = LatencyWindow(size=3)
    for value in (10.0, 1.0, 2.0, 3.0):
        window.add(value)
    assert len(window) == 3
    assert window.total == 4
    assert window.percentile(100) == 3.0


@pytest.mark.parametrize("bad", [-1, 101])
def test_latency_percentile_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="percentile"):
        LatencyWindow().percentile(bad)


def test_rate_window_counts_only_recent_events():
    clock = FakeClock()
    rate = RateWindow(window_s=2.0, clock=clock)
    clock.now += 10.0  # a long-running process: the window is full
    for _ in range(10):
        rate.add()
        clock.now += 0.1
    assert rate.rate() == pytest.approx(10 / 2.0)
    clock.now += 5.0
    assert rate.rate() == 0.0


def test_rate_window_right_after_start_uses_elapsed_time():
    clock = FakeClock()
    rate = RateWindow(window_s=10.0, clock=clock)
    rate.add(4)
    clock.now += 1.0
    assert rate.rate() == pytest.approx(4.0)


def test_fault_counter_first_report_per_kind_only():
    faults = FaultCounter()
    assert faults.report("unknown_encoding", "yuv422 is not supported") is True
    assert faults.report("unknown_encoding", "yuv422 is not supported") is False
    assert faults.report("corrupt_jpeg", "cannot decode") is True
    snap = faults.snapshot()
    assert snap.counts == {"unknown_encoding": 2, "corrupt_jpeg": 1}
    assert snap.last_kind == "corrupt_jpeg"
    assert faults.count() == 3
    assert faults.count("missing") == 0


def test_fault_counter_is_thread_safe():
    faults = FaultCounter()
    firsts = []

    def hammer():
        for _ in range(2000):
            if faults.report("k", "m"):
                firsts.append(1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert faults.count("k") == 8000
    assert len(firsts) == 1
