#!/usr/bin/env python
"""How right is the judge on rollouts it has never seen, and where does it go wrong?

The demo's judge numbers come from 20 episodes a round: too few to tell one reward model from another
(a completion adapter retrained with another seed moves them by 10 points). This benchmark rolls a
finished demo run's policy out on held-out layouts (default 60, seeds 7000+: no demonstration, labelled
episode or demo rollout uses them), rendered and recorded as the demo's rollouts are (spread/rollouts.py),
then judges the recording with one or more reward models and prints, per model, the confusion matrix
against the simulator's ground truth, the recalls, progress VOC on the true successes, and the errors by
where the cube ended up (distance of the cube's centre from the target's; the task's success radius is
3 cm, so the bands around it are where a camera has the least to go on).

    python benchmarks/judge_heldout.py --demo-out out/demo
    python benchmarks/judge_heldout.py --demo-out out/demo --reward-model .cache/demo_reward/<key> ...
    python benchmarks/judge_heldout.py --demo-out out/demo --progress-success 0 0.9 0.95 0.99
    python benchmarks/judge_heldout.py --demo-out out/demo --reward-model <cache A> <cache B> --average

The recording is kept (--work, default out/judge_heldout/<policy>_<first>_<n>) and reused by later runs
with the same policy and layouts. Markdown tables on stdout, progress on stderr; --json keeps the rows.

What it is not: part of the demo or the tests (60 rendered episodes and a judge pass per model: minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the spread package beside this script

from spread.demo_run import REPO, DemoRun  # sets up the import paths and the offline env
from spread.rollouts import record_rollouts

# Final cube-to-target distance bands [cm]; 3 cm is the success radius.
BANDS = ((0.0, 2.0), (2.0, 3.0), (3.0, 4.5), (4.5, float("inf")))


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-out", type=Path, default=REPO / "out" / "demo", help="a finished demo run")
    p.add_argument(
        "--policy",
        default=None,
        help="policy version in the run's store: v0002 or act_so101/v0002 (default: the run's first, v0001)",
    )
    p.add_argument("--first-seed", type=int, default=7000, help="first held-out layout")
    p.add_argument("--episodes", type=int, default=60, help="held-out layouts (episodes)")
    p.add_argument(
        "--reward-model",
        type=Path,
        nargs="*",
        default=None,
        help="reward models to compare: .cache/demo_reward/<key> folders or adapter folders; a folder "
        "holding base/ next to adapters/ is judged on that base (default: the run's own)",
    )
    p.add_argument(
        "--average",
        action="store_true",
        help="one more row: the given reward models' answers averaged (lrm-judge --adapters given once per "
        "model; they must share a base)",
    )
    p.add_argument("--threshold", type=float, default=None, help="P(done) threshold (default: the run's)")
    p.add_argument(
        "--progress-success",
        type=float,
        nargs="*",
        default=None,
        help="final progress that is a success alone (lrm-judge --progress-success-threshold); several "
        "values are compared side by side, <= 0 means completion alone (default: the run's)",
    )
    p.add_argument("--work", type=Path, default=None, help="where the held-out recording is kept")
    p.add_argument("--json", type=Path, default=None, help="write every judged row here")
    return p


def reward_models(run: DemoRun, given: list[Path] | None) -> list[tuple[str, dict]]:
    """(label, {base, adapters}) per reward model; the run's own when none is given."""
    if not given:
        return [("the run's", run.reward)]
    out = []
    for path in given:
        adapters = path / "adapters" if (path / "adapters").is_dir() else path
        missing = [m for m in ("progress", "completion") if not (adapters / m).is_dir()]
        if missing:
            raise SystemExit(
                f"{path}: no {' / '.join(missing)} adapter (give a reward cache or adapter folder)"
            )
        label = path.name if path.name != "adapters" else path.parent.name
        # A reward folder may bring its own base (e.g. one whose processor sizes frames differently).
        own_base = adapters.parent / "base"
        base = str(own_base) if (own_base / "config.json").is_file() else run.reward["base"]
        out.append((label, {"base": base, "adapters": str(adapters)}))
    return out


def averaged(models: list[tuple[str, dict]]) -> tuple[str, dict]:
    """The reward models as one row whose answers lrm-judge averages; they must share one base."""
    bases = {model["base"] for _, model in models}
    if len(models) < 2 or len(bases) != 1:
        raise SystemExit(f"--average needs two or more reward models on one base (got bases {sorted(bases)})")
    label = "average of " + " + ".join(label for label, _ in models)
    return label, {"base": bases.pop(), "adapters": [model["adapters"] for _, model in models]}


