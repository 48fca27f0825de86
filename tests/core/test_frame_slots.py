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


def test_gather_waits_for_the_other_streams_up_to_the_window():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    got: list[dict[str, int]] = []
    slots.put("cam0", 0)
    worker = threading.Thread(
        target=lambda: got.append(slots.take_all(timeout_s=30, gather_s=30, expected=3))
    )
    worker.start()
    slots.put("cam1", 1)
    slots.put("cam2", 2)
    worker.join(timeout=30)
    assert got == [{"cam0": 0, "cam1": 1, "cam2": 2}]


def test_gather_gives_up_after_the_window_with_what_is_there():
    slots: LatestFrameSlots[int] = LatestFrameSlots()
    slots.put("cam0", 0)
    assert slots.take_all(timeout_s=1, gather_s=0.01, expected=3) == {"cam0": 0}
