"""Recorder runs that a test executes in a child process, so it can be killed (kill -9) or given a full
disk (a tiny tmpfs in a private mount namespace). Usage: python recorder_scenarios.py SCENARIO DATA_ROOT"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")

import numpy as np
from synthetic_streams import ACTION_NAMES, IMAGE_SHAPE, STATE_NAMES, feed_episode

from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig


def make_recorder(root: Path, **overrides) -> EpisodeRecorder:
    cfg = dict(data_root=root, cameras=("front",), fps=10, dataset_name="run", image_writer_threads=0)
    cfg.update(overrides)
    return EpisodeRecorder(RecorderConfig(**cfg))


def record_complete(rec: EpisodeRecorder, n: int) -> None:
    for i in range(n):
        rec.start(f"task {i}")
        feed_episode(rec, t_start=100.0 * i, duration_s=1.5)
        result = rec.stop("success")
        assert result.status.value == "saved", result.message


def kill_mid_episode(root: Path) -> None:
    rec = make_recorder(root)
    record_complete(rec, 2)
    rec.start("killed while recording")
    feed_episode(rec, t_start=500.0, duration_s=1.0)
    print("RECORDING", flush=True)
    signal.pause()  # the test kills us here


def kill_mid_save(root: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rec = make_recorder(root)
    record_complete(rec, 2)
    original = LeRobotDataset.finalize

    def finalize_then_die(self):
        # After save_episode(): info.json already counts the new episode, the episode index is not
        # written yet. The worst moment to die.
        os.kill(os.getpid(), signal.SIGKILL)
        original(self)

    LeRobotDataset.finalize = finalize_then_die
    rec.start("killed while saving")
    feed_episode(rec, t_start=500.0, duration_s=1.0)
    rec.stop("success")


def disk_full(root: Path) -> None:
    """Runs on a ~1.5 MB tmpfs: one small episode fits, a noisy one does not (spool, then save)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = {}
    rec = make_recorder(root, use_videos=False)
    record_complete(rec, 1)
    # 1) the raw spool fills the disk while recording
    rec.start("fills the disk while recording")
    rng = np.random.default_rng(0)
    accepted = 0
    for k in range(400):
        accepted += rec.add_image("front", 10.0 + k * 0.05, rng.integers(0, 255, IMAGE_SHAPE, dtype=np.uint8))
    res = rec.stop("success")
    out["spool"] = {"status": res.status.value, "message": res.message, "accepted": int(accepted)}
    rec.close()
    # 2) saving fills the disk (frames kept in RAM, PNG of noise does not compress)
    rec2 = make_recorder(root, use_videos=False, spool_to_disk=False)
    rec2.start("fills the disk while saving")
    for k in range(150):
        t = 20.0 + k * 0.1
        rec2.add_image("front", t, rng.integers(0, 255, IMAGE_SHAPE, dtype=np.uint8))
        rec2.add_state(t, [t, t, t], names=STATE_NAMES)
        rec2.add_action(t, [t, 1.0, 2.0, 3.0], names=ACTION_NAMES)
    res = rec2.stop("success")
    out["save"] = {"status": res.status.value, "message": res.message}
    ds = LeRobotDataset("lrm/run", root=root / "run", video_backend="pyav")
    out["after"] = {"episodes": ds.num_episodes, "frames": len(ds), "task": ds[0]["task"]}
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    {"kill_mid_episode": kill_mid_episode, "kill_mid_save": kill_mid_save, "disk_full": disk_full}[
        sys.argv[1]
    ](Path(sys.argv[2]))
