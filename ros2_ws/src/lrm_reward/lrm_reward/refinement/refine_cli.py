"""lrm-refine's command line: fine-tune the current policy on judged episodes into a new version.

The work itself is refine.py (`refine`, `import_checkpoint`); this module only turns arguments into a
RefineConfig and results into exit codes and one summary line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lrm_reward.refinement import dense_weights
from lrm_reward.refinement.policy_store import CorruptCheckpointError, StoreBusyError
from lrm_reward.refinement.refine import (
    LR_CONSTANT,
    LR_SCHEDULES,
    NothingToTrainError,
    RefineConfig,
    import_checkpoint,
    refine,
)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-refine", description="Fine-tune the current policy on judged successes into a new version."
    )
    p.add_argument("datasets", nargs="*", help="judged dataset folders (their successes are used)")
    p.add_argument("--store", required=True, help="policy store root (holds <policy>/vNNNN)")
    p.add_argument("--policy", required=True, help="policy name inside the store")
    p.add_argument("--demos", nargs="*", default=[], help="demonstration datasets (all episodes used)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=LR_CONSTANT,
        help="constant: --lr every step; cosine: warmup, then decay to zero by the last step",
    )
    p.add_argument(
        "--warmup-steps", type=int, default=None, help="--lr-schedule cosine (default: 5%% of --steps)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--min-confidence", type=float, default=0.0)
    p.add_argument(
        "--selection",
        choices=dense_weights.SELECTIONS,
        default=dense_weights.SELECTION_FILTER,
        help="filter (default): judged successes only; weighting: every episode, frames weighted by the "
        "reward model's progress (RA-BC); both: judged successes at full weight, the rest weighted",
    )
    p.add_argument(
        "--min-frame-weight",
        type=float,
        default=RefineConfig.min_frame_weight,
        help="floor under a progress-weighted frame (failures weigh little, not nothing)",
    )
    p.add_argument("--include-partial", action="store_true")
    p.add_argument("--ignore-operator-labels", action="store_true")
    p.add_argument("--from-scratch", action="store_true", help="start a new policy (no current version)")
    p.add_argument("--policy-type", default="act", help="lerobot policy type for --from-scratch")
    p.add_argument(
        "--policy-config",
        default=None,
        help="JSON object of config fields for --from-scratch, e.g. chunk_size",
    )
    p.add_argument(
        "--policy-inputs",
        nargs="+",
        default=None,
        help="observation features the policy reads, e.g. observation.state observation.environment_state "
        "(default: all of the data's for --from-scratch, the current version's otherwise)",
    )
    p.add_argument(
        "--import-checkpoint",
        default=None,
        help="add a lerobot pretrained_model folder as a new version, then exit",
    )
    p.add_argument(
        "--cache-frames",
        action="store_true",
        help="fetch each selected frame once and train from RAM (small datasets, state-only policies)",
    )
    p.add_argument("--no-promote", action="store_true", help="write the version but keep `current`")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.import_checkpoint:
        try:
            version = import_checkpoint(
                Path(args.store), args.policy, Path(args.import_checkpoint), not args.no_promote
            )
        except (StoreBusyError, CorruptCheckpointError, OSError) as exc:
            print(f"lrm-refine: {exc}", file=sys.stderr)
            return 1
        print(f"imported {args.import_checkpoint} as {version.ref}")
        return 0
    try:
        cfg = RefineConfig(
            store_root=Path(args.store),
            policy_name=args.policy,
            datasets=args.datasets,
            demos=args.demos,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            device=args.device,
            seed=args.seed,
            num_workers=args.num_workers,
            min_confidence=args.min_confidence,
            selection=args.selection,
            min_frame_weight=args.min_frame_weight,
            include_partial=args.include_partial,
            respect_operator_labels=not args.ignore_operator_labels,
            from_scratch=args.from_scratch,
            policy_type=args.policy_type,
            policy_overrides=json.loads(args.policy_config) if args.policy_config else {},
            policy_inputs=tuple(args.policy_inputs) if args.policy_inputs else None,
            cache_frames=args.cache_frames,
            promote=not args.no_promote,
            report=not args.no_report,
            progress_bar=not args.quiet,
        )
        result = refine(cfg)
    except (
        StoreBusyError,
        CorruptCheckpointError,
        NothingToTrainError,
        ValueError,  # NoProgressError included
        FileNotFoundError,
    ) as exc:
        print(f"lrm-refine: {exc}", file=sys.stderr)
        return 1
    sel = result.selection
    weighted = sum(1 for r in sel.kept if r.get("weight") == dense_weights.WEIGHT_PROGRESS)
    print(
        f"new version {result.version.ref} from {result.parent or 'scratch'}: selection {sel.mode}, "
        f"{sel.num_episodes} episodes ({weighted} weighted by progress, {len(sel.rejected)} rejected), "
        f"final loss {result.losses[-1]:.4f}, {'promoted to current' if result.promoted else 'not promoted'}"
    )
    if result.report:
        print(f"report: {result.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
