"""policy_spread --arms: what each way of refining on the judged rollouts is worth, per training seed.

For each seed: a base from scratch on the demo's demonstrations (its recipe), then from that base one
refinement per arm (the demo's refine recipe: steps, lr, batch size), all rolled out in-process on the
same layouts. The arms differ only in what the refinement adds to the demonstrations from the demo run's
rollout1 recording:

    judged       lrm-refine --selection filter: the episodes lrm-judge called successes
    weighting    --selection weighting: every episode, each frame weighted by its progress (RA-BC)
    both         --selection both: judged successes at full weight, the other episodes weighted
    no filter    every rollout1 episode at full weight
    oracle       the rollout1 episodes that truly succeeded (the simulator's word), at full weight
    demos only   nothing (the control: as much extra training, no new data)

The product's default arm is the one lrm-refine's CLI default selection names. The rollout1 episodes
carry the progress the reward node published live (reward.progress), which the weighting arms use.

What it is not: a measurement of the judge (the demo's report has its confusion matrix).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spread.demo_run import (
    POLICY_NAME,
    DemoRun,
    Recipe,
    product_default_selection,
    refine_base,
    train_base,
)
from spread.intervals import RESAMPLED, compare, interval_text
from spread.rollouts import evaluate

SELECTION_ARMS = {"filter": "judged", "weighting": "weighting", "both": "both"}
FIXED_ARMS = ("no filter", "oracle", "demos only")
ARMS = (*SELECTION_ARMS.values(), *FIXED_ARMS)
SUBSETS = ("all", "seen", "unseen")


def fixed_episodes(run: DemoRun, arm: str) -> list[int]:
    """rollout1 episodes a fixed arm adds to the demonstrations, all at full weight."""
    return {
        "no filter": sorted(run.truth),
        "oracle": sorted(e for e, ok in run.truth.items() if ok),
        "demos only": [],
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
        rows = [
            {"dataset": str(rollout), "episode_index": e, "source": "benchmark", "weight": "full"}
            for e in episodes
        ]
        chosen.kept = rows + chosen.kept
        return chosen

    R.select_episodes = select if episodes else original
    try:
        yield
    finally:
        R.select_episodes = original


def rollout_use(selection, rollout: Path) -> dict:
    """Which rollout1 episodes a refinement trained on, at full weight or by progress."""
    rows = [r for r in selection.kept if r["dataset"] == str(rollout)]
    weighting = selection.weighting or {}
    return {
        "full": sorted(r["episode_index"] for r in rows if r.get("weight", "full") == "full"),
        "weighted": sorted(r["episode_index"] for r in rows if r.get("weight") == "progress"),
        "mechanism": weighting.get("mechanism", "uniform"),
        "progress_sources": weighting.get("progress_sources", {}).get(str(rollout), {}),
        "progress_weights": weighting.get("progress_weights"),
    }


def evaluation_layouts(args, run: DemoRun) -> list[int]:
    if args.smoke:  # one layout rollout1 ran on, one it did not: both splits are exercised
        return [max(run.layouts), max(run.layouts) + 1]
    return list(range(args.first_seed, args.first_seed + args.episodes))


def run_arms(args) -> int:
    run = DemoRun(args.arms, needs=("demos", "rollout1", "judge1"))
    recipe = Recipe.of(run, args)
    layouts = evaluation_layouts(args, run)
    default = product_default_selection()
    say(
        f"demonstrations {run.demos}\nrollout1 {run.rollout}: {sum(run.truth.values())} of {len(run.truth)} "
        f"truly succeeded, judge {run.judge_matrix()}\n{recipe.text()}; seeds {args.seeds}; evaluation on "
        f"{len(layouts)} layouts {layouts[0]}..{layouts[-1]}; product default selection: {default}"
    )
    work = Path(tempfile.mkdtemp(prefix="policy_spread.arms."))
    results: dict[str, dict[int, dict]] = {arm: {} for arm in ("base", *ARMS)}
    used: dict[str, dict] = {}
    started = time.monotonic()
    try:
        for seed in args.seeds:
            base = work / f"base{seed}"
            t0 = time.monotonic()
            result = train_base(run, recipe, base, seed)
            results["base"][seed] = score(result, base, t0, layouts, recipe, "base", seed)
            for selection, arm in [*SELECTION_ARMS.items(), *((None, a) for a in FIXED_ARMS)]:
                store = work / f"{arm.replace(' ', '_')}{seed}"
                shutil.copytree(base, store, symlinks=True)
                t0 = time.monotonic()
                if selection is not None:
                    result = refine_base(run, recipe, store, seed, [run.rollout], selection)
                else:
                    with rollout_episodes(run.rollout, fixed_episodes(run, arm)):
                        result = refine_base(run, recipe, store, seed, [])
                use = rollout_use(result.selection, run.rollout)
                first = used.setdefault(arm, use)
                if (first["full"], first["weighted"]) != (use["full"], use["weighted"]):
                    raise RuntimeError(f"{arm}: selection changed between seeds ({used[arm]} vs {use})")
                results[arm][seed] = score(result, store, t0, layouts, recipe, arm, seed)
                shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.monotonic() - started
    seen = set(run.layouts)
    subsets = {
        "all": list(range(len(layouts))),
        "seen": [i for i, x in enumerate(layouts) if x in seen],
        "unseen": [i for i, x in enumerate(layouts) if x not in seen],
    }
    summary = summarize(results, args.seeds, subsets)
    verdict = target_verdict(summary, SELECTION_ARMS[default])
    print_arms(run, results, summary, used, verdict, args.seeds, layouts, subsets, total_s)
    if args.json:
        record = {
            "command": sys.argv,
            "demo_run": str(run.out),
            "recipe": recipe.as_dict(),
            "seeds": args.seeds,
            "layouts": layouts,
            "rollout1_layouts": run.layouts,
            "subsets": {k: [layouts[i] for i in v] for k, v in subsets.items()},
            "truth": {str(e): ok for e, ok in run.truth.items()},
            "judged": {str(e): ok for e, ok in run.judged.items()},
            "judge_matrix": run.judge_matrix(),
            "product_default": {"selection": default, "arm": SELECTION_ARMS[default]},
            "rollout1_used": used,
            "results": {arm: {str(k): v for k, v in r.items()} for arm, r in results.items()},
            "summary": summary,
            "intervals": RESAMPLED,
            "target": verdict,
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(record, indent=1))
        say(f"wrote {args.json}")
    return 0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def score(result, store: Path, t0: float, layouts: list[int], recipe: Recipe, arm: str, seed: int) -> dict:
    train_s = time.monotonic() - t0
    t1 = time.monotonic()
    outcomes = evaluate(store / POLICY_NAME / "current", layouts, recipe.max_steps)
    row = {
        "successes": sum(outcomes),
        "outcomes": outcomes,
        "final_loss": result.losses[-1],
        "train_s": train_s,
        "eval_s": time.monotonic() - t1,
    }
    say(
        f"  seed {seed} {arm}: {row['successes']}/{len(layouts)} (final loss {row['final_loss']:.4f}, "
        f"train {train_s:.0f} s, rollouts {row['eval_s']:.0f} s)"
    )
    return row


def summarize(results: dict, seeds: list[int], subsets: dict[str, list[int]]) -> dict:
    """Per arm and layout subset: successes per seed, mean, delta vs base per seed, mean delta + interval."""

    def grid(arm: str, idx: list[int]) -> np.ndarray:
        return np.array([[results[arm][s]["outcomes"][i] for i in idx] for s in seeds], dtype=np.int64)

    out: dict = {}
    for arm in results:
        out[arm] = {}
        for name, idx in subsets.items():
            row = compare(grid(arm, idx), grid("base", idx))
            if arm != "base" and "demos only" in results:
                row["mean_delta_vs_demos_only"] = float(
                    (grid(arm, idx).sum(axis=1) - grid("demos only", idx).sum(axis=1)).mean()
                )
            out[arm][name] = row
    return out


def target_verdict(summary: dict, default_arm: str) -> dict:
    """Issue 16's target for the product's default arm, from the numbers: at least half the oracle's mean
    gain over the base on all layouts and on the unseen ones, and no seed below its base (all layouts)."""
    checks = []
    for subset in ("all", "unseen"):
        gain = summary[default_arm][subset]["mean_delta"]
        oracle = summary["oracle"][subset]["mean_delta"]
        n = summary[default_arm][subset]["layouts"]
        need = oracle / 2
        if n == 0:
            met, why = False, "no such layouts were evaluated"
        elif oracle <= 0:
            met, why = False, f"the oracle gained {oracle:+.1f}: no headroom to measure half of"
        elif gain >= need:
            met, why = True, f"{gain:+.1f} >= half the oracle's {oracle:+.1f}"
        else:
            short = f"short by {need - gain:.1f} of {n} layouts"
            met, why = False, f"{gain:+.1f} < {need:+.1f}, half the oracle's {oracle:+.1f}: {short}"
        checks.append({"check": f"mean gain on {subset} layouts (of {n})", "met": met, "detail": why})
    deltas = summary[default_arm]["all"]["delta"]
    below = [d for d in deltas if d < 0]
    checks.append(
        {
            "check": "not below its base for any seed (all layouts)",
            "met": not below,
            "detail": f"per seed {' / '.join(f'{d:+d}' for d in deltas)}"
            + (f": {len(below)} seed(s) below, worst {min(below):+d}" if below else ""),
        }
    )
    return {"arm": default_arm, "met": all(c["met"] for c in checks), "checks": checks}


def _used_text(run: DemoRun, use: dict | None) -> str:
    if use is None:
        return "—"
    full, weighted = use["full"], use["weighted"]
    if not weighted:
        return f"{len(full)} ({sum(run.truth[e] for e in full)} true successes)"
    return (
        f"{len(full)} at full weight ({sum(run.truth[e] for e in full)} true successes) + {len(weighted)} "
        f"weighted ({sum(run.truth[e] for e in weighted)} true)"
    )


def print_arms(run, results, summary, used, verdict, seeds, layouts, subsets, total_s) -> None:
    default_arm = verdict["arm"]
    n = len(layouts)

    def label(arm: str) -> str:
        return f"{arm} (product default)" if arm == default_arm else arm

    head = " | ".join(f"seed {s}" for s in seeds)
    print(
        f"\n| arm | rollout1 episodes used | {head} | mean / {n} | Δ vs base per seed "
        "| mean Δ vs base [95% interval] | mean Δ vs demos only |"
    )
    print("|---|---|" + "---|" * len(seeds) + "---|---|---|---|")
    for arm in results:
        row = summary[arm]["all"]
        cells = " | ".join(str(x) for x in row["successes"])
        base = arm == "base"
        print(
            f"| {label(arm)} | {_used_text(run, used.get(arm))} | {cells} | {row['mean']:.1f} | "
            + ("—" if base else " / ".join(f"{d:+d}" for d in row["delta"]))
            + " | "
            + ("—" if base else interval_text(row))
            + " | "
            + (f"{row['mean_delta_vs_demos_only']:+.1f}" if arm not in ("base", "demos only") else "—")
            + " |"
        )
    if subsets["seen"] and subsets["unseen"]:
        ns, nu = len(subsets["seen"]), len(subsets["unseen"])
        print(
            f"\nSplit by layout: {ns} layouts rollout1 ran on (every arm but base and demos only trains on "
            f"episodes from them), {nu} layouts no arm has seen:\n"
        )
        print(
            f"| arm | seen, per seed | mean / {ns} | mean Δ vs base [95% interval]; per seed "
            f"| unseen, per seed | mean / {nu} | mean Δ vs base [95% interval]; per seed |"
        )
        print("|---|---|---|---|---|---|---|")
        for arm in results:
            parts = []
            for subset in ("seen", "unseen"):
                row = summary[arm][subset]
                per_seed = " / ".join(f"{d:+d}" for d in row["delta"])
                ci = "—" if arm == "base" else f"{interval_text(row)}; per seed {per_seed}"
                parts.append(f"{' / '.join(str(x) for x in row['successes'])} | {row['mean']:.1f} | {ci}")
            print(f"| {label(arm)} | {parts[0]} | {parts[1]} |")
    print(f"\nIntervals: {RESAMPLED}; in successes out of the layouts of the column.")
    print(
        f"\nrollout1: {len(run.truth)} episodes, {sum(run.truth.values())} true successes; lrm-judge "
        f"{run.judge_matrix()} (tp: true successes it kept, fp: failures it called successes)."
    )
    for arm in results:
        use = used.get(arm)
        if use and use["weighted"]:
            w = use["progress_weights"] or {}
            print(
                f"{arm}: {use['mechanism']}; progress from {use['progress_sources']}; weighted frames: mean "
                f"{w.get('mean', float('nan')):.2f}, at the floor {w.get('at_floor', float('nan')):.0%}, "
                f"at full weight {w.get('at_full', float('nan')):.0%}"
            )
    print(f"\nTarget for the product default ({default_arm}): {'met' if verdict['met'] else 'NOT met'}")
    for c in verdict["checks"]:
        print(f"- {c['check']}: {'met' if c['met'] else 'not met'} ({c['detail']})")
    print(f"\nper layout (x success, . failure; layouts {layouts[0]}..{layouts[-1]}):\n")
    print("| arm | seed | successes | layouts | final loss | train s | rollouts s |")
    print("|---|---|---|---|---|---|---|")
    for arm in results:
        for s in seeds:
            r = results[arm][s]
            marks = "".join("x" if ok else "." for ok in r["outcomes"])
            print(
                f"| {arm} | {s} | {r['successes']} | `{marks}` | {r['final_loss']:.4f} | "
                f"{r['train_s']:.0f} | {r['eval_s']:.0f} |"
            )
    print(f"\ntotal {total_s:.0f} s")
