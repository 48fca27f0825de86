"""Episode windows of a bag: one per bag, at silences, at markers (start or end), and what markers say."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from lrm_reward.bags.episode_windows import (
    EpisodeWindow,
    MarkerEvent,
    MarkerInterpreter,
    one_per_bag,
    split_at_gaps,
    split_at_markers,
    task_in_effect,
)

S = 1_000_000_000


def test_one_per_bag_covers_the_last_message():
    plan = one_per_bag(5 * S, 9 * S)
    assert [(w.start_ns, w.stop_ns) for w in plan.windows] == [(5 * S, 9 * S + 1)]


def test_gaps_longer_than_the_limit_split_episodes():
    times = np.array([0, 1, 2, 10, 11, 30]) * S // 2  # silences of 4 s and 9.5 s
    plan = split_at_gaps(times, gap_s=2.0)
    assert [(w.start_ns, w.stop_ns) for w in plan.windows] == [
        (0, S + 1),
        (5 * S, 11 * S // 2 + 1),
        (15 * S, 15 * S + 1),
    ]
    assert split_at_gaps(np.array([], dtype=np.int64), 1.0).windows == []


def test_start_markers_open_episodes_and_what_comes_before_is_left_out():
    markers = [MarkerEvent(2 * S, task="a"), MarkerEvent(6 * S, task="b")]
    plan = split_at_markers(markers, 0, 9 * S, at="start")
    assert [(w.start_ns, w.stop_ns, w.task) for w in plan.windows] == [
        (2 * S, 6 * S, "a"),
        (6 * S, 9 * S + 1, "b"),
    ]
    assert plan.notes == ["2.00 s before the first marker left out"]


def test_end_markers_close_episodes_and_what_comes_after_is_left_out():
    markers = [MarkerEvent(4 * S, outcome="success"), MarkerEvent(8 * S, outcome="failure")]
    plan = split_at_markers(markers, S, 10 * S, at="end")
    assert [(w.start_ns, w.stop_ns, w.outcome) for w in plan.windows] == [
        (S, 4 * S, "success"),
        (4 * S, 8 * S, "failure"),
    ]
    assert plan.notes == ["2.00 s after the last marker left out"]
    assert split_at_markers([], 0, S, at="end").windows == []
    with pytest.raises(ValueError):
        split_at_markers(markers, 0, S, at="middle")


def test_markers_say_task_outcome_and_policy_when_their_message_does():
    interp = MarkerInterpreter()
    sim_result = SimpleNamespace(
        data=json.dumps({"success": True, "task": "stack", "policy_version": "act/v2", "note": "ok"})
    )
    e = interp.event(1, sim_result)
    assert (e.task, e.outcome, e.policy_version, e.notes) == ("stack", "success", "act/v2", "ok")
    assert interp.event(2, SimpleNamespace(data=False)).outcome == "failure"
    assert interp.event(3, SimpleNamespace(data="plain text")).outcome == ""
    assert interp.event(4, SimpleNamespace()).time_ns == 4  # any type marks the time


def test_a_recorded_service_call_is_one_marker_however_many_events_it_left():
    interp = MarkerInterpreter()

    def event(kind, seq, gid=1):
        info = SimpleNamespace(event_type=kind, sequence_number=seq, client_gid=np.full(16, gid, np.uint8))
        request = [SimpleNamespace(task="pick", notes="", policy_version="")] if kind in (0, 1) else []
        return SimpleNamespace(info=info, request=request, response=[])

    got = [
        interp.event(t, event(kind, seq))
        for t, (kind, seq) in enumerate([(0, 1), (1, 1), (2, 1), (3, 1), (1, 2)])
    ]
    assert [g is not None for g in got] == [True, False, False, False, True]
    assert got[0].task == "pick"
    assert interp.event(9, event(1, 1, gid=2)) is not None  # another client, same sequence number


def test_the_task_in_effect_is_the_latest_before_the_episode_else_the_first_inside():
    tasks = [(1, "old"), (5, "current"), (12, "next")]
    assert task_in_effect(tasks, EpisodeWindow(10, 20)) == "current"
    assert task_in_effect(tasks[2:], EpisodeWindow(10, 20)) == "next"
    assert task_in_effect(tasks[2:], EpisodeWindow(0, 10)) == ""
