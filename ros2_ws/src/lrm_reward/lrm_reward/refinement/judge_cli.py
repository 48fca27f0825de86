"""``lrm-judge``: judge recorded datasets from the command line, with a model loaded here (--model) or through
the running reward node's judge action (--via-node: no second copy of the model). The judging itself is
lrm_reward.refinement.judge; this module only parses, reports and sets the exit status (0 all judged, 1 a
dataset or the model failed, 2 bad arguments, 130 interrupted).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lrm_reward.core.backend_arguments import add_backend_arguments, backend_settings
from lrm_reward.core.engine_config import ensemble_names
from lrm_reward.refinement.data_root import OutsideDataRootError, resolve_inside
from lrm_reward.refinement.judge import (
    DatasetNotFoundError,
    JudgeBusyError,
    JudgeConfig,
    calibrate_against_operator,
    judge_dataset,
    parse_adapters,
)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-judge", description="Judge recorded episodes with the reward model."
    )
    p.add_argument("dataset", nargs="+", help="dataset folder(s) written by the refinement node")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="load this base model (folder or Hub id, Qwen3-VL) in this process")
    which.add_argument(
        "--via-node",
        metavar="NODE",
        help="load no model: judge through the running reward node's judge action (e.g. /reward_node, or "
        "the action's full name); datasets must be inside that node's judge.data_root",
    )
    p.add_argument(
        "--server-timeout", type=float, default=30.0, help="[s] --via-node: wait this long for the node"
    )
    p.add_argument(
        "--adapters",
        action="append",
        default=None,
        help="'progress=DIR,completion=DIR' or a folder of adapters; given again, a further set on the same "
        "base whose answers are averaged with the first's (e.g. a model trained on operator labels of the "
        "robot's own episodes beside one trained on demonstrations); --model only",
    )
    p.add_argument(
        "--processor", default=None, help="processor folder (default: the base, else an adapter folder)"
    )
    p.add_argument("--device", default="cpu", help="--model: torch device")
    p.add_argument("--dtype", default="auto", help="--model: weights dtype")
    p.add_argument("--readout", default="logits", choices=["logits", "generate"], help="--model: readout")
    p.add_argument("--episodes", default=None, help="comma-separated episode indices (default: all)")
    p.add_argument("--force", action="store_true", help="judge again even if a judgment exists")
    p.add_argument("--last-n", type=int, default=JudgeConfig.completion_last_n)
    p.add_argument("--every-k", type=int, default=JudgeConfig.curve_every_k)
    p.add_argument("--success-threshold", type=float, default=JudgeConfig.success_threshold)
    p.add_argument("--progress-threshold", type=float, default=None)
    p.add_argument(
        "--progress-success-threshold",
        type=float,
        default=None,
        help="final progress at or above this is a success even when completion falls short (default: off)",
    )
    p.add_argument("--camera", default=None, help="camera name (default: the first)")
    p.add_argument("--skip-partial", action="store_true")
    p.add_argument("--data-root", default=None, help="refuse datasets outside this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_backend_arguments(p)  # --backend vllm --server URL: a shared vLLM server answers (docs/vllm.md)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = JudgeConfig(
            completion_last_n=args.last_n,
            curve_every_k=args.every_k,
            success_threshold=args.success_threshold,
            progress_threshold=args.progress_threshold,
            progress_success_threshold=args.progress_success_threshold,
            camera=args.camera,
            skip_partial=args.skip_partial,
        )
        adapter_sets = [a for a in (parse_adapters(spec) for spec in args.adapters or []) if a]
        if len(adapter_sets) > 1:
            if args.via_node or args.backend != "local":
                raise ValueError("several --adapters are averaged by a model loaded here (--model) only")
            for k, later in enumerate(adapter_sets[1:], start=2):
                if set(later) != set(adapter_sets[0]):
                    raise ValueError(
                        f"--adapters set {k} has {sorted(later)}, set 1 has {sorted(adapter_sets[0])}: "
                        "give every averaged set the same modalities"
                    )
        adapters = ensemble_names(adapter_sets) if adapter_sets else None
        episodes = [int(x) for x in args.episodes.split(",")] if args.episodes else None
    except ValueError as exc:
        print(f"lrm-judge: {exc}", file=sys.stderr)
        return 2
    if args.via_node:
        return _main_via_node(args, cfg, episodes)
    from lrm_reward.core.engine import EngineConfig, make_engine
    from lrm_reward.core.loading import ModelLoadError
    from lrm_reward.core.types import Readout

    try:
        engine = make_engine(
            EngineConfig(
                base_model=args.model,
                adapters=adapters,
                device=args.device,
                dtype=args.dtype,
                readout=Readout(args.readout),
                processor=args.processor,
                **backend_settings(args),
            )
        )
    except (ModelLoadError, ValueError) as exc:  # one line, not a traceback: the message names the fix
        print(f"lrm-judge: cannot load the reward model: {exc}", file=sys.stderr)
        return 1
    status = 0
    try:
        for ds in args.dataset:
            try:
                res = judge_dataset(
                    ds,
                    engine,
                    cfg,
                    episodes=episodes,
                    force=args.force,
                    progress_bar=not args.quiet,
                    data_root=args.data_root,
                )
            except (
                OutsideDataRootError,
                DatasetNotFoundError,
                IndexError,
                JudgeBusyError,
                ValueError,
            ) as exc:
                print(f"lrm-judge: {ds}: {exc}", file=sys.stderr)
                status = 1
                continue
            ok = sum(j.success for j in res.judged)
            print(
                f"{res.dataset}: judged {len(res.judged)} (successes {ok}), "
                f"skipped {len(res.skipped)} already judged"
            )
            _print_calibration(ds, Path(res.dataset), cfg)
    finally:
        engine.close()
    return status


def _main_via_node(args: argparse.Namespace, cfg: JudgeConfig, episodes: list[int] | None) -> int:
    """lrm-judge --via-node: every dataset judged by the reward node's loaded model, one goal each."""
    from lrm_reward.ros.judge_action import R, judge_via_node  # rclpy: only here

    datasets = []
    status = 0
    for ds in args.dataset:
        try:  # refuse here what the local check refuses, before bothering the node
            datasets.append(str(resolve_inside(args.data_root, ds) if args.data_root else Path(ds).resolve()))
        except OutsideDataRootError as exc:
            print(f"lrm-judge: {ds}: {exc}", file=sys.stderr)
            status = 1

    def say(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    try:
        outcomes = judge_via_node(
            args.via_node, datasets, cfg, episodes, args.force, args.server_timeout, say
        )
    except KeyboardInterrupt:
        print("lrm-judge: interrupted; the episodes judged so far are stored", file=sys.stderr)
        return 130
    for ds, _status, result, error in outcomes:
        if result is None:
            print(f"lrm-judge: {ds}: {error}", file=sys.stderr)
            status = 1
            continue
        if result.result != R.RESULT_OK:
            print(f"lrm-judge: {ds}: {args.via_node}: {result.message}", file=sys.stderr)
            status = 1
            continue
        ok = sum(1 for j in result.judgments if j.success)
        print(
            f"{result.dataset}: judged {result.judged} by {args.via_node} (successes {ok} of "
            f"{len(result.judgments)} stored), skipped {result.reused} already judged"
        )
        _print_calibration(ds, Path(result.dataset), cfg)
    if len(outcomes) < len(datasets):
        status = 1  # the server went missing: the remaining datasets were not tried
    return status


def _print_calibration(ds: str, dataset: Path, cfg: JudgeConfig) -> None:
    """Where the operator labelled episodes, how the judge compares; never fails the night."""
    try:
        print(f"{dataset}: {calibrate_against_operator(dataset, cfg)}")
    except Exception as exc:  # the judgments are written; a failed plot must not fail the night
        print(f"lrm-judge: {ds}: comparing with operator labels failed: {exc!r}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
