"""EpisodeRecorder with saver="process": episodes are sealed on disk and saved by a child process, the next
episode may record meanwhile, and an episode sealed by a killed recorder is saved by the next one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from recorder_scenarios import make_recorder
from synthetic_streams import feed_episode

from lrm_reward.refinement.recorder import RecorderConfig, SaveStatus

HERE = Path(__file__).resolve().parent


def load(root: Path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    return LeRobotDataset("lrm/run", root=root / "run", video_backend="pyav")


def test_background_saves_overlap_the_next_episode_and_all_load(tmp_path):
    rec = make_recorder(tmp_path, saver="process")
    saved = []
    rec.on_saved = saved.append
    try:
        indices = []
        for i in range(3):
            started = rec.start(f"task {i}")
            indices.append(started.episode_index)
            feed_episode(rec, t_start=100.0 * i, duration_s=1.5)
            result = rec.stop("success", wait=False)
            assert result.status is SaveStatus.SAVING, result.message
            assert result.num_frames == 15 and result.episode_index == i
        assert indices == [0, 1, 2]  # numbered ahead of the saves still in flight
    finally:
        rec.close(save_timeout_s=300)
    assert sorted(r.episode_index for r in saved) == [0, 1, 2]
    assert all(r.status is SaveStatus.SAVED for r in saved), [r.message for r in saved]
    assert rec.totals["episodes_saved"] == 3 and rec.saves_pending == 0
    ds = load(tmp_path)
    assert ds.num_episodes == 3 and len(ds) == 45
    assert [ds.meta.episodes[i]["tasks"][0] for i in range(3)] == ["task 0", "task 1", "task 2"]
    sidecar = json.loads((tmp_path / "run" / "recording" / "episode_000002.json").read_text())
    assert sidecar["received"]["camera:front"] == 23 and sidecar["spool_id"].startswith("ep_")
    assert not any((tmp_path / ".spool" / "run").iterdir())  # spools removed once saved


def test_numbering_continues_an_existing_dataset_while_saving(tmp_path):
    first = make_recorder(tmp_path)  # inline: two episodes already on disk
    for i in range(2):
        first.start(f"old {i}")
        feed_episode(first, t_start=10.0 * i, duration_s=1.0)
        assert first.stop().status is SaveStatus.SAVED
    first.close()
    rec = make_recorder(tmp_path, saver="process")
    try:
        for expected in (2, 3):
            assert rec.start(f"new {expected}").episode_index == expected
            feed_episode(rec, t_start=100.0 * expected, duration_s=1.0)
            assert rec.stop(wait=False).episode_index == expected
    finally:
        rec.close(save_timeout_s=300)
    ds = load(tmp_path)
    assert [ds.meta.episodes[i]["tasks"][0] for i in range(4)] == ["old 0", "old 1", "new 2", "new 3"]


def test_waiting_stop_reports_the_saved_episode(tmp_path):
    rec = make_recorder(tmp_path, saver="process")
    try:
        rec.start("waited for")
        feed_episode(rec, t_start=0.0, duration_s=1.0)
        result = rec.stop("success")
        assert result.status is SaveStatus.SAVED and result.num_frames == 10
        assert result.sidecar is not None and result.sidecar.exists()
        rec.start("empty")
        assert rec.stop().status is SaveStatus.EMPTY
    finally:
        rec.close()
    assert load(tmp_path).num_episodes == 1


def test_episode_sealed_by_a_killed_recorder_is_saved_by_the_next_start(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(HERE / "saver_scenarios.py"), "kill_after_seal", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "SEALED saving 15" in proc.stdout
    assert load(tmp_path).num_episodes == 1  # the sealed episode is not in the dataset yet

    rec = make_recorder(tmp_path, saver="process")
    try:
        started = rec.start("after the crash")
        assert started.recovered and "sealed before a restart" in started.recovered
        assert started.episode_index == 2  # the recovered episode is saved first, as episode 1
        feed_episode(rec, t_start=900.0, duration_s=1.0)
        assert rec.stop().status is SaveStatus.SAVED
    finally:
        rec.close()
    ds = load(tmp_path)
    assert ds.num_episodes == 3
    assert [ds.meta.episodes[i]["tasks"][0] for i in range(3)] == [
        "task 0",
        "sealed, never saved",
        "after the crash",
    ]


def test_process_saver_needs_a_disk_spool(tmp_path):
    with pytest.raises(ValueError, match="spool_to_disk"):
        RecorderConfig(data_root=tmp_path, saver="process", spool_to_disk=False)


def test_saving_the_same_sealed_episode_twice_appends_it_once(tmp_path):
    """A saver left over from a killed recorder and the next recorder's saver may both get one spool."""
    from lrm_reward.refinement.episode_saver import save_job
    from lrm_reward.refinement.recorder import EpisodeOutcome

    rec = make_recorder(tmp_path)
    rec.start("only once")
    feed_episode(rec, t_start=0.0, duration_s=1.0)
    episode, rec._episode = rec._episode, None
    job = rec._seal(episode, EpisodeOutcome.SUCCESS, "")
    first, second = save_job(job), save_job(job)
    assert first["status"] == second["status"] == "saved", (first, second)
    assert "already saved" in second["message"] and second["episode_index"] == 0
    rec.close()
    assert load(tmp_path).num_episodes == 1
