"""Recorder runs with the process saver that a test kills (kill -9 of the recorder and its saver right after
an episode was sealed). Usage: python saver_scenarios.py SCENARIO DATA_ROOT"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")

from recorder_scenarios import make_recorder
from synthetic_streams import feed_episode


def kill_after_seal(root: Path) -> None:
    rec = make_recorder(root, saver="process")
    rec.start("task 0")
    feed_episode(rec, t_start=0.0, duration_s=1.5)
    assert rec.stop("success").status.value == "saved"
    rec.start("sealed, never saved")
    feed_episode(rec, t_start=100.0, duration_s=1.5)
    saver = rec._saver._proc
    os.kill(saver.pid, signal.SIGSTOP)  # the saver must not get to it before the kill
    result = rec.stop("success", wait=False)
    print(f"SEALED {result.status.value} {result.num_frames}", flush=True)
    os.kill(saver.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    {"kill_after_seal": kill_after_seal}[sys.argv[1]](Path(sys.argv[2]))
