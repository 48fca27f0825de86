"""A refinement run that a test executes in a child process and kills (kill -9) at the worst moment:
after the new version is fully staged, just before it is moved into place.
Usage: python refine_scenarios.py STORE DATASET"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"))
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")

from lrm_reward.refinement import policy_store
from lrm_reward.refinement.refine import RefineConfig, refine


def die_before_commit(self, staging_dir, metadata):
    print("STAGED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    policy_store.PolicyStore.commit = die_before_commit
    refine(
        RefineConfig(
            store_root=Path(sys.argv[1]),
            policy_name="act_pick",
            datasets=[Path(sys.argv[2])],
            steps=2,
            batch_size=4,
            progress_bar=False,
            report=False,
        )
    )
