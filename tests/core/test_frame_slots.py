"""Latest-wins slots between frame callbacks and the scoring worker."""

import threading

from lrm_reward.core.frame_slots import LatestFrameSlots


def test_put_returns_the_replaced_frame():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    assert slots.put("cam0", 1) is None
    assert slots.put("cam1", 10) is None
    assert slots.put("cam0", 2) == 1
    assert slots.take_all(timeout_s=0) == {"cam0": 2, "cam1": 10}
    assert len(slots) == 0


def test_take_all_waits_for_a_frame_from_another_thread():
    slots: LatestFrameSlots[str] = LatestFrameSlots()
    got: list[dict[str, str]] = []
    worker = threading.Thread(target=lambda: got.append(slots.take_all(timeout_s=30)))
    worker.start()
    slots.put("cam", "frame")
    worker.join(timeout=30)
    assert got == [{"cam": "frame"}]


def test_close_wakes_a_waiting_worker_and_drain_empties():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    got: list[dict[str, int]] = []
    worker = threading.Thread(target=lambda: got.append(slots.take_all(timeout_s=30)))
    worker.start()
    slots.close()
    worker.join(timeout=30)
    assert got == [{}]
    assert slots.closed
    slots.put("cam", 3)
    assert slots.drain() == {"cam": 3}
    slots.reopen()
    assert not slots.closed
