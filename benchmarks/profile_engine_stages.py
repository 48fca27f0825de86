#!/usr/bin/env python3
"""Where a logits-readout query spends its time: prompt building + image preprocessing, the prefix forward
pass, and the candidate (trie) scoring pass — per batch size, at the Qwen3-VL-8B shape on a GPU.

What this is for: choosing what the GPU fast path must attack first. Not a test; random weights.
    python benchmarks/profile_engine_stages.py            # CUDA, 8B shape
    python benchmarks/profile_engine_stages.py --smoke    # toy width on a CPU, to check the script
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
from lrm_reward.core.types import Modality

STAGES: dict[str, list[float]] = defaultdict(list)


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
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    engine = bench_engine.build_8b_engine(args.smoke, device, r=64)
    readouts.prompt_text = timed("prompt text (chat template)", readouts.prompt_text)
    readouts.encode_batch = timed("processor + to(device)", readouts.encode_batch)
    readouts._score_trie_nodes = timed("candidate trie pass", readouts._score_trie_nodes)
    rng = np.random.default_rng(0)
    print(f"# stage profile: {engine.model_id} on {bench_engine.describe_device(device)}")
    print("| batch | stage | ms per batch (median) | share of total |")
    print("|---|---|---|---|")
    for batch in args.batches:
        queries = bench_engine.make_queries(Modality.PROGRESS, batch, rng)
        engine.score(queries)  # warm-up
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
            accounted += per_batch
            print(f"| {batch} | {name} | {per_batch * 1e3:.1f} | {per_batch / total:.0%} |")
        rest = total - accounted
        print(f"| {batch} | prefix forward + rest | {rest * 1e3:.1f} | {rest / total:.0%} |")
        print(f"| {batch} | **total** | {total * 1e3:.1f} | 100% ({batch / total:.1f} q/s) |")


if __name__ == "__main__":
    main()
