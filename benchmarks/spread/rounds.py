"""policy_spread --rounds N: the nightly loop run N rounds per training seed, success per round.

Per seed: a base from scratch on the demo's demonstrations (its recipe); then per round: the current
version rolls out on the round layouts (rendered with the demo's camera and image size and recorded as the
refinement node records, in-process), lrm-judge judges that recording with the demo run's reward model
(the demo's judge settings), and lrm-refine refines the current version on every round recorded so far
plus the demonstrations, with the product's default selection (lrm-refine's CLI default); the next round
rolls out the new version. With --keep-best, `lrm-policy promote --best` runs before each refinement, so
it starts from the version the judge called successful most often on its own round so far (the
rollback a lab would do by hand after a bad night) rather than from the last one. The last round is
rolled out, not judged or refined. Every round's version is also rolled out, without recording, on
layouts no round has recorded.

No reward node runs during these rollouts, so there is no live per-frame progress in the recordings:
the weighting selections weight frames by the judge's progress curve instead (dense_weights.read_progress
falls back to it per episode).

What it is not: the demo's ROS loop (scripts/demo.py --rounds runs the same stages over real nodes for
one seed).
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

from spread.arms import rollout_use, say
from spread.demo_run import POLICY_NAME, DemoRun, Recipe, product_default_selection, refine_base, train_base
from spread.intervals import RESAMPLED, compare, interval_text
from spread.rollouts import evaluate, record_rollouts


def round_layouts(args) -> tuple[list[int], list[int]]:
    """(layouts every round rolls out and records on, layouts only evaluated)."""
    first = args.first_seed
    if args.smoke:
        return [first], [first + 1]
    if not 0 < args.round_episodes < args.episodes:
        raise SystemExit("--round-episodes must be at least 1 and less than --episodes")
    split = first + args.round_episodes
    return list(range(first, split)), list(range(split, first + args.episodes))


def judge_round(run: DemoRun, dataset: Path, episodes: list[dict]) -> dict:
    """lrm-judge on one round's recording with the demo's reward model and judge settings."""
    from lrm_demo.judging import judge

    with contextlib.redirect_stdout(sys.stderr):
        res = judge(run.settings, run.reward, {"dataset": str(dataset), "episodes": episodes})
    return {"matrix": res["matrix"], "accuracy": res["accuracy"]}


def keep_best(store: Path, data_root: Path, round_episodes: int) -> str:
    """`lrm-policy promote --best` before a round's refinement: current becomes the version the judge
    called successful most often on its own round's rollouts. Returns 'vNNNN (judge a/b)'."""
    from lrm_reward.refinement.policy_cli import promote_best
    from lrm_reward.refinement.policy_store import PolicyStore

    policies = PolicyStore(store, POLICY_NAME)
    version, record, _ = promote_best(policies, [data_root], min_judged=min(10, round_episodes))
    return f"{version} ({record.describe()})"


def run_rounds(args) -> int:
    run = DemoRun(args.demo_out, needs=("demos", "reward"))
    recipe = Recipe.of(run, args)
    seen, unseen = round_layouts(args)
    product = product_default_selection()
    default = args.selection or product
    s = run.settings
    camera = getattr(s, "camera_view", "workspace")
    say(
        f"demonstrations {run.demos}\nreward model {run.reward['base']} + {run.reward['adapters']}\n"
        f"{recipe.text()}; seeds {args.seeds}; {args.rounds} rounds on layouts {seen[0]}..{seen[-1]} "
        f"(camera {camera}, {s.image_size} px), also evaluated on {unseen[0]}..{unseen[-1]}; "
        f"selection {default}"
        + (" (lrm-refine's default)" if default == product else f" (lrm-refine's default: {product})")
        + ("; keep best: refine from the version judged best so far" if args.keep_best else "")
    )
    work = Path(tempfile.mkdtemp(prefix="policy_spread.rounds."))
    per_seed: dict[int, list[dict]] = {}
    started = time.monotonic()
    try:
        for seed in args.seeds:
            store = work / f"policies{seed}"
            t0 = time.monotonic()
            result = train_base(run, recipe, store, seed)
            train_s = time.monotonic() - t0
            datasets: list[Path] = []
            rows = per_seed[seed] = []
            for r in range(1, args.rounds + 1):
                version = result.version
                t0 = time.monotonic()
                name = f"rollouts_round{r}"
                episodes = record_rollouts(
                    version.path, seen, recipe.max_steps, s.image_size, camera, work / f"data{seed}", name,
                    note=f"policy_spread seed {seed} round {r}",
                )  # fmt: skip
                row = {
                    "round": r,
                    "version": version.ref,
                    "train_s": train_s,
                    "seen": [e["success"] for e in episodes],
                    "unseen": evaluate(version.path, unseen, recipe.max_steps),
                    "rollouts_s": time.monotonic() - t0,
                }
                rows.append(row)
                say(
                    f"  seed {seed} round {r} ({version.ref}): {sum(row['seen'])}/{len(seen)} on the round "
                    f"layouts, {sum(row['unseen'])}/{len(unseen)} on the others ({row['rollouts_s']:.0f} s)"
                )
                if r == args.rounds:
                    break
                dataset = work / f"data{seed}" / name
                t0 = time.monotonic()
                row["judge"] = judge_round(run, dataset, episodes)
                row["judge"]["wall_s"] = time.monotonic() - t0
                judged = row["judge"]
                say(f"  seed {seed} round {r}: judge {judged['matrix']} ({judged['wall_s']:.0f} s)")
                datasets.append(dataset)
                parent = keep_best(store, work / f"data{seed}", len(seen)) if args.keep_best else None
                if parent:
                    say(f"  seed {seed} round {r}: keep best: refine from {parent}")
                t0 = time.monotonic()
                result = refine_base(run, recipe, store, seed, datasets, default)
                train_s = time.monotonic() - t0
                row["refine"] = {
                    "parent": result.parent,
                    "final_loss": result.losses[-1],
                    "train_s": train_s,
                    "used": {str(d): rollout_use(result.selection, d) for d in datasets},
                }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total_s = time.monotonic() - started
    summary = summarize_rounds(per_seed, args.seeds, args.rounds)
    print_rounds(per_seed, summary, args.seeds, seen, unseen, default, total_s)
    if args.json:
        record = {
            "command": sys.argv,
            "demo_run": str(run.out),
            "recipe": recipe.as_dict(),
            "selection": default,
            "keep_best": args.keep_best,
            "seeds": args.seeds,
            "rounds": args.rounds,
            "round_layouts": seen,
            "other_layouts": unseen,
            "camera_view": camera,
            "image_size": s.image_size,
            "per_seed": {str(k): v for k, v in per_seed.items()},
            "summary": summary,
            "intervals": RESAMPLED,
            "total_s": total_s,
        }
        args.json.write_text(json.dumps(record, indent=1))
        say(f"wrote {args.json}")
    return 0


