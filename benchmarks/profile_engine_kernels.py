#!/usr/bin/env python3
"""Which operators a steady-state prefix-cache progress call spends its time in (torch.profiler).

Complements profile_engine_stages.py (wall time per stage) with the operator table of one batch size:
CUDA time and CPU time per operator, top rows by total device time. Not a test; random weights.
    python benchmarks/profile_engine_kernels.py --shape 8b --batch 32
    python benchmarks/profile_engine_kernels.py --shape 8b --smoke --batch 4   # toy width, CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_engine
import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from lrm_reward.core.types import Modality


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=("8b",), default="8b")
    parser.add_argument("--smoke", action="store_true", help="toy width, runs on a CPU")
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    engine = bench_engine.build_8b_engine(
        args.smoke, device, 64, prefix_cache_entries=256, prefix_cache_bytes=16 * bench_engine.GIB
    )
    rng = np.random.default_rng(0)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for batch in args.batch:
        initials = bench_engine.frames(rng, batch)
        engine.score(bench_engine.stream_queries(Modality.PROGRESS, batch, rng, initials))  # prefixes cached
        queries = [bench_engine.stream_queries(Modality.PROGRESS, batch, rng, initials) for _ in range(3)]
        engine.score(queries[0])
        if cuda:
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            for q in queries[1:]:
                engine.score(q)
            if cuda:
                torch.cuda.synchronize()
        print(f"\n# prefix-cache, progress, batch {batch}, 2 calls, sorted by {sort}", flush=True)
        print(
            prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60), flush=True
        )


if __name__ == "__main__":
    main()
