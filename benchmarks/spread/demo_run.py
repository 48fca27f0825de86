"""What policy_spread takes from a finished demo run (scripts/demo.py's output folder), and the demo's
training recipe applied to other seeds.

A demo run leaves state.json: its settings (steps, learning rates, batch size, camera, judge threshold)
and per finished stage what it made: the demonstrations (done["demos"]), the reward model
(done["reward"]: base + adapters), the first round's recorded rollouts with the simulator's outcome of
every episode (done["rollout1"]) and lrm-judge's verdicts on them (done["judge1"], also in the dataset's
judgments/ folder, which is what refinement reads).

What it is not: a way to run the demo (scripts/demo.py) or to change its recipe; every setting here is
the demo's unless a policy_spread flag overrides it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(REPO / "scripts"))

from lrm_demo.common import POLICY_INPUTS, POLICY_NAME  # noqa: E402 - sets the offline env first
from lrm_demo.policy import act_overrides  # noqa: E402


class DemoRun:
    """A finished demo run: the demonstrations, the reward model, rollout1 with judgments and ground truth.

    needs: the stages this benchmark mode reads; a run that has not finished them is refused.
    """

    def __init__(self, out: Path, needs: tuple[str, ...]) -> None:
        out = Path(out)
        state_file = out / "state.json"
        if not state_file.is_file():
            raise SystemExit(f"{out}: no state.json (not a demo output folder)")
        state = json.loads(state_file.read_text())
        done = state["done"]
        missing = [s for s in needs if s not in done]
        if missing:
            raise SystemExit(f"{out}: the demo run has not finished {missing}")
        self.out = out
        self.settings_dict = dict(state["settings"])
        # Attribute access as the demo's own stage functions expect (lrm_demo.judging.judge reads
        # .device and .judge_threshold); a namespace keeps working when the demo adds settings.
        self.settings = SimpleNamespace(**self.settings_dict)
        self.demos = Path(done["demos"]["root"])
        self.reward = done.get("reward")
        self.rollout: Path | None = None
        self.truth: dict[int, bool] = {}
        self.layouts: list[int] = []
        self.judged: dict[int, bool] = {}
        if not (self.demos / "meta" / "info.json").is_file():
            raise SystemExit(f"{self.demos}: no LeRobotDataset (meta/info.json missing)")
        if "rollout1" in done:
            self._read_rollout1(done)

    def _read_rollout1(self, done: dict) -> None:
        self.rollout = Path(done["rollout1"]["dataset"])
        if not (self.rollout / "meta" / "info.json").is_file():
            raise SystemExit(f"{self.rollout}: no LeRobotDataset (meta/info.json missing)")
        # The simulator's outcome of every rollout1 episode, as the demo kept it.
        self.truth = {int(ep["episode_index"]): bool(ep["success"]) for ep in done["rollout1"]["episodes"]}
        # The layouts (scene seeds) rollout1 ran on: an arm that trains on rollout1 has seen them.
        self.layouts = sorted(int(ep["seed"]) for ep in done["rollout1"]["episodes"])
        total = int(json.loads((self.rollout / "meta" / "info.json").read_text())["total_episodes"])
        if sorted(self.truth) != list(range(total)):
            raise SystemExit(f"{self.rollout}: {total} episodes, ground truth for {sorted(self.truth)}")
        rows = done.get("judge1", {}).get("rows", [])
        self.judged = {int(r["episode_index"]): bool(r["judged_success"]) for r in rows}
        self._check_sidecars()

    def _check_sidecars(self) -> None:
        """The recorder's sidecars carry the same ground truth in their notes: they must agree."""
        for e, ok in self.truth.items():
            sidecar = self.rollout / "recording" / f"episode_{e:06d}.json"
            if not sidecar.is_file():
                continue
            notes = json.loads(sidecar.read_text()).get("notes", "")
            said = "ground truth: success" in notes, "ground truth: failure" in notes
            if any(said) and said[0] != ok:
                raise SystemExit(f"{sidecar}: notes say {notes!r}, state.json says success={ok}")

    def judge_matrix(self) -> dict[str, int]:
        """lrm-judge's verdicts on rollout1 against the simulator's: tp, fp, fn, tn."""
        m = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        for e, said in self.judged.items():
            m[("t" if said == self.truth[e] else "f") + ("p" if said else "n")] += 1
        return m


@dataclass
class Recipe:
    """The demo's policy training: a base from scratch on the demonstrations, refinements of it."""

    base_steps: int
    base_lr: float
    refine_steps: int
    refine_lr: float
    refine_schedule: str  # lrm-refine --lr-schedule
    batch_size: int
    max_steps: int  # steps per evaluation episode

    @classmethod
    def of(cls, run: DemoRun, args) -> Recipe:
        s = run.settings
        return cls(
            base_steps=args.steps or s.policy_steps,
            base_lr=args.lr or s.policy_lr,
            refine_steps=args.refine_steps or s.refine_steps,
            refine_lr=args.refine_lr or s.refine_lr,
            # runs from before the demo had the setting refined with a constant lr
            refine_schedule=args.refine_schedule or getattr(s, "refine_schedule", "constant"),
            batch_size=s.batch_size,
            max_steps=args.max_steps or s.max_steps,
        )

    def text(self) -> str:
        return (
            f"base: {self.base_steps} steps lr {self.base_lr:g}; refine: {self.refine_steps} steps lr "
            f"{self.refine_lr:g} ({self.refine_schedule}); batch {self.batch_size}; episodes of at most "
            f"{self.max_steps} steps"
        )

    def as_dict(self) -> dict:
        return asdict(self)


def train(cfg):
    """refine(cfg) (which seeds torch from cfg.seed before a from-scratch policy draws its weights), with
    lerobot's stdout chatter sent to stderr so that stdout is the table."""
    from lrm_reward.refinement.refine import refine

    with contextlib.redirect_stdout(sys.stderr):
        return refine(cfg)


def train_base(run: DemoRun, recipe: Recipe, store: Path, seed: int):
    """A base policy from scratch on the demonstrations: the demo's `policy` stage with another seed."""
    from lrm_reward.refinement.refine import RefineConfig

    return train(
        RefineConfig(
            store_root=store, policy_name=POLICY_NAME, demos=[run.demos], steps=recipe.base_steps,
            batch_size=recipe.batch_size, lr=recipe.base_lr, device="cpu", from_scratch=True,
            policy_type="act", policy_overrides=act_overrides(run.settings), policy_inputs=POLICY_INPUTS,
            cache_frames=True, report=False, seed=seed, progress_bar=False,
        )
    )  # fmt: skip


def refine_base(
    run: DemoRun, recipe: Recipe, store: Path, seed: int, datasets: list[Path], selection: str = "filter"
):
    """The store's current version refined with the demo's refine recipe (its `refine` stage)."""
    from lrm_reward.refinement.refine import RefineConfig

    return train(
        RefineConfig(
            store_root=store, policy_name=POLICY_NAME, datasets=datasets, demos=[run.demos],
            steps=recipe.refine_steps, batch_size=recipe.batch_size, lr=recipe.refine_lr,
            lr_schedule=recipe.refine_schedule, device="cpu",
            selection=selection, cache_frames=True, report=False, seed=seed, progress_bar=False,
        )
    )  # fmt: skip


def product_default_selection() -> str:
    """What `lrm-refine` trains on when not told: its CLI default (read from the parser, not assumed)."""
    from lrm_reward.refinement.refine_cli import build_arg_parser

    return build_arg_parser().get_default("selection")
