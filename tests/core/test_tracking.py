"""Episode state, interval-hold and fusion (core.tracking) against a fake engine that records its calls."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lrm_reward.core.tracking import (
    ENGINE_ERROR_PREFIX,
    EpisodeTracker,
    IntervalHold,
    TrackerConfig,
    score_frames,
)
from lrm_reward.core.types import Answer, Modality, Query

P, C, D = Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION
ALL = (P, C, D)


def frame(i: int, shape: tuple[int, int] = (6, 8)) -> np.ndarray:
    """A frame whose every pixel is i, so the test can tell which frame reached the model."""
    return np.full((*shape, 3), i % 256, dtype=np.uint8)


def frame_id(image: np.ndarray) -> int:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert np.all(image == image.flat[0])
    return int(image.flat[0])


class FakeEngine:
    """score() answers from a per-modality table or callable; records every call."""

    def __init__(self, values: dict[Modality, object] | None = None):
        self.values = values or {P: 0.4, C: 0.2, D: 0.1}
        self.calls: list[list[Query]] = []

    def answer(self, query: Query) -> Answer:
        value = self.values[query.modality]
        if callable(value):
            value = value(query)
        if isinstance(value, Answer):
            return value
        return Answer(query.modality, value, parsed=True, latency_s=0.01, raw_text=f"analysis {value}")

    def score(self, queries: list[Query]) -> list[Answer]:
        self.calls.append(list(queries))
        return [self.answer(q) for q in queries]


def run_frame(tracker: EpisodeTracker, engine: FakeEngine, i: int, stamp: float | None = None):
    plan = tracker.plan(frame(i), float(i) if stamp is None else stamp)
    answers = engine.score(plan.queries) if plan.queries else []
    return plan, tracker.update(plan, answers)


# -- what each modality sees ---------------------------------------------------------------------


def test_first_query_progress_gets_initial_and_current_completion_current_no_contrastive():
    tracker = EpisodeTracker("put the cube in the bowl", TrackerConfig(modalities=ALL, interval_frames=1))
    plan = tracker.plan(frame(7), 0.0)
    kinds = [q.modality for q in plan.queries]
    assert kinds == [P, D]  # contrastive needs a previous query frame
    progress, completion = plan.queries
    assert [frame_id(im) for im in progress.images] == [7, 7]
    assert [frame_id(im) for im in completion.images] == [7]
    assert all(q.task == "put the cube in the bowl" for q in plan.queries)


def test_contrastive_compares_previous_query_frame_not_previous_frame():
    cfg = TrackerConfig(modalities=ALL, interval_frames=3)
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine()
    for i in range(10):
        run_frame(tracker, engine, i)
    # queried frames: 0, 3, 6, 9
    contrastive = [q for call in engine.calls for q in call if q.modality is C]
    assert [[frame_id(im) for im in q.images] for q in contrastive] == [[0, 3], [3, 6], [6, 9]]
    progress = [q for call in engine.calls for q in call if q.modality is P]
    assert [[frame_id(im) for im in q.images] for q in progress] == [[0, 0], [0, 3], [0, 6], [0, 9]]
    completion = [q for call in engine.calls for q in call if q.modality is D]
    assert [[frame_id(im) for im in q.images] for q in completion] == [[0], [3], [6], [9]]


def test_chain_of_thought_only_on_contrastive_and_reasoning_kept():
    cfg = TrackerConfig(modalities=ALL, interval_frames=1, chain_of_thought=True)
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine()
    run_frame(tracker, engine, 0)
    _, result = run_frame(tracker, engine, 1)
    flags = {q.modality: q.chain_of_thought for q in engine.calls[-1]}
    assert flags == {P: False, C: True, D: False}
    assert result.reasoning == "analysis 0.2"


def test_tracker_keeps_its_own_copy_of_frames():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=ALL, interval_frames=1))
    buffer = frame(5)
    tracker.plan(buffer, 0.0)
    buffer[:] = 99  # a camera driver reusing its buffer must not rewrite the episode's initial frame
    plan = tracker.plan(buffer, 1.0)
    progress = next(q for q in plan.queries if q.modality is P)
    contrastive = next(q for q in plan.queries if q.modality is C)
    assert [frame_id(im) for im in progress.images] == [5, 99]
    assert [frame_id(im) for im in contrastive.images] == [5, 99]
    assert frame_id(tracker.initial_frame) == 5


def test_gray_and_float_frames_reach_the_model_as_rgb_uint8():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(D,), interval_frames=1))
    plan = tracker.plan(np.full((4, 5), 0.5, dtype=np.float32), 0.0)
    (image,) = plan.queries[0].images
    assert image.shape == (4, 5, 3) and image.dtype == np.uint8
    assert np.all(image == 128)


# -- interval-hold -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 10])
def test_queries_every_k_frames(k):
    tracker = EpisodeTracker("task", TrackerConfig(interval_frames=k))
    queried = [bool(tracker.plan(frame(i), i / 30).queries) for i in range(25)]
    assert [i for i, q in enumerate(queried) if q] == list(range(0, 25, k))


def test_queries_every_t_seconds_of_stamp_time_on_a_grid():
    tracker = EpisodeTracker("task", TrackerConfig(interval_frames=1000, interval_s=0.1))
    # 30 Hz camera with a little jitter; T=0.1 s should query about every third frame, never drifting.
    rng = np.random.default_rng(0)
    stamps = [i / 30 + rng.uniform(-0.004, 0.004) for i in range(60)]
    stamps[0] = 0.0
    queried = [s for s in stamps if tracker.plan(frame(0), s).queries]
    assert queried[0] == 0.0
    # one query per 0.1 s slot of the 2 s clip: exactly 20, each in its own slot
    assert len(queried) == 20
    assert [math.floor(s / 0.1 + 1e-9) for s in queried] == list(range(20))


def test_time_interval_requeries_when_stamps_jump_back():
    hold = IntervalHold(every_frames=1000, every_s=1.0)
    assert [hold.step(s) for s in (10.0, 10.5, 11.0, 11.2, 3.0, 3.5, 4.0)] == [
        True,
        False,
        True,
        False,
        True,  # stamp went backwards (bag loop): re-anchor and query at once
        False,
        True,
    ]


def test_interval_hold_skip_keeps_a_due_frame_due():
    hold = IntervalHold(every_frames=3)
    assert hold.step(0.0) is True
    hold.skip()
    hold.skip()  # this frame was due (3rd) but skipped
    assert hold.is_due(3.0)
    assert hold.step(3.0) is True
    assert hold.step(4.0) is False


def test_hold_repeats_last_values_with_scored_stamp_of_last_query():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P, D), interval_frames=4))
    engine = FakeEngine({P: 0.6, D: 0.2})
    _, first = run_frame(tracker, engine, 0, stamp=100.0)
    assert first.queried and not first.held and first.scored_stamp_s == 100.0
    results = [run_frame(tracker, engine, i, stamp=100.0 + i)[1] for i in range(1, 4)]
    for i, result in enumerate(results, start=1):
        assert result.held and not result.queried
        assert result.stamp_s == 100.0 + i
        assert result.scored_stamp_s == 100.0
        assert result.frame_index == i
        assert result.progress == pytest.approx(0.6) and result.completion_prob == pytest.approx(0.2)
        assert result.reward == pytest.approx(first.reward)
        assert result.answers == []
    assert len(engine.calls) == 1


def test_zero_mode_zeros_reward_between_queries_but_keeps_values():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P,), interval_frames=3, between="zero"))
    engine = FakeEngine({P: 0.8})
    rewards = [run_frame(tracker, engine, i)[1] for i in range(4)]
    assert [r.reward for r in rewards] == pytest.approx([0.8, 0.0, 0.0, 0.8])
    assert rewards[1].held and rewards[1].progress == pytest.approx(0.8)


def test_student_mode_holds_and_with_student_replaces_the_held_values_with_its_own():
    cfg = TrackerConfig(
        modalities=(P, C, D),
        interval_frames=3,
        between="student",
        weights={"progress": 1.0, "contrastive": 1.0, "completion": 2.0},
    )
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine({P: 0.2, C: 0.6, D: 0.1})
    rewards = [run_frame(tracker, engine, i)[1] for i in range(5)]  # queried: 0 and 3 (contrastive: 3)
    first, held = rewards[3], rewards[4]
    assert held.held and not held.student and held.progress == pytest.approx(0.2)  # the tracker holds
    filled = tracker.with_student(held, progress=0.7, completion=1.4)  # out of range: clipped
    assert filled.student and filled.held and not filled.queried
    assert (filled.progress, filled.completion_prob) == pytest.approx((0.7, 1.0))
    assert filled.contrastive == pytest.approx(0.6) and filled.completed == held.completed  # the model's
    assert filled.reward == pytest.approx((0.7 + (0.6 + 1) / 2 + 2 * 1.0) / 4)
    assert filled.frame_index == held.frame_index and filled.scored_stamp_s == first.stamp_s
    # the tracker's own values are untouched: the next held frame holds the model's again
    assert run_frame(tracker, engine, 5)[1].progress == pytest.approx(0.2)


def test_held_counts_frames_and_does_not_query():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P,), interval_frames=2))
    engine = FakeEngine({P: 0.3})
    before = tracker.held(0.0)  # nothing scored yet in this episode
    assert before.held and math.isnan(before.scored_stamp_s) and before.reward == 0.0
    assert math.isnan(before.progress)
    plan, first = run_frame(tracker, engine, 1)
    assert plan.queries and first.frame_index == 1
    skipped = tracker.held(2.0)  # the worker was busy: this frame never reached the model
    assert skipped.held and skipped.reward == pytest.approx(0.3) and skipped.frame_index == 2
    plan, _ = run_frame(tracker, engine, 3)
    assert plan.queries  # 2 frames after the query: due again
    assert tracker.frame_index == 4


# -- answers and fusion --------------------------------------------------------------------------


def test_tri_fusion_is_mean_with_contrastive_mapped():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=ALL, interval_frames=1))
    engine = FakeEngine({P: 0.6, C: -0.5, D: 0.9})
    _, first = run_frame(tracker, engine, 0)
    # no contrastive on the first query: mean of the two available
    assert first.reward == pytest.approx((0.6 + 0.9) / 2)
    assert math.isnan(first.contrastive)
    _, second = run_frame(tracker, engine, 1)
    assert second.contrastive == pytest.approx(-0.5)
    assert second.reward == pytest.approx((0.6 + (-0.5 + 1) / 2 + 0.9) / 3)


def test_weighted_fusion_and_zero_weight_modality_still_queried():
    cfg = TrackerConfig(modalities=ALL, interval_frames=1, weights={"progress": 3.0, "contrastive": 1.0})
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine({P: 0.2, C: 1.0, D: 1.0})
    run_frame(tracker, engine, 0)
    _, result = run_frame(tracker, engine, 1)
    assert result.reward == pytest.approx((3 * 0.2 + 1 * 1.0) / 4)
    assert result.completion_prob == pytest.approx(1.0)  # asked, not fused
    assert D in [q.modality for q in engine.calls[-1]]


def test_unparsed_answers_are_counted_and_keep_the_last_good_value():
    answers = iter([0.25, Answer(P, None, parsed=False, error="no JSON"), float("nan"), 0.75])
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P,), interval_frames=1))
    engine = FakeEngine({P: lambda q: next(answers)})
    results = [run_frame(tracker, engine, i, stamp=10.0 + i)[1] for i in range(4)]
    assert [r.progress for r in results] == pytest.approx([0.25, 0.25, 0.25, 0.75])
    assert [r.unparsed for r in results] == [0, 1, 1, 0]
    # the frame whose values are shown: failed queries keep pointing at the last good one
    assert [r.scored_stamp_s for r in results] == [10.0, 10.0, 10.0, 13.0]
    assert all(r.queried for r in results)
    assert tracker.unparsed_total == 2 and tracker.queries_total == 4


def test_answer_of_wrong_modality_or_out_of_range_value():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P, D), interval_frames=1))
    plan = tracker.plan(frame(0), 0.0)
    wrong = [Answer(D, 0.5, parsed=True), Answer(D, 1.7, parsed=True)]
    result = tracker.update(plan, wrong)
    assert result.unparsed == 1 and math.isnan(result.progress)
    assert result.completion_prob == 1.0  # clipped to the modality's range


def test_update_rejects_answer_count_mismatch():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P, D), interval_frames=1))
    plan = tracker.plan(frame(0), 0.0)
    with pytest.raises(ValueError, match="1 answers for 2 queries"):
        tracker.update(plan, [Answer(P, 0.1, parsed=True)])


# -- completion debounce -------------------------------------------------------------------------


def test_completion_debounce_needs_consecutive_answers_each_way():
    sequence = iter([0.9, 0.9, 0.1, 0.9, 0.9, 0.9, 0.2, 0.8, 0.1, 0.1, 0.1])
    cfg = TrackerConfig(modalities=(D,), interval_frames=1, completion_threshold=0.5, completion_debounce=3)
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine({D: lambda q: next(sequence)})
    flags = [run_frame(tracker, engine, i)[1].completed for i in range(11)]
    assert flags == [
        False,
        False,
        False,  # a "no" breaks the run
        False,
        False,
        True,  # third consecutive "yes"
        True,  # one "no" is noise
        True,
        True,
        True,
        False,  # three consecutive "no"
    ]


def test_completion_debounce_ignores_unparsed_and_held_frames():
    sequence = iter([0.9, Answer(D, None, parsed=False, error="garbage"), 0.9])
    cfg = TrackerConfig(modalities=(D,), interval_frames=2, completion_debounce=2)
    tracker = EpisodeTracker("task", cfg)
    engine = FakeEngine({D: lambda q: next(sequence)})
    flags = [run_frame(tracker, engine, i)[1].completed for i in range(5)]
    # queries on frames 0, 2, 4: yes, unparsed (streak kept), yes -> done on frame 4
    assert flags == [False, False, False, False, True]


def test_completion_threshold_is_inclusive():
    cfg = TrackerConfig(modalities=(D,), interval_frames=1, completion_threshold=1.0, completion_debounce=1)
    tracker = EpisodeTracker("task", cfg)
    assert run_frame(tracker, FakeEngine({D: 1.0}), 0)[1].completed


# -- episodes ------------------------------------------------------------------------------------


def test_reset_starts_new_episode_with_new_initial_frame_and_task():
    cfg = TrackerConfig(modalities=ALL, interval_frames=2, completion_debounce=1)
    tracker = EpisodeTracker("old task", cfg, stream="front")
    engine = FakeEngine({P: 0.5, C: 0.0, D: 0.9})
    for i in range(3):
        run_frame(tracker, engine, i)
    assert tracker.completed and tracker.episode_id == 0
    tracker.reset("new task")
    assert tracker.episode_id == 1 and tracker.frame_index == 0 and tracker.task == "new task"
    assert not tracker.completed and tracker.initial_frame is None
    plan, result = run_frame(tracker, engine, 40)
    assert result.episode_id == 1 and result.frame_index == 0 and result.queried
    assert [q.modality for q in plan.queries] == [P, D]  # no contrastive against the old episode
    assert [frame_id(im) for im in plan.queries[0].images] == [40, 40]
    assert all(q.task == "new task" for q in plan.queries)
    plan, _ = run_frame(tracker, engine, 41)
    assert not plan.queries  # interval restarts with the episode
    plan, _ = run_frame(tracker, engine, 42)
    assert [frame_id(im) for im in plan.queries[0].images] == [40, 42]
    tracker.reset()
    assert tracker.task == "new task" and tracker.episode_id == 2


def test_set_config_keeps_episode_and_applies_new_weights_and_interval():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P, D), interval_frames=100))
    engine = FakeEngine({P: 0.2, D: 0.6})
    run_frame(tracker, engine, 0)
    assert run_frame(tracker, engine, 1)[0].queries == []
    tracker.set_config(TrackerConfig(modalities=(P, D), interval_frames=2, weights={"progress": 1.0}))
    plan, result = run_frame(tracker, engine, 2)
    assert [frame_id(im) for im in plan.queries[0].images] == [0, 2]  # same episode, same initial frame
    assert result.reward == pytest.approx(0.2)  # completion now weighted 0
    assert run_frame(tracker, engine, 3)[0].queries == []
    assert run_frame(tracker, engine, 4)[0].queries != []


def test_answers_for_a_previous_episode_are_not_applied():
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P,), interval_frames=1))
    plan = tracker.plan(frame(0), 0.0)
    tracker.reset()
    stale = tracker.update(plan, [Answer(P, 0.9, parsed=True)])
    assert stale.episode_id == 0 and stale.answers[0].value == 0.9
    fresh = tracker.held(1.0)
    assert math.isnan(fresh.progress) and fresh.episode_id == 1


@pytest.mark.parametrize("task", ["", "   ", None])
def test_empty_task_is_rejected(task):
    with pytest.raises(ValueError, match="task"):
        EpisodeTracker(task, TrackerConfig())


@pytest.mark.parametrize("bad", [np.zeros((0, 4, 3), np.uint8), np.full((2, 2), np.nan), np.zeros((2, 2, 2))])
def test_bad_frame_raises_before_state_changes(bad):
    tracker = EpisodeTracker("task", TrackerConfig(interval_frames=1))
    with pytest.raises(ValueError):
        tracker.plan(bad, 0.0)
    with pytest.raises(ValueError, match="stamp"):
        tracker.plan(frame(0), float("nan"))
    assert tracker.frame_index == 0 and tracker.initial_frame is None


# -- score_frames --------------------------------------------------------------------------------


def test_score_frames_makes_one_engine_call_for_all_streams():
    cfg = TrackerConfig(modalities=ALL, interval_frames=2)
    trackers = [EpisodeTracker(f"task {n}", cfg, stream=f"cam{n}") for n in range(3)]
    engine = FakeEngine({P: lambda q: frame_id(q.images[-1]) / 100, C: 0.0, D: 0.5})
    first = score_frames(engine, [(t, frame(10 + n), 0.0) for n, t in enumerate(trackers)])
    assert len(engine.calls) == 1
    assert [q.task for q in engine.calls[0]] == ["task 0", "task 0", "task 1", "task 1", "task 2", "task 2"]
    assert [r.progress for r in first] == pytest.approx([0.10, 0.11, 0.12])

    held = score_frames(engine, [(t, frame(20 + n), 0.1) for n, t in enumerate(trackers)])
    assert len(engine.calls) == 1  # every frame held: no engine call at all
    assert all(r.held for r in held)

    third = score_frames(engine, [(t, frame(30 + n), 0.2) for n, t in enumerate(trackers)])
    assert len(engine.calls) == 2
    assert len(engine.calls[1]) == 9  # three modalities per stream now that contrastive has a frame A
    contrastive_pairs = [[frame_id(im) for im in q.images] for q in engine.calls[1] if q.modality is C]
    assert contrastive_pairs == [[10, 30], [11, 31], [12, 32]]
    assert [r.progress for r in third] == pytest.approx([0.30, 0.31, 0.32])


def test_score_frames_mixes_held_and_queried_streams():
    slow = EpisodeTracker("a", TrackerConfig(modalities=(P,), interval_frames=5))
    fast = EpisodeTracker("b", TrackerConfig(modalities=(P,), interval_frames=1))
    engine = FakeEngine({P: 0.5})
    score_frames(engine, [(slow, frame(0), 0.0), (fast, frame(0), 0.0)])
    results = score_frames(engine, [(slow, frame(1), 0.1), (fast, frame(1), 0.1)])
    assert len(engine.calls) == 2 and [q.task for q in engine.calls[1]] == ["b"]
    assert results[0].held and results[1].queried


def test_score_frames_checks_every_frame_before_touching_any_tracker():
    a = EpisodeTracker("a", TrackerConfig(interval_frames=1))
    b = EpisodeTracker("b", TrackerConfig(interval_frames=1))
    engine = FakeEngine()
    with pytest.raises(ValueError):
        score_frames(engine, [(a, frame(0), 0.0), (b, np.zeros((3, 3, 5), np.uint8), 0.0)])
    assert a.frame_index == 0 and b.frame_index == 0 and engine.calls == []


class RaisingEngine:
    def __init__(self, answers_short: bool = False):
        self.answers_short = answers_short

    def score(self, queries):
        if self.answers_short:
            return [Answer(queries[0].modality, 0.5, parsed=True)]
        raise RuntimeError("CUDA error: device-side assert")


@pytest.mark.parametrize("short", [False, True])
def test_score_frames_survives_a_broken_engine(short):
    tracker = EpisodeTracker("task", TrackerConfig(modalities=(P, D), interval_frames=1))
    ok = FakeEngine({P: 0.4, D: 0.3})
    score_frames(ok, [(tracker, frame(0), 0.0)])
    (result,) = score_frames(RaisingEngine(answers_short=short), [(tracker, frame(1), 1.0)])
    assert result.queried and result.unparsed == 2
    assert all(a.error.startswith(ENGINE_ERROR_PREFIX) for a in result.answers)
    assert result.progress == pytest.approx(0.4) and result.scored_stamp_s == 0.0
    assert tracker.frame_index == 2


# -- config validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"interval_frames": 0}, "interval_frames"),
        ({"interval_frames": 2.5}, "interval_frames"),
        ({"interval_frames": True}, "interval_frames"),
        ({"interval_s": 0.0}, "interval_s"),
        ({"interval_s": -1.0}, "interval_s"),
        ({"interval_s": float("inf")}, "interval_s"),
        ({"between": "repeat"}, "between"),
        ({"weights": {"progress": -1.0, "completion": 1.0}}, "weights"),
        ({"weights": {"progress": 0.0, "completion": 0.0}}, "positive sum"),
        ({"weights": {"progress": float("nan")}}, "weights"),
        ({"weights": {"speed": 1.0}}, "unknown modality"),
        ({"weights": {"contrastive": 1.0}}, "not in modalities"),
        ({"completion_threshold": 1.5}, "completion_threshold"),
        ({"completion_threshold": -0.1}, "completion_threshold"),
        ({"completion_debounce": 0}, "completion_debounce"),
        ({"modalities": ()}, "at least one"),
        ({"modalities": ("progress", "reward")}, "modalities"),
        ({"modalities": ("progress", "progress")}, "repeat"),
        ({"modalities": "progress"}, "sequence"),
        ({"chain_of_thought": "yes"}, "chain_of_thought"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrackerConfig(**kwargs)


def test_config_normalises_modalities_and_weights():
    cfg = TrackerConfig(modalities=["progress", "contrastive"], weights={Modality.PROGRESS: 2})
    assert cfg.modalities == (P, C)
    assert cfg.weights == {"progress": 2.0}
    assert cfg.fusion_weights() == {P: 2.0, C: 0.0}
    assert TrackerConfig(modalities=ALL).fusion_weights() == {P: 1.0, C: 1.0, D: 1.0}