def held_out_recording(run: DemoRun, args) -> tuple[Path, list[dict]]:
    """Record the policy on the held-out layouts once; later runs read the kept rows."""
    done = json.loads((run.out / "state.json").read_text())["done"]
    store = Path(done["policy"]["store"])
    name = done["policy"]["version"].split("/")[0]  # the run's first version: name/vNNNN
    version = args.policy or done["policy"]["version"]
    if "/" not in version:  # a bare vNNNN names a version of the run's policy
        version = f"{name}/{version}"
    policy = store / version
    if not (policy / "model.safetensors").is_file() and not any(policy.glob("**/model.safetensors")):
        from lrm_reward.refinement.policy_store import PolicyStore

        found = [v.ref for v in PolicyStore(store, name).versions()]
        raise SystemExit(f"{policy}: no policy checkpoint (in {store}: {', '.join(found) or 'no versions'})")
    layouts = list(range(args.first_seed, args.first_seed + args.episodes))
    work = (
        args.work
        or REPO / "out" / "judge_heldout" / f"{version.replace('/', '_')}_{layouts[0]}_{len(layouts)}"
    )
    rows_file = work / "rows.json"
    if rows_file.is_file():
        print(f"reusing the held-out recording in {work}", file=sys.stderr)
        return work / "rollouts", json.loads(rows_file.read_text())
    s = run.settings
    print(f"recording {version} on layouts {layouts[0]}..{layouts[-1]} into {work}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):
        rows = record_rollouts(
            policy, layouts, s.max_steps, s.image_size, getattr(s, "camera_view", "workspace"), work,
            "rollouts", f"judge_heldout: {version}",
        )  # fmt: skip
    rows = [
        {**r, "distance_cm": d} for r, d in zip(rows, final_distances(work / "rollouts", rows), strict=True)
    ]
    rows_file.write_text(json.dumps(rows, indent=1))
    return work / "rollouts", rows


def final_distances(dataset: Path, rows: list[dict]) -> list[float]:
    """The cube's centre from the target's on each episode's final frame [cm], from the recorded env state."""
    import numpy as np
    import pandas as pd

    from lrm_reward.sim.so101_scene import ENV_STATE_NAMES

    ix = ENV_STATE_NAMES.index("goal_from_cube_x"), ENV_STATE_NAMES.index("goal_from_cube_y")
    frames = pd.concat(pd.read_parquet(f) for f in sorted((dataset / "data").glob("*/*.parquet")))
    out = []
    for r in rows:
        last = frames[frames.episode_index == r["episode_index"]].iloc[-1]
        state = np.asarray(last["observation.environment_state"], dtype=float)
        out.append(round(float(np.hypot(state[ix[0]], state[ix[1]])) * 100, 2))
    return out


def band_text(rows: list[dict], lo: float, hi: float) -> str:
    inside = [r for r in rows if lo <= r["distance_cm"] < hi]
    wrong = sum(r["judged_success"] != r["success"] for r in inside)
    return f"{wrong}/{len(inside)}" if inside else "-"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    run = DemoRun(args.demo_out, needs=("demos", "reward", "policy"))
    models = reward_models(run, args.reward_model)
    if args.average:
        models.append(averaged(models))
    dataset, rows = held_out_recording(run, args)
    settings = SimpleNamespace(
        **{**run.settings_dict, "judge_threshold": args.threshold or run.settings.judge_threshold}
    )
    rules = [getattr(settings, "judge_progress_success", None)]
    if args.progress_success is not None:
        rules = [v if v > 0 else None for v in args.progress_success]

    from lrm_demo.judging import judge

    by_band = " | ".join(
        f"wrong {lo:g}-{hi:g} cm" if hi != float("inf") else f"wrong >{lo:g} cm" for lo, hi in BANDS
    )
    successes = sum(r["success"] for r in rows)
    print(
        f"\n{len(rows)} held-out episodes ({successes} successes, simulator's ground truth), judge threshold "
        f"{settings.judge_threshold}\n"
    )
    print(
        f"| reward model | progress alone | judge right | recall successes / failures | TP FP FN TN | VOC "
        f"| {by_band} |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(BANDS))
    kept = {}
    for (label, model), rule in itertools.product(models, rules):
        settings.judge_progress_success = rule
        with contextlib.redirect_stdout(sys.stderr):
            res = judge(settings, model, {"dataset": str(dataset), "episodes": rows})
        m = res["matrix"]
        bands = " | ".join(band_text(res["rows"], lo, hi) for lo, hi in BANDS)
        voc = "-" if res["voc"] is None else f"{res['voc']:.2f}"
        print(
            f"| {label} | {'off' if rule is None else f'>= {rule:g}'} | {pct(res['accuracy'])} "
            f"| {pct(res['recall_success'])} / {pct(res['recall_failure'])} "
            f"| {m['tp']} {m['fp']} {m['fn']} {m['tn']} | {voc} | {bands} |",
            flush=True,
        )
        kept[label if len(rules) == 1 else f"{label}, progress alone {rule}"] = {
            "base": model["base"],
            "adapters": model["adapters"],
            "progress_success": rule,
            **{k: v for k, v in res.items() if k != "rows"},
            "rows": res["rows"],
        }
    if args.json:
        args.json.write_text(json.dumps(kept, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
