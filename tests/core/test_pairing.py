"""core.pairing: approximate-time pairing of several camera streams, newest set first, drops counted."""

from __future__ import annotations

import pytest

from lrm_reward.core.pairing import ApproximateTimePairer


def test_single_stream_pairs_every_frame():
    pairer = ApproximateTimePairer(["front"], slop_s=0.01)
    for i in range(3):
        pair = pairer.push("front", i * 0.1, f"f{i}")
        assert pair is not None and pair.items == {"front": f"f{i}"}
    assert pairer.paired == 3 and pairer.dropped == {"front": 0}


def test_two_streams_within_slop_pair_and_carry_items():
    pairer = ApproximateTimePairer(["front", "wrist"], slop_s=0.01)
    assert pairer.push("front", 1.000, "F") is None
    pair = pairer.push("wrist", 1.004, "W")
    assert pair is not None
    assert pair.items == {"front": "F", "wrist": "W"}
    assert pair.stamps == {"front": 1.000, "wrist": 1.004}
    assert pair.stamp_s == 1.004 and pair.spread_s == pytest.approx(0.004)
    assert pairer.pending() == {"front": 0, "wrist": 0}


def test_frames_outside_slop_do_not_pair():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.01)
    pairer.push("a", 1.00, "a0")
    assert pairer.push("b", 1.05, "b0") is None


def test_latest_set_wins_and_older_frames_are_dropped():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.005)
    # camera a runs ahead; b's frames arrive late (higher latency)
    for stamp in (0.000, 0.033, 0.066):
        assert pairer.push("a", stamp, f"a{stamp}") is None
    pair = pairer.push("b", 0.034, "b0.034")
    assert pair is not None and pair.stamps == {"a": 0.033, "b": 0.034}
    # a@0.000 is older than the emitted set: it can never pair any more
    assert pairer.dropped == {"a": 1, "b": 0}
    assert pairer.pending() == {"a": 1, "b": 0}  # a@0.066 waits for its partner
    pair = pairer.push("b", 0.067, "b0.067")
    assert pair is not None and pair.stamps == {"a": 0.066, "b": 0.067}


def test_newest_complete_set_is_chosen_when_several_exist():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.01)
    pairer.push("a", 1.0, "a1")
    pairer.push("a", 2.0, "a2")
    pair = pairer.push("b", 2.001, "b2")
    assert pair is not None and pair.items == {"a": "a2", "b": "b2"}
    assert pairer.dropped["a"] == 1


def test_three_streams_out_of_order_arrival():
    pairer = ApproximateTimePairer(["a", "b", "c"], slop_s=0.01)
    assert pairer.push("c", 5.002, "c") is None
    assert pairer.push("a", 5.000, "a") is None
    pair = pairer.push("b", 5.009, "b")
    assert pair is not None and set(pair.items) == {"a", "b", "c"}
    assert pair.spread_s <= 0.01


def test_stopped_camera_overflows_queue_and_counts_drops():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.01, queue_size=3)
    for i in range(10):
        assert pairer.push("a", i * 0.033, i) is None
    assert pairer.pending()["a"] == 3
    assert pairer.dropped == {"a": 7, "b": 0}


def test_frame_arriving_late_within_its_stream_is_sorted_in():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.002, queue_size=4)
    pairer.push("a", 2.0, "a2")
    pairer.push("a", 1.0, "a1")  # delivered out of order
    pair = pairer.push("b", 1.001, "b1")
    assert pair is not None and pair.items == {"a": "a1", "b": "b1"}
    assert pairer.pending()["a"] == 1  # a2 is still waiting


def test_reset_drops_everything_buffered():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.01)
    pairer.push("a", 0.0, 0)
    pairer.push("a", 0.1, 1)
    pairer.reset()
    assert pairer.pending() == {"a": 0, "b": 0} and pairer.dropped["a"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"streams": [], "slop_s": 0.01}, "at least one"),
        ({"streams": ["a", "a"], "slop_s": 0.01}, "unique"),
        ({"streams": ["a"], "slop_s": -1.0}, "slop_s"),
        ({"streams": ["a"], "slop_s": float("nan")}, "slop_s"),
        ({"streams": ["a"], "slop_s": 0.01, "queue_size": 0}, "queue_size"),
    ],
)
def test_bad_construction_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApproximateTimePairer(**kwargs)


def test_bad_push_is_rejected_without_state_change():
    pairer = ApproximateTimePairer(["a", "b"], slop_s=0.01)
    with pytest.raises(ValueError, match="unknown stream"):
        pairer.push("c", 0.0, None)
    with pytest.raises(ValueError, match="stamp_s"):
        pairer.push("a", float("nan"), None)
    assert pairer.pending() == {"a": 0, "b": 0}
