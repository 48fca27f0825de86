"""The student between queries: a value for every frame, the teacher's answers as anchors (also late
ones), and drift between the two as OK / WARN for /diagnostics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from students import write_student

from lrm_reward.student.between import (
    DRIFT_NO_DATA,
    DRIFT_OK,
    DRIFT_WARN,
    BetweenConfig,
    StudentBetween,
)
from lrm_reward.student.loading import StudentValues, load_student


class LevelStudent:
    """A stand-in student: progress = frame brightness / 255, completion = brightness >= 200."""

    arch = SimpleNamespace(use_initial_frame=True)
    completion_threshold = 0.5

    def __init__(self) -> None:
        self.initials = []

    def embed(self, image):
        self.initials.append(float(np.mean(image)))
        return self.initials[-1]

    def predict_one(self, image, initial):
        assert initial == self.initials[-1]
        level = float(np.mean(image))
        return StudentValues(progress=level / 255.0, completion=float(level >= 200))


def frame(level: float) -> np.ndarray:
    return np.full((8, 8, 3), level, np.uint8)


def test_every_frame_gets_the_students_values_and_offsets_follow_the_anchor():
    student = LevelStudent()
    between = StudentBetween(student, BetweenConfig(anchor="offset"))
    first = between.frame(frame(51), key=0)
    assert student.initials == [51.0]  # the first frame after reset() is the episode's initial frame
    assert first.source == "student"
    assert first.progress == pytest.approx(0.2) and first.raw_progress == pytest.approx(0.2)
    assert between.anchor(0, progress=0.3, completion=0.0)  # the teacher says 0.3 where the student said 0.2
    nxt = between.frame(frame(102), key=1)
    assert nxt.raw_progress == pytest.approx(0.4)
    assert nxt.progress == pytest.approx(0.5)  # continues from the teacher's level
    assert nxt.completion == 0.0
    high = between.frame(frame(255), key=2)
    assert high.progress == 1.0  # clipped to [0, 1]
    raw = StudentBetween(LevelStudent())  # raw is the default
    raw.frame(frame(51), key=0)
    raw.anchor(0, 0.3, 0.0)
    assert raw.frame(frame(102), key=1).progress == pytest.approx(0.4)


def test_late_anchors_use_the_remembered_frame():
    between = StudentBetween(LevelStudent(), BetweenConfig(remember=2))
    for k, level in enumerate((51, 102, 153)):
        between.frame(frame(level), key=k)
    assert not between.anchor(0, 0.2, None)  # forgotten (remember=2): counted, not used
    assert between.anchor(1, 0.4, None)  # the student said 0.4 on frame 1, whatever came after
    assert between.drift().progress_mad == pytest.approx(0.0, abs=1e-9)
    assert between.anchor(99, 0.5, None, image=frame(102))  # never seen: scored now
    report = between.drift()
    assert report.anchors_missed == 1
    assert report.progress_mad == pytest.approx(0.05, abs=1e-6)


def test_drift_is_reported_and_warns():
    between = StudentBetween(LevelStudent(), BetweenConfig(min_anchors=3, window=4, progress_warn=0.2))
    assert between.drift().level == DRIFT_NO_DATA
    between.frame(frame(51), key=0)
    for k in range(3):
        between.frame(frame(51), key=k)
        between.anchor(k, progress=0.25, completion=0.0)  # student 0.2: agrees
    report = between.drift()
    assert report.level == DRIFT_OK and report.anchors == 3
    assert report.progress_mad == pytest.approx(0.05, abs=1e-6)
    assert report.completion_disagreement == 0.0
    assert report.frames == 4 and report.mean_ms >= 0.0
    assert "agrees" in report.message
    for k in range(3, 7):  # the scene changed: the teacher sees the task done, the student does not
        between.frame(frame(51), key=k)
        between.anchor(k, progress=0.9, completion=1.0)
    report = between.drift()
    assert report.level == DRIFT_WARN and report.anchors == 4  # the window keeps the latest 4
    assert report.progress_mad == pytest.approx(0.7, abs=1e-6)
    assert report.completion_disagreement == 1.0
    assert "progress differs from the teacher by 0.70" in report.message
    kv = report.key_values()
    assert kv["student drift"] == "warn" and kv["student progress MAD"] == "0.700"
    assert kv["student anchors"] == "4" and kv["student completion disagreement"] == "1.000"
    assert "completion disagrees with the teacher on 100%" in report.message
    between.reset()
    assert between.drift().level == DRIFT_NO_DATA and not between.has_initial


def test_unasked_teacher_values_are_ignored():
    between = StudentBetween(LevelStudent(), BetweenConfig(min_anchors=1))
    between.frame(frame(51), key=0)
    assert not between.anchor(0, float("nan"), None)
    assert between.anchor(0, float("nan"), 1.0)  # completion only
    report = between.drift()
    assert math.isnan(report.progress_mad) and report.completion_disagreement == 1.0
    assert report.level == DRIFT_WARN


def test_bad_config_is_refused():
    for bad in ({"anchor": "blend"}, {"window": 0}, {"progress_warn": 0.0}, {"completion_threshold": 1.0}):
        with pytest.raises(ValueError):
            BetweenConfig(**bad)


def test_with_a_loaded_student(tmp_path):
    write_student(tmp_path / "student")
    student = load_student(tmp_path / "student", "stack the cups")
    between = StudentBetween(student)
    between.set_initial(frame(10))
    values = [between.frame(frame(level), key=k) for k, level in enumerate((10, 60, 120))]
    assert all(0.0 <= v.progress <= 1.0 and 0.0 <= v.completion <= 1.0 for v in values)
    assert between.anchor(1, 0.5, 0.1)
    assert between.threshold == student.completion_threshold
