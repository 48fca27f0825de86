#!/usr/bin/env python
"""How much do the demo policy's success rates move between training runs, and what is refining worth?

Three modes, each printing markdown tables (stdout; progress on stderr). Policies are rolled out in-process
on layouts (scene seeds) 1000, 1001, ... as the demo's rollouts are; ground truth is the simulator's.

Plain: train the demo's state-only ACT from scratch with several seeds (and, with --refine-from, refine an
existing version with several settings) and roll each checkpoint out:

    python benchmarks/policy_spread.py --demos out/demo/data/demos/demos --seeds 0 1 2
    python benchmarks/policy_spread.py --demos out/demo/data/demos/demos --seeds \\
        --refine-from out/demo/policies --refine 100:2e-4 800:2e-4 300:5e-5

--arms DEMO_OUT (spread/arms.py): per seed, a base from scratch on a finished demo run's demonstrations,
refined from that base with the demo's refine recipe seven ways on the run's rollout1 recording and its
judgments (judged filter, dense weighting, both, no filter, oracle, demos only), every checkpoint rolled
out on 40 layouts: 1000-1019 are rollout1's (seen by the arms that train on it), 1020-1039 unseen. Per
arm: successes per seed, delta vs base, bootstrap 95% intervals (spread/intervals.py), and whether the
product's default arm (lrm-refine's default selection) meets issue 16's target.

    python benchmarks/policy_spread.py --arms out/demo --seeds 0 1 2 --json arms.json

--rounds [N] --demo-out DEMO_OUT (spread/rounds.py): per seed, the nightly loop N rounds (default 3):
rollouts on 20 layouts, rendered and recorded -> lrm-judge with the demo's reward model -> lrm-refine
with the default selection -> rollouts ...; success per round on those layouts and on 20 never recorded.

    python benchmarks/policy_spread.py --rounds 3 --demo-out out/demo --seeds 0 1 2 --json rounds.json
    python benchmarks/policy_spread.py --rounds 3 --selection both --demo-out out/demo --seeds 0 1 2
    python benchmarks/policy_spread.py --rounds 3 --keep-best --demo-out out/demo --seeds 0 1 2

--smoke runs a mode tiny (a few training steps, 2 layouts, short episodes; tests/test_policy_spread_smoke.py).

What it is not: part of the demo or the tests (an --arms run is tens of minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spread package beside this script

from spread.demo_run import POLICY_INPUTS, POLICY_NAME, act_overrides, train
from spread.rollouts import evaluate

SMOKE = {"steps": 3, "refine_steps": 3, "max_steps": 15, "seeds": [0, 1]}


# ---------------------------------------------------------------------------------------------- main
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demos", type=Path, default=None, help="plain mode: LeRobotDataset of demonstrations")
    p.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="from-scratch training seeds (default 0 1 2)"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="from-scratch training steps (default: the demo's, 2000)"
    )
    p.add_argument("--lr", type=float, default=None, help="from-scratch learning rate (default: 5e-4)")
    p.add_argument("--refine-from", type=Path, default=None, help="plain mode: the policy store to refine")
    p.add_argument("--refine", nargs="*", default=[], help="STEPS:LR pairs, each refined from --refine-from")
    p.add_argument(
        "--arms", type=Path, default=None, metavar="DEMO_OUT",
        help="compare refinement arms on this finished demo run's rollout1 (spread/arms.py)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, nargs="?", const=3, default=None, metavar="N",
        help="run the nightly loop N rounds per seed (default 3) from --demo-out's demonstrations and reward "
        "model (spread/rounds.py)",
    )  # fmt: skip
    p.add_argument("--demo-out", type=Path, default=None, help="--rounds: the finished demo run's folder")
    p.add_argument(
        "--keep-best", action="store_true",
        help="--rounds: before each refinement, lrm-policy promote --best (refine from the version the judge "
        "called successful most often on its own round)",
    )  # fmt: skip
    p.add_argument(
        "--selection", choices=["filter", "weighting", "both"], default=None,
        help="--rounds: lrm-refine's selection every round (default: lrm-refine's own default)",
    )  # fmt: skip
    p.add_argument("--refine-steps", type=int, default=None, help="refine steps (default: the demo's)")
    p.add_argument("--refine-lr", type=float, default=None, help="refine lr (default: the demo's)")
    p.add_argument(
        "--refine-schedule",
        choices=["constant", "cosine"],
        default=None,
        help="refine lr schedule, lrm-refine --lr-schedule (default: the demo's)",
    )
    p.add_argument("--json", type=Path, default=None, help="--arms / --rounds: also write every result here")
    p.add_argument(
        "--episodes", type=int, default=None, help="evaluation layouts (default 40; plain mode 20)"
    )
    p.add_argument(
        "--round-episodes", type=int, default=20,
        help="--rounds: the first this many layouts are rolled out, judged and refined on every round",
    )  # fmt: skip
    p.add_argument("--first-seed", type=int, default=1000, help="first evaluation layout (scene seed)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="steps per episode (default: the demo's; plain mode 100)"
    )
    p.add_argument(
        "--smoke", action="store_true",
        help=f"tiny everything ({SMOKE}, 2 layouts) to check that a mode runs end to end",
    )  # fmt: skip
    return p


def main() -> int:
    args = build_arg_parser().parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    if not args.seeds:
        raise SystemExit("--seeds: give at least one seed")

    import torch

    torch.set_num_threads(1)  # a policy this small trains fastest on one thread (lrm_demo.policy)
    if args.arms is not None and args.rounds is not None:
        raise SystemExit("--arms and --rounds are separate runs")
    if args.selection is not None and args.rounds is None:
        raise SystemExit("--selection is a --rounds option (--arms compares every selection)")
    if args.keep_best and args.rounds is None:
        raise SystemExit("--keep-best is a --rounds option")
    if (args.arms is not None or args.rounds is not None) and (args.refine or args.refine_from or args.demos):
        raise SystemExit("--arms / --rounds train on the demo run's data: no --demos / --refine")
    if args.arms is not None:
        from spread.arms import run_arms

        args.episodes = args.episodes or 40
        return run_arms(args)
    if args.rounds is not None:
        from spread.rounds import run_rounds

        if args.demo_out is None:
            raise SystemExit("--rounds needs --demo-out DEMO_OUT (a finished demo run)")
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")
        args.episodes = args.episodes or 40
        return run_rounds(args)
    return run_plain(args)


def run_plain(args) -> int:
    from lrm_reward.refinement.refine import RefineConfig

    if args.demos is None:
        raise SystemExit("--demos is required (unless --arms or --rounds)")
    if args.refine and args.refine_from is None:
        raise SystemExit("--refine needs --refine-from")
    steps = args.steps or 2000
    lr = args.lr or 5e-4
    episodes = 2 if args.smoke else args.episodes or 20
    layouts = list(range(args.first_seed, args.first_seed + episodes))
    max_steps = args.max_steps or 100
    overrides = act_overrides(None)
    work = Path(tempfile.mkdtemp(prefix="policy_spread."))
    rows = []
    runs = [("scratch", f"seed {s}", s, None) for s in args.seeds]
    runs += [("refine", f"{spec} (seed 0)", 0, spec) for spec in args.refine]
    try:
        for kind, label, seed, spec in runs:
            store = work / f"{len(rows)}"
            t0 = time.monotonic()
            if spec is None:
                cfg = RefineConfig(
                    store_root=store, policy_name=POLICY_NAME, demos=[args.demos], steps=steps,
                    batch_size=32, lr=lr, device="cpu", from_scratch=True, policy_type="act",
                    policy_overrides=overrides, policy_inputs=POLICY_INPUTS, cache_frames=True,
                    report=False, seed=seed, progress_bar=False,
                )  # fmt: skip
            else:
                r_steps, r_lr = spec.split(":")
                shutil.copytree(args.refine_from, store, symlinks=True)
                cfg = RefineConfig(
                    store_root=store, policy_name=POLICY_NAME, demos=[args.demos], steps=int(r_steps),
                    batch_size=32, lr=float(r_lr), device="cpu", cache_frames=True, report=False,
                    seed=seed, progress_bar=False,
                )  # fmt: skip
            result = train(cfg)
            train_s = time.monotonic() - t0
            outcomes = evaluate(store / POLICY_NAME / "current", layouts, max_steps)
            rows.append((kind, label, result.losses[-1], sum(outcomes), outcomes, train_s))
            print(f"  {kind} {label}: {sum(outcomes)}/{episodes}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n| run | setting | final loss | successes / {episodes} | layouts | train s |")
    print("|---|---|---|---|---|---|")
    for kind, label, loss, wins, outcomes, train_s in rows:
        marks = "".join("x" if ok else "." for ok in outcomes)
        print(f"| {kind} | {label} | {loss:.4f} | {wins} | `{marks}` | {train_s:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
