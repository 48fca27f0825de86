"""reward_node with ``between: student``: a distilled student fills the frames between reward-model queries.

Checked with the installed node (tiny LRM on the CPU) and students written in the store layout: a student
made for another task is refused (ERROR in /diagnostics naming what it was made for, every frame held, the
node answering); a student path with nothing there holds with a WARN; the right student gives every held
frame its own values -- the same numbers the student gives those frames offline, conditioned on the
episode's first frame -- marked ``student: true``, while queried frames stay the reward model's and anchor
the drift report.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from test_reward_node import (  # noqa: E402
    CLIP_FRAMES,
    FPS,
    T0_NS,
    TASK,
    Probe,
    image_msg,
    kv,
    pick_and_place_frame,
    start_reward_node,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "student"))
from students import write_student  # noqa: E402

STUDENT_STATUS = "reward_node: student"


def clip(offset_s: int) -> tuple[list[int], list]:
    stamps = [T0_NS + offset_s * 1_000_000_000 + i * 1_000_000_000 // FPS for i in range(CLIP_FRAMES)]
    frames = [pick_and_place_frame(i / (CLIP_FRAMES - 1)) for i in range(CLIP_FRAMES)]
    return stamps, frames


def play(probe: Probe, offset_s: int):
    stamps, frames = clip(offset_s)
    probe.publish_frames(probe.raw, [image_msg(f, ns) for f, ns in zip(frames, stamps, strict=True)])
    return probe.wait_rewards(stamps), frames


def student_status(probe: Probe, predicate) -> DiagnosticStatus:
    statuses = probe.fresh_diagnostics(lambda s: STUDENT_STATUS in s and predicate(s[STUDENT_STATUS]), 20.0)
    return statuses[STUDENT_STATUS]


def test_the_student_fills_held_frames_and_a_wrong_or_missing_one_holds(
    start_node, ros_node, tiny_lrm, tmp_path
):
    from lrm_reward.student.between import StudentBetween
    from lrm_reward.student.loading import load_student

    right = write_student(tmp_path / "right", task=TASK, source_shape=(48, 64))
    wrong = write_student(tmp_path / "wrong", task="open the drawer", source_shape=(48, 64))
    process = start_reward_node(
        start_node,
        tiny_lrm,
        between="student",
        student={"path": str(wrong.parent), "camera": "front"},
    )
    probe = Probe(ros_node, process)
    probe.wait_connected(probe.raw)

    # made for another task: refused, said so, every frame still answered (held)
    refused = student_status(probe, lambda s: s.level == DiagnosticStatus.ERROR)
    assert "refused" in refused.message and "open the drawer" in refused.message, refused.message
    rewards, _ = play(probe, 0)
    assert not any(r.student for r in rewards)
    assert any(r.held for r in rewards) and any(r.queried for r in rewards)

    # nothing at the path: hold, WARN
    assert all(r.successful for r in probe.set_params(**{"student.path": str(tmp_path / "nothing")}))
    missing = student_status(probe, lambda s: s.level == DiagnosticStatus.WARN)
    assert "no student" in missing.message, missing.message

    # the right student: a new episode, every held frame gets the student's own values
    assert all(r.successful for r in probe.set_params(**{"student.path": str(right.parent)}))
    assert probe.set_task(reset_only=True).result == 0
    rewards, frames = play(probe, 10)
    offline = StudentBetween(load_student(right, TASK, "front"))
    offline.set_initial(frames[0])
    queried = [r for r in rewards if r.queried]
    filled = [r for r in rewards if r.student]
    assert queried and all(not r.student for r in queried)  # the reward model's own answers
    assert filled and all(r.held and not r.queried for r in filled)
    assert len(filled) + len(queried) == CLIP_FRAMES, "a held frame without the student's values"
    for r in filled:
        expected = offline.frame(frames[r.frame_index])
        assert abs(r.progress - expected.progress) < 1e-4, (r.frame_index, r.progress, expected)
        assert abs(r.completion_prob - expected.completion) < 1e-4, (
            r.frame_index,
            r.completion_prob,
            expected,
        )
    assert len({round(r.progress, 5) for r in filled}) > 1  # its own value per frame, not a held copy

    ok = student_status(probe, lambda s: int(kv(s).get("student anchors", "0")) >= 1)
    values = kv(ok)
    assert ok.level in (DiagnosticStatus.OK, DiagnosticStatus.WARN)  # WARN: the untrained student drifts
    assert values["student drift"] in ("ok", "warn", "no_data")
    assert int(values["student frames"]) >= len(filled)
    assert "serves /camera/image" in values["student"], values
    assert process.alive()
