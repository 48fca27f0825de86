"""`lrm-import-bag`'s command line: arguments -> a MappingSpec and an ImportConfig, results -> exit codes.

The import itself is importer.py (`import_bags`, `plan_episodes`); `--dry-run` prints what it would import
(mapping, episodes) without writing anything.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from lrm_reward.bags.bag_source import BagError, BagSource, describe_time
from lrm_reward.bags.episode_windows import task_in_effect
from lrm_reward.bags.importer import (
    EXIT_NOTHING,
    EXIT_OK,
    EXIT_USAGE,
    ImportConfig,
    ImportRefused,
    import_bags,
    plan_episodes,
)
from lrm_reward.bags.mapping import MappingError, MappingSpec, load_mapping, resolve_mapping


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-import-bag",
        description="Import rosbag2 recordings (MCAP or sqlite3) into a new LeRobotDataset in the recorder's "
        "layout (lrm-judge, lrm-refine, lrm-train-reward and lerobot read it unchanged).",
        epilog="Exit status: 0 all imported; 1 nothing written; 2 bad arguments or mapping; "
        "3 dataset written but some episodes or bags failed (listed, and in recording/import.json).",
    )
    p.add_argument("bags", nargs="+", type=Path, help="rosbag2 folder(s), or .mcap / .db3 file(s)")
    p.add_argument(
        "-o", "--output", required=True, type=Path, help="dataset folder to create (must not exist)"
    )
    p.add_argument(
        "-m", "--mapping", type=Path, default=None, help="mapping YAML (docs/bags.md); default: by type"
    )
    p.add_argument(
        "--task", default=None, help="task of every episode (unless a marker or task topic names one)"
    )
    p.add_argument(
        "--fps", type=int, default=None, help="dataset frame rate (default: the mapping's, else 30)"
    )
    p.add_argument("--split", choices=["bag", "gap", "marker"], default=None, help="how episodes are found")
    p.add_argument("--marker", default=None, help="marker topic (implies --split marker)")
    p.add_argument(
        "--marker-at", choices=["start", "end"], default=None, help="a marker starts or ends an episode"
    )
    p.add_argument("--gap-s", type=float, default=None, help="--split gap: silence that ends an episode [s]")
    p.add_argument("--stamps", choices=["header", "receive"], default=None, help="which time to resample by")
    p.add_argument(
        "--skip-bad-messages", action="store_true", help="drop and count bad messages, keep the episode"
    )
    p.add_argument("--strict", action="store_true", help="write nothing unless every episode imports")
    p.add_argument("--no-videos", action="store_true", help="store PNG frames in parquet instead of video")
    p.add_argument("--vcodec", default="libsvtav1", help="video codec (lerobot's list; h264 encodes fastest)")
    p.add_argument("--robot-type", default=None)
    p.add_argument("--dry-run", action="store_true", help="print the mapping and episodes, write nothing")
    return p


def spec_from_args(args: argparse.Namespace) -> MappingSpec:
    spec = load_mapping(args.mapping)
    overrides: dict[str, Any] = {}
    if args.task is not None:
        overrides["task"] = args.task
    if args.fps is not None:
        overrides["fps"] = args.fps
    if args.marker is not None:
        overrides.update(marker=args.marker, split="marker")
    for key in ("split", "marker_at", "gap_s", "stamps"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.skip_bad_messages:
        overrides["on_bad_message"] = "skip"
    return replace(spec, **overrides) if overrides else spec


def dry_run(bags: list[Path], spec: MappingSpec) -> int:
    status = EXIT_OK
    for bag in bags:
        try:
            with BagSource(bag) as source:
                mapping = resolve_mapping(spec, source.topics)
                plan, tasks = plan_episodes(source, mapping, spec)
                seconds = (source.end_ns - source.start_ns) * 1e-9
                print(f"{bag} ({source.storage}, {source.message_count} messages, {seconds:.1f} s)")
                for feature, topic in mapping.feature_topics().items():
                    count = source.counts.get(topic, 0)
                    print(f"  {feature:<36} <- {topic} ({source.topics.get(topic)}, {count} messages)")
                for i, w in enumerate(plan.windows):
                    task = w.task or task_in_effect(tasks, w) or spec.task or "(no task!)"
                    when = f"{describe_time(w.start_ns)} +{w.duration_s:.2f} s"
                    print(f"  episode {i}: {when}, task {task!r}, outcome {w.outcome}")
                for note in plan.notes:
                    print(f"  note: {note}")
        except (BagError, MappingError) as exc:
            print(f"lrm-import-bag: {exc}", file=sys.stderr)
            status = EXIT_NOTHING
    return status


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = spec_from_args(args)
        if args.dry_run:
            return dry_run(args.bags, spec)
        cfg = ImportConfig(
            output=args.output,
            mapping=spec,
            use_videos=not args.no_videos,
            video_codec=args.vcodec,
            robot_type=args.robot_type,
            strict=args.strict,
        )
        report = import_bags(args.bags, cfg)
    except (MappingError, ImportRefused) as exc:
        print(f"lrm-import-bag: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # the output's folder not writable, the disk full before any episode was saved
        print(f"lrm-import-bag: {exc}; nothing written", file=sys.stderr)
        return EXIT_NOTHING
    except KeyboardInterrupt:
        print("lrm-import-bag: interrupted; nothing written", file=sys.stderr)
        return EXIT_NOTHING
    for bag in report.failed_bags:
        print(f"lrm-import-bag: FAILED bag: {bag.error}", file=sys.stderr)
    for ep in report.failed:
        print(f"lrm-import-bag: FAILED episode: {ep.message}", file=sys.stderr)
    print(f"{report.message} ({report.elapsed_s:.1f} s)")
    return report.exit_code()


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
