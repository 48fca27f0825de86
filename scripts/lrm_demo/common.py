"""What every stage of the demo shares: settings, run state, output helpers, the paths and the offline env.

Imported first by every other module of the demo: it puts the package source on sys.path and switches the
Hugging Face libraries offline before anything imports them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG_SRC = REPO / "ros2_ws" / "src" / "lrm_reward"
sys.path.insert(0, str(PKG_SRC))  # run the source tree, also when ros2_ws/install is older
for _var, _val in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("WANDB_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
):
    os.environ.setdefault(_var, _val)

import warnings  # noqa: E402

from tqdm import tqdm  # noqa: E402

# lerobot's dataset writer asks `datasets` for progress bars we switched off above: one warning per episode.
warnings.filterwarnings("ignore", message="Cannot enable progress bars")

from lrm_reward.sim.so101_scene import TASK  # noqa: E402, F401 - re-exported for the stages

POLICY_NAME = "act_so101"
ROUND_SEED = 1000  # both rollout rounds see the same layouts: seeds 1000, 1001, ...
DEMO_SEED = 0
TINY_CACHE = REPO / ".cache" / "tiny_lrm"
REWARD_RECIPE = REPO / "config" / "demo_reward_train.yaml"
NODE_START_TIMEOUT_S = 120.0
EPISODE_TIMEOUT_S = 120.0
# The policy reads the joints and the cube/goal positions (what a pose estimator or AprilTag gives a real
# lab), not the camera: a vision policy cannot learn to find the cube in a few CPU minutes. The camera
# stays in the recordings for the reward model and the judge.
POLICY_INPUTS = ("observation.state", "observation.environment_state")
ENV_STATE_TOPIC = "/environment_state"


@dataclass
class DemoSettings:
    """Everything that changes the results; a rerun with other settings starts clean."""

    demos: int
    episodes: int
    max_steps: int
    image_size: int
    camera_view: str
    expert_action_sigma: float
    expert_grasp_offset_m: float
    reward_episodes: int
    reward_steps: int  # 0: the recipe's (config/demo_reward_train.yaml)
    judge_threshold: float
    judge_progress_success: float | None  # lrm-judge --progress-success-threshold; None: off
    policy_steps: int
    refine_steps: int
    batch_size: int
    policy_lr: float
    refine_lr: float
    refine_schedule: str  # lrm-refine --lr-schedule
    interval_frames: int
    rounds: int
    selection: str
    lrm_weights: str
    device: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoSettings:
        quick = args.quick
        return cls(
            demos=args.demos or (5 if quick else 30),
            episodes=args.episodes or (3 if quick else 20),
            max_steps=args.max_steps or (50 if quick else 100),
            image_size=args.image_size or (96 if quick else 128),
            camera_view=args.camera_view,
            expert_action_sigma=args.action_sigma,
            expert_grasp_offset_m=args.grasp_offset,
            reward_episodes=args.reward_episodes or (9 if quick else 180),
            reward_steps=args.reward_steps or (8 if quick else 0),
            judge_threshold=args.judge_threshold,
            judge_progress_success=args.judge_progress_success if args.judge_progress_success > 0 else None,
            policy_steps=args.policy_steps or (10 if quick else 2000),
            refine_steps=args.refine_steps or (10 if quick else 800),
            batch_size=8 if quick else 32,
            policy_lr=args.policy_lr,
            refine_lr=args.refine_lr,
            refine_schedule=args.refine_schedule,
            interval_frames=args.interval_frames,
            rounds=args.rounds,
            selection=args.selection,
            lrm_weights=str(Path(args.lrm_weights).resolve()) if args.lrm_weights else "",
            device=args.device,
        )

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class DemoError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- state
class RunState:
    """out/state.json: settings key, finished stages and their results. Written atomically."""

    def __init__(self, out: Path, settings: DemoSettings, restart: bool) -> None:
        self.path = out / "state.json"
        self.out = out
        old = json.loads(self.path.read_text()) if self.path.is_file() else None
        self.resumed = bool(old and old.get("key") == settings.key() and not restart)
        if not self.resumed and out.exists():
            for child in out.iterdir():  # start clean, but never follow a link out of the folder
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.data = old if self.resumed else {"key": settings.key(), "settings": asdict(settings), "done": {}}
        self._write()

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def result(self, stage: str) -> dict:
        return self.data["done"][stage]

    def finish(self, stage: str, result: dict) -> None:
        self.data["done"][stage] = result
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def say(message: str) -> None:
    tqdm.write(f"[demo] {message}")


def fresh_dir(path: Path) -> Path:
    """An interrupted stage starts over: remove what it left."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path