def summarize_rounds(per_seed: dict[int, list[dict]], seeds: list[int], rounds: int) -> list[dict]:
    """Per round and layout subset: successes per seed, mean, delta vs round 1 per seed, mean + interval."""

    def grid(r: int, subset: str) -> np.ndarray:
        rows = [per_seed[s][r - 1] for s in seeds]
        if subset == "all":
            return np.array([row["seen"] + row["unseen"] for row in rows], dtype=np.int64)
        return np.array([row[subset] for row in rows], dtype=np.int64)

    out = []
    for r in range(1, rounds + 1):
        entry = {"round": r, "versions": [per_seed[s][r - 1]["version"] for s in seeds]}
        for subset in ("seen", "unseen", "all"):
            entry[subset] = compare(grid(r, subset), grid(1, subset))
        judged = [per_seed[s][r - 1].get("judge") for s in seeds]
        if all(judged):
            entry["judge"] = {k: sum(j["matrix"][k] for j in judged) for k in ("tp", "fp", "fn", "tn")}
        out.append(entry)
    return out


def print_rounds(per_seed, summary, seeds, seen, unseen, selection, total_s) -> None:
    ns, nu = len(seen), len(unseen)
    print(
        f"\nThe nightly loop, {len(summary)} rounds per seed (selection {selection}): round layouts "
        f"{seen[0]}..{seen[-1]} (rolled out, judged, refined on), other layouts {unseen[0]}..{unseen[-1]} "
        "(never recorded):\n"
    )
    print(
        f"| round | round layouts, per seed | mean / {ns} | Δ vs round 1 [95% interval] "
        f"| other layouts, per seed | mean / {nu} | Δ vs round 1 [95% interval] "
        "| judge on this round (all seeds) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for entry in summary:
        parts = []
        for subset in ("seen", "unseen"):
            row = entry[subset]
            ci = "—" if entry["round"] == 1 else interval_text(row)
            parts.append(f"{' / '.join(str(x) for x in row['successes'])} | {row['mean']:.1f} | {ci}")
        judge = entry.get("judge")
        judged = f"tp {judge['tp']} fp {judge['fp']} fn {judge['fn']} tn {judge['tn']}" if judge else "—"
        print(f"| {entry['round']} | {parts[0]} | {parts[1]} | {judged} |")
    print(f"\nIntervals: {RESAMPLED}; in successes out of the layouts of the column.")
    print("\nper seed (x success, . failure; the round layouts, then the others):\n")
    print(
        "| seed | round | version | layouts | refined from | refine final loss | refine s | judge s "
        "| rollouts s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for s in seeds:
        for row in per_seed[s]:
            marks = " ".join("".join("x" if ok else "." for ok in row[k]) for k in ("seen", "unseen"))
            ref, judge = row.get("refine"), row.get("judge")
            parent = str(ref.get("parent") or "—").rpartition("/")[2] if ref else "—"
            refined = f"{parent} | {ref['final_loss']:.4f} | {ref['train_s']:.0f}" if ref else "— | — | —"
            judged = f"{judge['wall_s']:.0f}" if judge else "—"
            print(
                f"| {s} | {row['round']} | {row['version']} | `{marks}` | {refined} | {judged} "
                f"| {row['rollouts_s']:.0f} |"
            )
    print(f"\ntotal {total_s:.0f} s")
