#!/usr/bin/env python
"""How much do the demo policy's success rates move between training runs? Prints a table.

The demo compares one policy checkpoint before refinement with one after. This script measures the spread
that comparison sits in: it trains the demo's state-only ACT from scratch with several seeds (and, with
--refine-from, refines an existing version with several settings), then rolls each checkpoint out
in-process (no ROS, no rendering: the policy reads joint state + object pose only) on the same layouts the
demo uses (seeds 1000, 1001, ...). Ground truth is the simulator's.

    python benchmarks/policy_spread.py --demos out/demo/data/demos/demos --seeds 0 1 2
    python benchmarks/policy_spread.py --demos out/demo/data/demos/demos --seeds \\
        --refine-from out/demo/policies --refine 100:2e-4 800:2e-4 300:5e-5

What it is not: part of the demo or the tests (minutes per row on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(REPO / "scripts"))

POLICY = "act_so101"


def evaluate(path: Path, episodes: int, first_seed: int, max_steps: int) -> list[bool]:
    import numpy as np

    from lrm_reward.sim.policy_controller import LeRobotPolicyController
    from lrm_reward.sim.so101_scene import SceneConfig, So101Scene

    controller = LeRobotPolicyController(path, "cpu")
    if controller.image_keys:
        raise SystemExit(f"{path} reads camera images; this script only rolls out state-only policies")
    scene = So101Scene(SceneConfig(image_size=32, max_steps=max_steps))
    scene.render = lambda: np.zeros((32, 32, 3), np.uint8)  # the policy never looks: skip the renderer
    results = []
    for i in range(episodes):
        state = scene.reset(first_seed + i)
        controller.reset(first_seed + i)
        while not state.done:
            state = scene.step(controller.act(state))
        results.append(bool(state.success))
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, required=True, help="LeRobotDataset of successful demonstrations")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="from-scratch training seeds")
    p.add_argument("--steps", type=int, default=2000, help="from-scratch training steps (demo: 2000)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--refine-from", type=Path, default=None, help="policy store whose current version to refine"
    )
    p.add_argument("--refine", nargs="*", default=[], help="STEPS:LR pairs, each refined from --refine-from")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=100)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from demo import POLICY_INPUTS, DemoSettings, act_overrides  # the demo's own policy settings

    from lrm_reward.refinement.refine import RefineConfig, refine

    overrides = act_overrides(DemoSettings.__new__(DemoSettings))
    work = Path(tempfile.mkdtemp(prefix="policy_spread."))
    rows = []
    runs = [("scratch", f"seed {s}", s, None) for s in args.seeds]
    runs += [("refine", f"{spec} (seed 0)", 0, spec) for spec in args.refine]
    if args.refine and args.refine_from is None:
        raise SystemExit("--refine needs --refine-from")
    try:
        for kind, label, seed, spec in runs:
            store = work / f"{len(rows)}"
            t0 = time.monotonic()
            if spec is None:
                cfg = RefineConfig(
                    store_root=store, policy_name=POLICY, demos=[args.demos], steps=args.steps,
                    batch_size=32, lr=args.lr, device="cpu", from_scratch=True, policy_type="act",
                    policy_overrides=overrides, policy_inputs=POLICY_INPUTS, cache_frames=True,
                    report=False, seed=seed, progress_bar=False,
                )  # fmt: skip
            else:
                steps, lr = spec.split(":")
                shutil.copytree(args.refine_from, store, symlinks=True)
                cfg = RefineConfig(
                    store_root=store, policy_name=POLICY, demos=[args.demos], steps=int(steps), batch_size=32,
                    lr=float(lr), device="cpu", cache_frames=True, report=False, seed=seed,
                    progress_bar=False,
                )  # fmt: skip
            result = refine(cfg)
            train_s = time.monotonic() - t0
            outcomes = evaluate(store / POLICY / "current", args.episodes, args.first_seed, args.max_steps)
            rows.append((kind, label, result.losses[-1], sum(outcomes), outcomes, train_s))
            print(f"  {kind} {label}: {sum(outcomes)}/{args.episodes}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| run | setting | final loss | successes / {args.episodes} | layouts | train s |")
    print("|---|---|---|---|---|---|")
    for kind, label, loss, wins, outcomes, train_s in rows:
        marks = "".join("x" if ok else "." for ok in outcomes)
        print(f"| {kind} | {label} | {loss:.4f} | {wins} | `{marks}` | {train_s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
