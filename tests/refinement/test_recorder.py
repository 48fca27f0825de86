"""EpisodeRecorder: synthetic streams in, a LeRobotDataset v3 that stock lerobot loads out; faults."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from recorder_scenarios import make_recorder
from synthetic_streams import ACTION_NAMES, STATE_NAMES, action_for, feed_episode, state_for

from lrm_reward.refinement.recorder import (
    EpisodeRecorder,
    RecorderBusyError,
    RecorderConfig,
    SaveStatus,
    plan_resampling,
)

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE / "recorder_scenarios.py"


def load(root: Path, name: str = "run"):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset(f"lrm/{name}", root=root / name, video_backend="pyav")


def file_digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file() and p.parts[len(folder.parts)] in ("data", "videos")
    }


# ------------------------------------------------------------------ resampling (pure)
def test_resampling_takes_latest_sample_at_or_before_each_frame():
    cam = np.array([0.0, 0.07, 0.13, 0.2, 0.27, 0.33])
    state = np.arange(0.0, 0.35, 0.01)
    plan = plan_resampling({"cam": cam, "state": state}, {"reward": np.array([0.15])}, fps=10, max_gap_s=0.5)
    assert plan.num_frames == 4  # 0.0, 0.1, 0.2, 0.3
    assert list(cam[plan.indices["cam"]]) == [0.0, 0.07, 0.2, 0.27]
    np.testing.assert_allclose(state[plan.indices["state"]], [0.0, 0.1, 0.2, 0.3])
    assert list(plan.indices["reward"]) == [-1, -1, 0, 0]
    assert not plan.gaps


def test_resampling_starts_when_every_required_stream_has_data_and_truncates_at_a_dropout():
    cam = np.concatenate([np.arange(0.5, 2.0, 0.05), np.arange(3.0, 4.0, 0.05)])  # silent 2.0..3.0
    state = np.arange(0.0, 4.0, 0.02)
    plan = plan_resampling({"cam": cam, "state": state}, {}, fps=10, max_gap_s=0.3)
    assert plan.t0 == pytest.approx(0.5)
    assert plan.gaps and plan.gaps[0]["stream"] == "cam"
    # frames at 0.5 .. 2.2 have a fresh camera sample (latest 1.95, stale <= 0.3 s up to t=2.2)
    assert plan.num_frames == 18
    assert plan.truncated_from == 35
    held = plan_resampling({"cam": cam, "state": state}, {}, fps=10, max_gap_s=0.3, on_gap="hold")
    assert held.num_frames == 35 and held.gaps


def test_resampling_reports_missing_streams():
    plan = plan_resampling({"cam": np.array([]), "state": np.array([0.0])}, {}, fps=10, max_gap_s=0.5)
    assert plan.num_frames == 0 and plan.missing == ["cam"]


# ------------------------------------------------------------------ recording into LeRobotDataset
def test_without_rewards_the_dataset_has_no_reward_features(tmp_path):
    rec = make_recorder(tmp_path, rewards=False)
    rec.start("put the giraffe in the bowl")
    feed_episode(rec, t_start=1000.0, duration_s=1.0)
    result = rec.stop("unknown")
    assert result.status is SaveStatus.SAVED, result.message
    rec.close()
    ds = load(tmp_path)
    assert ds.num_episodes == 1
    assert not [key for key in ds.features if key.startswith("reward.")]


def test_two_episodes_load_with_stock_lerobot_and_carry_rewards_and_sidecars(tmp_path):
    rec = make_recorder(tmp_path)
    for i in range(2):
        started = rec.start(f"put the giraffe in the bowl {i}", notes="day shift", policy_version="act/v0001")
        assert started.episode_index == i
        feed_episode(rec, t_start=1000.0 + 100 * i, duration_s=2.0)
        result = rec.stop("success" if i == 0 else "unknown", notes="ok")
        assert result.status is SaveStatus.SAVED, result.message
        assert not result.partial
    rec.close()

    ds = load(tmp_path)
    assert ds.num_episodes == 2
    assert ds.fps == 10
    ep_len = ds.meta.episodes[0]["length"]
    # camera 15 Hz, state 50 Hz, action 20 Hz over 2 s: the last camera frame is at ~1.933 s -> 20 frames
    assert ep_len == 20 and len(ds) == 40
    for key in ("observation.images.front", "observation.state", "action", "reward.progress"):
        assert key in ds.features
    assert ds.features["observation.state"]["names"] == list(STATE_NAMES)
    item = ds[7]  # frame 7 of episode 0: t = 0.7 s
    np.testing.assert_allclose(item["observation.state"].numpy(), state_for(0.7), atol=1e-5)
    # actions at 20 Hz: latest at or before 0.7 s is 0.7 (or 0.65 with float rounding)
    assert item["action"].numpy()[0] == pytest.approx(action_for(0.7)[0], abs=0.051)
    # the image is the latest camera frame at or before 0.7 s (15 Hz: 0.6667 s), brightness ~ 20 + 40 t
    brightness = float(item["observation.images.front"].mean()) * 255
    assert brightness == pytest.approx(20 + 40 * (2 / 3), abs=4)
    # rewards at 5 Hz, present from frame 0 (first reward at t=0)
    assert float(item["reward.progress"]) == pytest.approx(0.6 / 2.0, abs=1e-5)
    assert ds[20]["task"] == "put the giraffe in the bowl 1"

    sidecar = json.loads((tmp_path / "run" / "recording" / "episode_000000.json").read_text())
    assert sidecar["task"] == "put the giraffe in the bowl 0"
    assert sidecar["policy_version"] == "act/v0001"
    assert sidecar["outcome"] == "success"
    assert sidecar["notes"] == "day shift\nok"
    assert sidecar["num_frames"] == 20 and sidecar["partial"] is False
    assert sidecar["recorder_version"].startswith("lrm-recorder/")
    assert sidecar["received"]["camera:front"] == 30
    assert not (tmp_path / ".spool" / "run").exists() or not any((tmp_path / ".spool" / "run").iterdir())


def test_reopening_appends_without_touching_earlier_files(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("first")
    feed_episode(rec, 0.0, 1.0)
    assert rec.stop().status is SaveStatus.SAVED
    rec.close()
    before = file_digests(tmp_path / "run")

    rec = make_recorder(tmp_path)  # a new process would do exactly this
    assert rec.start("second").episode_index == 1
    feed_episode(rec, 50.0, 1.0)
    assert rec.stop().status is SaveStatus.SAVED
    rec.close()
    after = file_digests(tmp_path / "run")
    assert {k: after[k] for k in before} == before  # earlier data/video files byte-identical
    assert len(after) > len(before)
    ds = load(tmp_path)
    assert ds.num_episodes == 2 and ds[len(ds) - 1]["task"] == "second"


def test_one_dataset_per_day_by_default(tmp_path):
    rec = EpisodeRecorder(
        RecorderConfig(data_root=tmp_path, cameras=("front",), fps=10, image_writer_threads=0)
    )
    started = rec.start("daily")
    assert started.dataset.name.startswith("rec_20") and len(started.dataset.name) == len("rec_2000-01-01")
    rec.abort()


def test_nan_joint_states_are_counted_and_dropped(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("nan states")
    counts = feed_episode(rec, 0.0, 2.0, nan_state_every=3)
    result = rec.stop()
    assert result.status is SaveStatus.SAVED
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["dropped"]["nan_states"] == counts["nan_state"] > 0
    ds = load(tmp_path)
    states = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert np.all(np.isfinite(states))


def test_mismatched_action_dimension_is_a_clear_error(tmp_path):
    rec = make_recorder(tmp_path, action_names=ACTION_NAMES)
    rec.start("bad actions")
    with pytest.raises(ValueError, match="action has 3 values, this recording expects 4"):
        rec.add_action(0.0, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="lacks"):
        rec.add_action(0.0, [1.0, 2.0, 3.0, 4.0], names=["a", "b", "c", "d"])
    feed_episode(rec, 0.0, 1.0)
    result = rec.stop()
    assert result.status is SaveStatus.SAVED
    assert json.loads(result.sidecar.read_text())["dropped"]["bad_actions"] == 2


def test_actions_are_reordered_by_joint_name(tmp_path):
    rec = make_recorder(tmp_path, action_names=ACTION_NAMES)
    rec.start("reordered")
    assert rec.add_action(0.0, [4.0, 3.0, 2.0, 1.0], names=list(reversed(ACTION_NAMES)))
    _stamps, values = rec._episode.action.arrays(4)
    np.testing.assert_allclose(values[0], [1.0, 2.0, 3.0, 4.0])
    rec.abort()


def test_bad_images_are_rejected(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("bad images")
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        rec.add_image("front", 0.0, np.zeros((48, 64), np.uint8))
    with pytest.raises(ValueError, match="unknown camera"):
        rec.add_image("rear", 0.0, np.zeros((48, 64, 3), np.uint8))
    rec.add_image("front", 0.0, np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="frame size changed"):
        rec.add_image("front", 0.1, np.zeros((24, 32, 3), np.uint8))
    rec.abort()


def test_episode_without_frames_saves_nothing(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("nothing")
    rec.add_state(0.0, [0.0, 0.0, 0.0])
    result = rec.stop()
    assert result.status is SaveStatus.EMPTY
    assert "camera:front" in result.message and "nothing saved" in result.message
    assert not (tmp_path / "run").exists()
    assert rec.stop().status is SaveStatus.NOT_RECORDING


def test_discard_writes_nothing(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("discard me")
    feed_episode(rec, 0.0, 1.0)
    assert rec.stop("discard").status is SaveStatus.DISCARDED
    assert not (tmp_path / "run").exists()


def test_camera_dropping_out_marks_the_episode_partial(tmp_path):
    rec = make_recorder(tmp_path, cameras=("front", "wrist"), max_gap_s=0.3)
    rec.start("camera drops")
    feed_episode(rec, 0.0, 3.0, cameras=("front", "wrist"), camera_stops_at={"wrist": 1.0})
    result = rec.stop()
    assert result.status is SaveStatus.SAVED and result.partial
    assert "PARTIAL" in result.message
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["partial"] is True
    assert sidecar["dropouts"][0]["stream"] == "camera:wrist"
    assert sidecar["truncated_from_frames"] == 30
    assert result.num_frames == sidecar["num_frames"] < 30
    assert load(tmp_path).num_episodes == 1


def test_second_recorder_on_the_same_dataset_is_refused(tmp_path):
    first = make_recorder(tmp_path)
    first.start("holder")
    second = make_recorder(tmp_path)
    with pytest.raises(RecorderBusyError, match="another recorder"):
        second.start("intruder")
    with pytest.raises(RecorderBusyError):
        first.start("again")
    first.abort()


def test_dataset_with_other_features_is_refused_and_left_intact(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("three joints")
    feed_episode(rec, 0.0, 1.0)
    rec.stop()
    rec.close()
    other = make_recorder(tmp_path, state_names=("a", "b", "c"))
    other.start("other joints")
    feed_episode(other, 0.0, 1.0, state_names=None)
    result = other.stop()
    assert result.status is SaveStatus.FAILED and "new dataset" in result.message
    assert load(tmp_path).num_episodes == 1


# ------------------------------------------------------------------ crashes and full disks
def _run_scenario(name: str, root: Path, wait_for: str | None = None, timeout: float = 120.0):
    proc = subprocess.Popen(
        [sys.executable, str(SCENARIOS), name, str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if wait_for is None:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    for line in proc.stdout:
        if line.strip() == wait_for:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    return proc.returncode, "", ""


def _assert_recovers_to_two_episodes(root: Path):
    rec = make_recorder(root)
    started = rec.start("after the crash")
    assert started.episode_index == 2
    feed_episode(rec, 900.0, 1.0)
    assert rec.stop().status is SaveStatus.SAVED
    ds = load(root)
    assert ds.num_episodes == 3
    assert [ds.meta.episodes[i]["tasks"][0] for i in range(3)] == ["task 0", "task 1", "after the crash"]


def test_kill_9_mid_episode_keeps_earlier_episodes(tmp_path):
    rc, _, _ = _run_scenario("kill_mid_episode", tmp_path, wait_for="RECORDING")
    assert rc == -signal.SIGKILL
    assert load(tmp_path).num_episodes == 2  # nothing of the killed episode reached the dataset
    _assert_recovers_to_two_episodes(tmp_path)


def test_kill_9_mid_save_is_rolled_back(tmp_path):
    rc, _out, err = _run_scenario("kill_mid_save", tmp_path)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert (tmp_path / ".run.journal" / "journal.json").exists()  # died inside the append
    started = make_recorder(tmp_path).start("probe")  # start() recovers
    assert started.recovered and "rolled back" in started.recovered
    assert started.episode_index == 2
    assert load(tmp_path).num_episodes == 2


def test_kill_9_mid_save_then_recovered_dataset_accepts_new_episodes(tmp_path):
    _run_scenario("kill_mid_save", tmp_path)
    _assert_recovers_to_two_episodes(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root for a tmpfs")
def test_disk_full_stops_with_a_clear_error_and_keeps_earlier_episodes(tmp_path):
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    script = (
        f"mount -t tmpfs -o size=1500k lrm_test_tmpfs {mnt} && "
        f"{sys.executable} {SCENARIOS} disk_full {mnt / 'data'}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=300
    )
    if "mount" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip("cannot mount a tmpfs here")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["spool"]["status"] == "storage_error"
    assert "No space left" in result["spool"]["message"]
    assert 0 < result["spool"]["accepted"] < 400
    assert result["save"]["status"] == "storage_error"
    assert "disk full" in result["save"]["message"] and "intact" in result["save"]["message"]
    assert result["after"] == {"episodes": 1, "frames": 15, "task": "task 0"}


def test_video_codec_is_configurable(tmp_path):
    rec = make_recorder(tmp_path, video_codec="h264")
    rec.start("h264")
    feed_episode(rec, 0.0, 1.0)
    assert rec.stop().status is SaveStatus.SAVED
    ds = load(tmp_path)
    assert ds.meta.features["observation.images.front"]["info"]["video.codec"] in ("h264", "avc1")
    assert ds[3]["observation.images.front"].shape == (3, 48, 64)
