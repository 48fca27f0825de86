#!/usr/bin/env python
"""The demo's reward model made again from its cached labelled episodes, with other seeds or step counts.

The demo makes its reward model from labelled simulator episodes (scripts/lrm_demo/reward_model.py,
train_reward_model): its recipe (config/demo_reward_train.yaml) on the tiny base, then the completion adapter
again on a copy of the base whose vision tower first learnt to locate cube and target on the episodes' frames
(scripts/lrm_demo/base_vision.py). This script repeats that on a cached model's data with another seed, so a
result can be checked over seeds without re-recording: the output folder holds base/ and adapters/, which
`judge_heldout.py --reward-model <out>` judges on that base.

    python benchmarks/reward_model_seed.py --reward-cache .cache/demo_reward/<key> --out out/seed1 --seed 1

Minutes of CPU (about 15 on the 2-core build machine); not part of the tests. Results: docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(REPO / "scripts"))

# base_vision imports nothing of Hugging Face at import time; common switches it offline before main runs
from lrm_demo.base_vision import VISION_PRETRAIN_STEPS  # noqa: E402
from lrm_demo.common import REWARD_RECIPE  # noqa: E402


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--reward-cache",
        type=Path,
        required=True,
        help="a .cache/demo_reward/<key> folder (its data/part*/reward_episodes)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for base/ and adapters/")
    p.add_argument(
        "--steps", type=int, default=VISION_PRETRAIN_STEPS, help="vision pretraining steps (batch 32)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the vision pretraining and the recipe's top-level seed (LoRA and head initialisation, "
        "batch order); which frames become samples (the recipe's samples.seed) stays the recipe's",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import json

    import yaml
    from lrm_demo.common import DemoError
    from lrm_demo.reward_model import tiny_base_model, train_reward_model

    args = build_arg_parser().parse_args(argv)
    args.out = args.out.resolve()  # the recipe files written there name absolute paths
    parts = sorted(p.resolve() for p in (args.reward_cache / "data").glob("part*/reward_episodes"))
    if not parts:
        raise SystemExit(f"{args.reward_cache}/data: no labelled episodes (part*/reward_episodes)")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise SystemExit(f"{args.out}: exists and is not an empty folder; give a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    recipe = yaml.safe_load(REWARD_RECIPE.read_text())
    try:
        vision = train_reward_model(args.out, parts, recipe, tiny_base_model(), args.steps, args.seed)
    except (DemoError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    made = {"seed": args.seed, "base_vision": vision, "wall_s": time.monotonic() - t0}
    (args.out / "made.json").write_text(json.dumps(made, indent=1))
    print(f"reward model in {made['wall_s']:.0f} s: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
