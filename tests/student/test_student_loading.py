"""Loading a student: versions in the store, refusal of another task / camera / frame size, a missing
student falls back to hold with a WARN, a corrupt one is an error."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch
from students import write_student

from lrm_reward.student import store
from lrm_reward.student.loading import (
    StudentLoadError,
    StudentMismatchError,
    load_student,
    normalize_task,
    resolve_version,
)

TASK = "stack the cups"


def test_versions_count_up_and_are_never_overwritten(tmp_path):
    root = store.student_root(tmp_path / "adapters")
    first = write_student(root)
    (root / store.STAGING / "v0002").mkdir(parents=True)  # a killed run's leftovers
    second = write_student(root, seed=1)
    assert [p.name for p in store.versions(root)] == ["v0001", "v0002"]
    assert first.name == "v0001" and second.name == "v0002"
    assert not (root / store.STAGING).exists()
    config = json.loads((second / store.CONFIG_FILE).read_text())
    assert config["schema"] == store.SCHEMA and config["version"] == "v0002"
    assert config["files"][store.WEIGHTS_FILE] == store.sha256_file(second / store.WEIGHTS_FILE)
    assert config["created_at"]
    assert store.latest(root) == second
    # the adapters folder, the student folder and a version folder all name a student
    assert resolve_version(tmp_path / "adapters") == second
    assert resolve_version(root) == second
    assert resolve_version(first) == first


def test_a_second_writer_is_refused(tmp_path):
    root = tmp_path / "student"
    handle = store.try_exclusive_lock(root / ".lock")
    try:
        with pytest.raises(store.StudentStoreBusyError, match="another lrm-distill"):
            write_student(root)
    finally:
        handle.close()


def test_loaded_student_scores_frames(tmp_path):
    path = write_student(tmp_path / "student")
    student = load_student(
        tmp_path / "student", "Stack the cups.", camera="observation.images.front", source_shape=(48, 64)
    )
    assert student is not None and student.path == path and student.version == "v0001"
    assert "v0001" in student.describe() and "'front'" in student.describe()
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    z0 = student.embed(frames[0])
    values = student.predict(frames, z0)
    assert values.shape == (3, 2) and values.dtype == np.float32
    assert ((values >= 0) & (values <= 1)).all()
    one = student.predict_one(frames[1], z0)
    assert one.progress == pytest.approx(float(values[1, 0]), abs=1e-6)
    gray = frames[2].mean(axis=2)  # any layout core.images reads
    assert 0.0 <= student.predict_one(gray, z0).completion <= 1.0
    with pytest.raises(ValueError):
        student.predict(np.zeros((2, 48, 64, 3), np.float32), z0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"task": "open the drawer"},
            r"trained for task 'stack the cups', camera 'front' at 64x48; "
            r"it cannot score task 'open the drawer'",
        ),
        ({"task": TASK, "camera": "wrist"}, r"it cannot score camera 'wrist'"),
        ({"task": TASK, "camera": "front", "source_shape": (480, 640)}, r"this camera sends 640x480 frames"),
    ],
)
def test_a_student_for_another_task_or_camera_is_refused(tmp_path, kwargs, message):
    write_student(tmp_path / "student")
    with pytest.raises(StudentMismatchError, match=message):
        load_student(tmp_path / "student", **kwargs)


def test_task_names_match_loosely():
    assert normalize_task("  Stack the   cups. ") == normalize_task("stack the cups")
    assert normalize_task("stack the cups") != normalize_task("stack the cup")


def test_missing_student_holds_with_a_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="lrm_reward.student.loading")
    assert load_student(tmp_path / "nowhere", TASK) is None
    assert "no student at" in caplog.text and "holding" in caplog.text
    caplog.clear()
    assert load_student("", TASK) is None
    assert "no student configured" in caplog.text
    caplog.clear()
    path = write_student(tmp_path / "student")
    os.remove(path / store.WEIGHTS_FILE)
    assert load_student(path, TASK) is None
    assert "missing model.safetensors" in caplog.text
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_corrupt_or_foreign_files_are_errors(tmp_path):
    path = write_student(tmp_path / "a")
    weights = path / store.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StudentLoadError, match="checksum"):
        load_student(path, TASK)

    path = write_student(tmp_path / "b")
    (path / store.CONFIG_FILE).write_text("{not json")
    with pytest.raises(StudentLoadError, match="cannot read"):
        load_student(path, TASK)
    (path / store.CONFIG_FILE).write_text(json.dumps({"schema": "something/else"}))
    with pytest.raises(StudentLoadError, match="not an lrm student"):
        load_student(path, TASK)

    path = write_student(tmp_path / "c")
    config = json.loads((path / store.CONFIG_FILE).read_text())
    config["arch"]["widths"] = [4, 4]  # weights of another shape
    config["files"] = {}
    (path / store.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(StudentLoadError, match="cannot load"):
        load_student(path, TASK)


def test_student_uses_the_callers_thread_setting(tmp_path):
    write_student(tmp_path / "student")
    before = torch.get_num_threads()
    load_student(tmp_path / "student", TASK)
    assert torch.get_num_threads() == before
