#!/usr/bin/env python3
"""Where a logits-readout query spends its time, per engine path and batch size.

Stages: prompt text (chat template), processor + transfer (image resize/normalise), and the model passes:
plain path = prompt pass + separate candidate-trie pass; fast path = prefix pass (only on a cache miss)
+ one suffix pass that also scores the candidates. Each row is its own stream (its own initial frame);
the prefix-cache path is measured in steady state (prefixes cached by the warm-up call).

What this is for: choosing what to attack next. Not a test; random (8b) or toy (tiny) weights.
    python benchmarks/profile_engine_stages.py --shape 8b           # CUDA, 8B shape, all three paths
    python benchmarks/profile_engine_stages.py --shape 8b --smoke   # toy width on a CPU, to check the script
    python benchmarks/profile_engine_stages.py --shape tiny         # tiny model on the CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine
import numpy as np
import torch

from lrm_reward.core import readouts
from lrm_reward.core.engine import LocalRewardEngine
from lrm_reward.core.fast_readout import FastLogitsReadout
from lrm_reward.core.types import Modality

STAGES: dict[str, list[float]] = defaultdict(list)
PATHS = {
    "plain": dict(fast_path=False),
    "one-pass": dict(prefix_cache=False),
    "prefix-cache": dict(prefix_cache_entries=256, prefix_cache_bytes=16 * bench_engine.GIB),
}


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        STAGES[name].append(time.perf_counter() - start)
        return result

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("tiny", "8b"), default="8b")
    parser.add_argument("--smoke", action="store_true", help="with --shape 8b: toy width, runs on a CPU")
    parser.add_argument("--paths", nargs="+", choices=tuple(PATHS), default=list(PATHS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not (args.smoke or args.shape == "tiny") else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
    loaded = (
        bench_engine.build_8b_model(args.smoke, device, r=64)
        if args.shape == "8b"
        else bench_engine.build_tiny_model(device)
    )
    readouts.prompt_text = timed("prompt text (chat template)", readouts.prompt_text)
    readouts.encode_images = timed("processor + to(device)", readouts.encode_images)
    readouts._score_trie_nodes = timed("candidate trie pass (plain)", readouts._score_trie_nodes)
    FastLogitsReadout._prefix_pass = timed("prefix pass (cache miss)", FastLogitsReadout._prefix_pass)
    FastLogitsReadout._suffix_pass = timed(
        "suffix + candidates pass (net of processor)", FastLogitsReadout._suffix_pass
    )
    rng = np.random.default_rng(0)
    initials = bench_engine.frames(rng, max(args.batches))
    print(f"# stage profile on {bench_engine.describe_device(device)}, shape {args.shape}")
    print("| path | batch | stage | ms per batch (median call) | share of total |")
    print("|---|---|---|---|---|")
    for path in args.paths:
        cfg = bench_engine.base_config(loaded, args.shape, args.smoke, 64, **PATHS[path])
        engine = LocalRewardEngine(cfg, loaded=loaded)
        for batch in args.batches:
            queries = bench_engine.stream_queries(Modality.PROGRESS, batch, rng, initials)
            engine.score(queries)  # warm-up (and fills the prefix cache)
            STAGES.clear()
            totals = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                engine.score(queries)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                totals.append(time.perf_counter() - start)
            total = statistics.median(totals)
            accounted = 0.0
            for name, times in STAGES.items():
                per_batch = sum(times) / args.repeats
                # the suffix pass includes its own processor call, already counted above: show it net
                if name.startswith("suffix"):
                    per_batch -= sum(STAGES.get("processor + to(device)", [])) / args.repeats
                accounted += per_batch
                print(f"| {path} | {batch} | {name} | {per_batch * 1e3:.1f} | {per_batch / total:.0%} |")
            rest = total - accounted
            label = "prompt pass + rest" if path == "plain" else "rest (hashing, cache, readout)"
            print(f"| {path} | {batch} | {label} | {rest * 1e3:.1f} | {rest / total:.0%} |")
            print(f"| {path} | {batch} | **total** | {total * 1e3:.1f} | 100% ({batch / total:.1f} q/s) |")


if __name__ == "__main__":
    main()
