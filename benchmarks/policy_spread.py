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

--arms DEMO_OUT asks whether refining on the judged successes helps. For each seed it trains a base from
scratch on the demonstrations (the demo's recipe), refines that base with the demo's refine recipe (same
steps, lr, batch size) four ways, and rolls out all five checkpoints on the same layouts:

    judged       demonstrations + the rollout1 episodes lrm-judge called successes (the product's path)
    demos only   demonstrations alone, same steps (the control: as much extra training, no new data)
    no filter    demonstrations + every rollout1 episode
    oracle       demonstrations + the rollout1 episodes that truly succeeded (the simulator's word)

    python benchmarks/policy_spread.py --arms out/demo --seeds 0 1 2 --episodes 40

The rollout1 recording, its judgments and the ground truth come from the finished demo run in DEMO_OUT
(its state.json); every seed's base is refined on that same recording.

What it is not: part of the demo or the tests (minutes per row on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(REPO / "scripts"))

POLICY = "act_so101"
ARMS = ("judged", "demos only", "no filter", "oracle")


def evaluate(path: Path, episodes: int, first_seed: int, max_steps: int) -> list[bool]:
    import numpy as np

    from lrm_reward.sim.policy_controller import LeRobotPolicyController
    from lrm_reward.sim.so101_scene import SceneConfig, So101Scene

    with contextlib.redirect_stdout(sys.stderr):  # lerobot prints "Loading weights ..." on stdout
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


def train(cfg):
    """refine(cfg) (which seeds torch from cfg.seed before a from-scratch policy draws its weights), with
    lerobot's stdout chatter sent to stderr so that stdout is the table."""
    from lrm_reward.refinement.refine import refine

    with contextlib.redirect_stdout(sys.stderr):
        return refine(cfg)


# ---------------------------------------------------------------------------------------------- --arms
class DemoRun:
    """What a finished demo run left: the demonstrations, rollout1 with its judgments, the ground truth."""

    def __init__(self, out: Path) -> None:
        state_file = out / "state.json"
        if not state_file.is_file():
            raise SystemExit(f"{out}: no state.json (not a demo output folder)")
        state = json.loads(state_file.read_text())
        done = state["done"]
        missing = [s for s in ("demos", "rollout1", "judge1") if s not in done]
        if missing:
            raise SystemExit(f"{out}: the demo run has not finished {missing}")
        self.settings = state["settings"]
        self.demos = Path(done["demos"]["root"])
        self.rollout = Path(done["rollout1"]["dataset"])
        for root in (self.demos, self.rollout):
            if not (root / "meta" / "info.json").is_file():
                raise SystemExit(f"{root}: no LeRobotDataset (meta/info.json missing)")
        # The simulator's outcome of every rollout1 episode, as the demo kept it.
        self.truth = {int(ep["episode_index"]): bool(ep["success"]) for ep in done["rollout1"]["episodes"]}
        # The layouts (scene seeds) rollout1 ran on: an arm that trains on rollout1 has seen them.
        self.layouts = sorted(int(ep["seed"]) for ep in done["rollout1"]["episodes"])
        total = int(json.loads((self.rollout / "meta" / "info.json").read_text())["total_episodes"])
        if sorted(self.truth) != list(range(total)):
            raise SystemExit(f"{self.rollout}: {total} episodes, ground truth for {sorted(self.truth)}")
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

    def selection(self, arm: str) -> list[int] | None:
        """rollout1 episodes an arm adds to the demonstrations; None: the judge picks (refine's own path)."""
        return {
            "judged": None,
            "demos only": [],
            "no filter": sorted(self.truth),
            "oracle": sorted(e for e, ok in self.truth.items() if ok),
        }[arm]


@contextlib.contextmanager
def rollout_episodes(rollout: Path, episodes: list[int]):
    """refine() with exactly ``episodes`` of ``rollout`` (plus every demonstration), not a judge's pick.

    RefineConfig selects a dataset's episodes only through its judgments; an arm that picks them by another
    rule (all, or the true successes) swaps refine's episode selection for the run. The rollout comes
    first, as in the product's selection (judged datasets before demonstrations).
    """
    import lrm_reward.refinement.refine as R

    original = R.select_episodes

    def select(cfg):
        chosen = original(cfg)  # cfg has no judged datasets: its demonstrations only
        chosen.episodes = {str(rollout): sorted(episodes), **chosen.episodes}
        rows = [{"dataset": str(rollout), "episode_index": e, "source": "benchmark"} for e in episodes]
        chosen.kept = rows + chosen.kept
        return chosen

    R.select_episodes = select if episodes else original
    try:
        yield
    finally:
        R.select_episodes = original


def run_arms(args, overrides: dict, inputs: tuple[str, ...]) -> int:
    from lrm_reward.refinement.refine import RefineConfig

    demo = DemoRun(args.arms)
    s = demo.settings
    demos = args.demos or demo.demos
    steps = args.steps or s["policy_steps"]
    lr = args.lr or s["policy_lr"]
    refine_steps = args.refine_steps or s["refine_steps"]
    refine_lr = args.refine_lr or s["refine_lr"]
    batch = s["batch_size"]
    print(
        f"demonstrations {demos}\nrollout1 {demo.rollout}: {sum(demo.truth.values())} of {len(demo.truth)} "
        f"truly succeeded\nbase: {steps} steps lr {lr:g}; refine: {refine_steps} steps lr {refine_lr:g}; "
        f"batch {batch}; evaluation: {args.episodes} layouts from seed {args.first_seed}",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="policy_spread.arms."))
    results: dict[str, dict[int, dict]] = {"base": {}, **{a: {} for a in ARMS}}
    used: dict[str, list[int]] = {}
    started = time.monotonic()
    try:
        for seed in args.seeds:
            base = work / f"base{seed}"
            t0 = time.monotonic()
            result = train(
                RefineConfig(
                    store_root=base, policy_name=POLICY, demos=[demos], steps=steps, batch_size=batch,
                    lr=lr, device="cpu", from_scratch=True, policy_type="act", policy_overrides=overrides,
                    policy_inputs=inputs, cache_frames=True, report=False, seed=seed, progress_bar=False,
                )
            )  # fmt: skip
            results["base"][seed] = _score(args, base, result, t0, "base", seed)
            for arm in ARMS:
                store = work / f"{arm.replace(' ', '_')}{seed}"
                shutil.copytree(base, store, symlinks=True)
                chosen = demo.selection(arm)
                t0 = time.monotonic()
                with rollout_episodes(demo.rollout, chosen or []):
                    result = train(
                        RefineConfig(
                            store_root=store, policy_name=POLICY,
                            datasets=[demo.rollout] if chosen is None else [], demos=[demos],
                            steps=refine_steps, batch_size=batch, lr=refine_lr, device="cpu",
                            cache_frames=True, report=False, seed=seed, progress_bar=False,
                        )
                    )  # fmt: skip
                picked = sorted(result.selection.episodes.get(str(demo.rollout), []))
                if used.setdefault(arm, picked) != picked:
                    raise RuntimeError(f"{arm}: selection changed between seeds ({used[arm]} vs {picked})")
                results[arm][seed] = _score(args, store, result, t0, arm, seed)
                shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.monotonic() - started
    _print_arms(args, demo, results, used, total_s)
    if args.json:
        settings = {
            "demos": str(demos), "rollout": str(demo.rollout), "base_steps": steps, "base_lr": lr,
            "refine_steps": refine_steps, "refine_lr": refine_lr, "batch_size": batch,
            "episodes": args.episodes, "first_seed": args.first_seed, "max_steps": args.max_steps,
        }  # fmt: skip
        record = {
            "command": sys.argv,
            "settings": settings,
            "rollout_episodes_used": used,
            "truth": {str(e): ok for e, ok in demo.truth.items()},
            "rollout1_layouts": demo.layouts,
            "results": {arm: {str(k): v for k, v in r.items()} for arm, r in results.items()},
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(record, indent=1))
    return 0


def _score(args, store: Path, result, t0: float, arm: str, seed: int) -> dict:
    train_s = time.monotonic() - t0
    t1 = time.monotonic()
    outcomes = evaluate(store / POLICY / "current", args.episodes, args.first_seed, args.max_steps)
    row = {
        "successes": sum(outcomes),
        "outcomes": outcomes,
        "final_loss": result.losses[-1],
        "train_s": train_s,
        "eval_s": time.monotonic() - t1,
    }
    print(
        f"  seed {seed} {arm}: {row['successes']}/{args.episodes} (final loss {row['final_loss']:.4f}, "
        f"train {train_s:.0f} s, rollouts {row['eval_s']:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return row


def _print_arms(args, demo: DemoRun, results: dict, used: dict, total_s: float) -> None:
    seeds = args.seeds
    n = args.episodes

    def wins(arm):
        return [results[arm][s]["successes"] for s in seeds]

    def mean(xs):
        return sum(xs) / len(xs)

    base = wins("base")
    control = wins("demos only")
    head = " | ".join(f"seed {s}" for s in seeds)
    print(f"\n| arm | rollout1 episodes added | {head} | mean / {n} | Δ vs base per seed | mean Δ vs base "
          "| mean Δ vs demos only |")  # fmt: skip
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|---|")
    for arm in ("base", *ARMS):
        w = wins(arm)
        if arm == "base":
            added = "—"
        else:
            eps = used[arm]
            true = sum(demo.truth[e] for e in eps)
            added = f"{len(eps)} ({true} true successes)" if eps else "0"
        diffs = [a - b for a, b in zip(w, base, strict=True)]
        vs_control = [a - b for a, b in zip(w, control, strict=True)]
        cells = " | ".join(str(x) for x in w)
        print(
            f"| {arm} | {added} | {cells} | {mean(w):.1f} | "
            + ("—" if arm == "base" else " / ".join(f"{d:+d}" for d in diffs))
            + " | "
            + ("—" if arm == "base" else f"{mean(diffs):+.1f}")
            + " | "
            + ("—" if arm in ("base", "demos only") else f"{mean(vs_control):+.1f}")
            + " |"
        )
    layouts = range(args.first_seed, args.first_seed + n)
    seen = [i for i, layout in enumerate(layouts) if layout in set(demo.layouts)]
    unseen = [i for i, layout in enumerate(layouts) if layout not in set(demo.layouts)]
    if seen and unseen:
        print(
            f"\nSplit by layout: {len(seen)} layouts rollout1 ran on (the judged / no filter / oracle arms "
            f"train on those episodes), {len(unseen)} layouts no arm has seen:\n"
        )
        print(f"| arm | rollout1 layouts, per seed | mean / {len(seen)} | other layouts, per seed "
              f"| mean / {len(unseen)} |")  # fmt: skip
        print("|---|---|---|---|---|")
        for arm in ("base", *ARMS):
            parts = []
            for subset in (seen, unseen):
                w = [sum(results[arm][s]["outcomes"][i] for i in subset) for s in seeds]
                parts.append(f"{' / '.join(str(x) for x in w)} | {mean(w):.1f}")
            print(f"| {arm} | {parts[0]} | {parts[1]} |")
    print(f"\nper layout (x success, . failure; layouts {args.first_seed}..{args.first_seed + n - 1}):\n")
    print("| arm | seed | successes | layouts | final loss | train s | rollouts s |")
    print("|---|---|---|---|---|---|---|")
    for arm in ("base", *ARMS):
        for s in seeds:
            r = results[arm][s]
            marks = "".join("x" if ok else "." for ok in r["outcomes"])
            print(
                f"| {arm} | {s} | {r['successes']} | `{marks}` | {r['final_loss']:.4f} | "
                f"{r['train_s']:.0f} | {r['eval_s']:.0f} |"
            )
    print(f"\ntotal {total_s:.0f} s")


# ---------------------------------------------------------------------------------------------- main
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--demos", type=Path, default=None,
        help="LeRobotDataset of successful demonstrations (with --arms: the demo run's by default)",
    )  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="from-scratch training seeds")
    p.add_argument(
        "--steps", type=int, default=None, help="from-scratch training steps (default: the demo's, 2000)"
    )
    p.add_argument("--lr", type=float, default=None, help="from-scratch learning rate (default: 5e-4)")
    p.add_argument(
        "--refine-from", type=Path, default=None, help="policy store whose current version to refine"
    )
    p.add_argument("--refine", nargs="*", default=[], help="STEPS:LR pairs, each refined from --refine-from")
    p.add_argument(
        "--arms", type=Path, default=None, metavar="DEMO_OUT",
        help="compare refinement arms (judged / demos only / no filter / oracle) on this demo run's rollout1",
    )  # fmt: skip
    p.add_argument("--refine-steps", type=int, default=None, help="--arms: refine steps (default: demo's)")
    p.add_argument("--refine-lr", type=float, default=None, help="--arms: refine lr (default: the demo's)")
    p.add_argument("--json", type=Path, default=None, help="--arms: also write every result to this file")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--max-steps", type=int, default=100)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from demo import POLICY_INPUTS, DemoSettings, act_overrides  # the demo's own policy settings

    from lrm_reward.refinement.refine import RefineConfig

    overrides = act_overrides(DemoSettings.__new__(DemoSettings))
    if args.arms is not None:
        if args.refine or args.refine_from:
            raise SystemExit("--arms does not combine with --refine / --refine-from")
        return run_arms(args, overrides, POLICY_INPUTS)
    if args.demos is None:
        raise SystemExit("--demos is required (unless --arms)")
    steps = args.steps or 2000
    lr = args.lr or 5e-4
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
                    store_root=store, policy_name=POLICY, demos=[args.demos], steps=steps,
                    batch_size=32, lr=lr, device="cpu", from_scratch=True, policy_type="act",
                    policy_overrides=overrides, policy_inputs=POLICY_INPUTS, cache_frames=True,
                    report=False, seed=seed, progress_bar=False,
                )  # fmt: skip
            else:
                r_steps, r_lr = spec.split(":")
                shutil.copytree(args.refine_from, store, symlinks=True)
                cfg = RefineConfig(
                    store_root=store, policy_name=POLICY, demos=[args.demos], steps=int(r_steps),
                    batch_size=32, lr=float(r_lr), device="cpu", cache_frames=True, report=False,
                    seed=seed, progress_bar=False,
                )  # fmt: skip
            result = train(cfg)
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
