"""lrm-distill end to end: a night recorded by the recorder, judged by a teacher (a stand-in with a known
answer, and the tiny Qwen3-VL reward model), distilled into a versioned student that tracks the teacher on
held-out episodes; the teacher's split, the label rows, and clear errors for bad requests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from students import OTHER_TASK, TASK

from lrm_reward.student import store
from lrm_reward.student.dataset import LabeledEpisode, SampleConfig, episode_rows, split_episodes
from lrm_reward.student.loading import StudentMismatchError, load_student
from lrm_reward.student.model import StudentArch
from lrm_reward.student.train import DistillConfig, distill, main

SMALL = ["--image-size", "32", "--widths", "8,16,32", "--batch-size", "32", "--threads", "1", "--quiet"]


def test_cli_writes_a_versioned_student_that_tracks_the_teacher(night, tmp_path, capsys):
    adapters = tmp_path / "adapters"
    argv = [str(night), "--adapters", str(adapters), "--task", TASK, "--steps", "300", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"student v0001 -> {adapters / 'student' / 'v0001'}" in out
    assert "progress MAD" in out and "VOC" in out
    version = adapters / "student" / "v0001"
    assert (version / store.WEIGHTS_FILE).is_file()
    config = json.loads((version / store.CONFIG_FILE).read_text())
    assert config["task"] == TASK
    assert config["camera"] == {"name": "front", "source_shape": [48, 64]}
    assert config["arch"]["image_size"] == 32 and config["arch"]["widths"] == [8, 16, 32]
    assert config["teacher"]["model_ids"] == ["brightness-test-engine"]
    assert config["teacher"]["curve_every_k"] == [3]
    data = config["data"]
    assert data["datasets"] == [str(night.resolve())]
    assert data["skipped"] == {"another task": 1}
    assert len(data["train_episodes"]) + len(data["held_out_episodes"]) == 8
    assert not set(data["train_episodes"]) & set(data["held_out_episodes"])
    assert data["split"].startswith("seeded")
    assert data["rows"]["progress exact"] > 0 and data["rows"]["progress interpolated"] > 0
    assert config["training"]["steps"] == 300 and np.isfinite(config["training"]["final_loss"])
    val = config["validation"]
    assert val["episodes"] == 2 and val["progress_labels"] > 0 and val["completion_labels"] > 0
    assert val["progress_mad"] < 0.1  # the teacher's progress is brightness / 200: easy to learn
    assert val["completion_agreement"] >= 0.8
    assert val["voc"] > 0.8

    student = load_student(adapters, TASK, camera="front", source_shape=(48, 64))
    assert student is not None and student.version == "v0001"
    with pytest.raises(StudentMismatchError, match="trained for task 'stack the cups'"):
        load_student(adapters, OTHER_TASK)
    # the student follows brightness as the teacher does
    dark, bright = (np.full((48, 64, 3), level, np.uint8) for level in (20, 220))
    z0 = student.embed(dark)
    assert student.predict_one(bright, z0).progress > student.predict_one(dark, z0).progress + 0.5

    assert main([*argv[: -len(SMALL)], "--steps", "5", *SMALL]) == 0  # a second run: a new version
    assert [p.name for p in store.versions(adapters / "student")] == ["v0001", "v0002"]


def test_the_teachers_held_out_episodes_validate(night, tmp_path):
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    split = {"datasets": [{"root": str(night)}], "train": ["0:0", "0:2"], "held_out": ["0:1", "0:3"]}
    (adapters / "split.json").write_text(json.dumps(split))
    cfg = DistillConfig(
        datasets=[night],
        adapters=adapters,
        task=TASK,
        arch=StudentArch(image_size=32, widths=(8, 16)),
        steps=5,
        batch_size=16,
    )
    result = distill(cfg, progress_bar=False)
    assert result.config["data"]["held_out_episodes"] == ["0:1", "0:3"]
    assert result.config["data"]["split"].startswith("teacher split")
    assert result.metrics["episodes"] == 2


def test_bad_requests_get_a_clear_message(night, tmp_path, capsys):
    adapters = ["--adapters", str(tmp_path / "adapters"), "--steps", "2", *SMALL]
    assert main([str(night), *adapters]) == 1
    assert "several tasks, one student is per task: give --task" in capsys.readouterr().err
    assert main([str(night), "--task", TASK, "--camera", "wrist", *adapters]) == 1
    assert "judge again with `lrm-judge --camera wrist`" in capsys.readouterr().err
    assert main([str(night), "--task", "fold the towel", *adapters]) == 1
    assert "no judged episode of task 'fold the towel'" in capsys.readouterr().err
    unjudged = night.parent / "unjudged"
    (night / "judgments").rename(unjudged)
    assert main([str(night), *adapters]) == 1
    assert "has no judgments: run `lrm-judge" in capsys.readouterr().err
    assert main([str(tmp_path / "missing"), *adapters]) == 1
    assert "no LeRobotDataset" in capsys.readouterr().err
    assert main([str(night), "--task", TASK, "--data-root", str(tmp_path / "elsewhere"), *adapters]) == 1
    assert "not inside the data root" in capsys.readouterr().err
    assert main([str(night), "--adapters", "a", "--steps", "0"]) == 2
    assert main([str(night), "--adapters", "a", "--image-size", "8"]) == 2
    assert not (tmp_path / "adapters" / "student").exists() or not store.versions(
        tmp_path / "adapters" / "student"
    )


def episode(progress: dict, completion: dict, n: int = 10, verdict: str = "success", index: int = 0):
    return LabeledEpisode(
        Path("d"), 0, index, TASK, "observation.images.front", n, progress, completion, verdict, "teacher"
    )


def test_label_rows_interpolate_and_derive_completion_negatives():
    ep = episode({0: 0.0, 4: 0.4, 8: 0.8}, {8: 0.9, 9: 0.95})
    rows = episode_rows(ep, SampleConfig(interpolated_weight=0.5, completion_negatives_below=0.25))
    assert sorted(rows) == list(range(10))
    assert rows[2] == pytest.approx([0.2, 0.5, 0.0, 0.0])  # interpolated progress, lower weight
    assert rows[4] == pytest.approx([0.4, 1.0, 0.0, 0.0])  # exact; 0.4 is above the negatives' bound
    assert rows[0] == pytest.approx([0.0, 1.0, 0.0, 1.0])  # barely started: not done
    assert rows[8] == pytest.approx([0.8, 1.0, 0.9, 1.0])
    assert rows[9] == pytest.approx([0.0, 0.0, 0.95, 1.0])  # completion only
    exact = episode_rows(ep, SampleConfig(interpolate=False, completion_negatives_below=None))
    assert sorted(exact) == [0, 4, 8, 9] and exact[0] == pytest.approx([0.0, 1.0, 0.0, 0.0])
    thinned = episode_rows(ep, SampleConfig(), stride=2)
    assert sorted(thinned) == [0, 2, 4, 6, 8, 9]


def test_seeded_split_is_stratified_by_verdict():
    eps = [episode({0: 0.0}, {}, verdict="success" if i < 6 else "failure", index=i) for i in range(9)]
    train, held, how = split_episodes(eps, 0.2, seed=3)
    assert how.startswith("seeded")
    assert sum(e.success for e in held) == 1 and sum(not e.success for e in held) == 1
    assert len(train) + len(held) == 9
    again = split_episodes(eps, 0.2, seed=3)[1]
    assert [e.key for e in again] == [e.key for e in held]
    train, held, how = split_episodes(eps[:1], 0.2, seed=3)
    assert held == [] and len(train) == 1  # one episode: nothing to hold out


def test_tiny_reward_model_as_teacher(night, tiny_lrm, tmp_path, capsys):
    """The real (tiny) Qwen3-VL + LRM adapters judge the night; the student distills their answers."""
    from lrm_reward.refinement.judge import load_judgments
    from lrm_reward.refinement.judge_cli import main as judge

    adapters = ",".join(f"{name}={path}" for name, path in tiny_lrm.adapters.items() if name != "contrastive")
    argv = [str(night), "--model", str(tiny_lrm.base), "--adapters", adapters, "--every-k", "4", "--force"]
    assert judge([*argv, "--episodes", "0,1,2,3", "--quiet"]) == 0
    for index in range(4, 9):  # the other episodes keep the stand-in's judgments: drop them
        (night / "judgments" / f"episode_{index:06d}.json").unlink()
    model_id = load_judgments(night)[0].model_id
    out_dir = tmp_path / "adapters"
    assert main([str(night), "--adapters", str(out_dir), "--steps", "20", *SMALL]) == 0
    config = json.loads((out_dir / "student" / "v0001" / store.CONFIG_FILE).read_text())
    assert config["teacher"]["model_ids"] == [model_id]
    assert config["teacher"]["curve_every_k"] == [4]
    assert len(config["data"]["train_episodes"]) + len(config["data"]["held_out_episodes"]) == 4
    assert config["validation"]["episodes"] >= 1
    assert 0.0 <= config["validation"]["progress_mad"] <= 1.0
