#!/usr/bin/env python3
"""Many robots, one server: N simulated robots (camera streams) against one vLLM server, versus each robot
with its own local engine -- same tiny model, same machine, one run, one table.

What this is for: showing the fleet backend's mechanism (issue 17): with ``backend: vllm`` the robots'
queries meet in one server that batches them (and reuses each episode's prompt prefix from its cache),
where local engines each hold a model and compete for the same cores. Columns: aggregate queries/s,
p50/p95 latency of one query (a robot's ``score([query])`` call), memory (the robots' summed RSS: local
engines hold a model each; the server's RSS: one copy for all), failed calls, and the machine's load.

Each robot is its own process (as on a real fleet, each robot runs its own client or engine), with its own
task and initial frame, asking closed-loop: the next query as soon as the last one answered, for
``--seconds`` after a common start. Progress queries by default ([initial, current] frame; several tokens,
so the vLLM backend sends two or more requests a query); ``--modality completion`` for one-token answers.

CPU NUMBERS SHOW THE MECHANISM, NOT GPU CAPACITY: on this 2-core machine the tiny model's forward costs
next to nothing, so what is measured is HTTP, image encoding, scheduling and process overheads. GPU
capacity for the 8B is estimated in docs/vllm.md (marked as an estimate).

    python benchmarks/bench_vllm_fleet.py                    # 1, 2, 4, 8 streams, 15 s each (~6 min)
    python benchmarks/bench_vllm_fleet.py --streams 1,4 --seconds 5
Needs .venv-vllm (scripts/setup_vllm.sh). Loopback only.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))
for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_name, _value)

TINY_CACHE = REPO / ".cache" / "tiny_lrm"
BENCH_CACHE = REPO / ".cache" / "vllm_bench"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
FRAMES_PER_ROBOT = 24


@dataclass
class RobotResult:
    latencies: list[float]
    failed: int
    rss_bytes: int
    setup_s: float


def robot(mode: str, engine_settings: dict, modality: str, index: int, start_at, seconds: float, out) -> None:
    """One simulated robot: make an engine, warm it up, wait for the common start, ask until the end."""
    import numpy as np
    import psutil

    from lrm_reward.core import tiny_model
    from lrm_reward.core.engine import EngineConfig, make_engine
    from lrm_reward.core.types import Modality, Query

    started = time.monotonic()
    if mode == "local":
        import torch

        torch.set_num_threads(1)
    engine = make_engine(EngineConfig(**engine_settings))
    rng = np.random.default_rng(100 + index)
    task = tiny_model.TINY_TASKS[index % len(tiny_model.TINY_TASKS)]
    initial = tiny_model.synthetic_frame(0.05, rng, size=(480, 640))
    frames = [
        tiny_model.synthetic_frame(i / FRAMES_PER_ROBOT, rng, size=(480, 640))
        for i in range(FRAMES_PER_ROBOT)
    ]
    kind = Modality(modality)

    def query(i: int) -> Query:
        current = frames[i % len(frames)]
        return Query(kind, task, [initial, current] if kind is Modality.PROGRESS else [current])

    for i in range(2):  # warm-up: the server's lazy init, the local engine's first pass and prefix cache
        engine.score([query(i)])
    setup_s = time.monotonic() - started
    out.put(("ready", index))
    while time.time() < start_at.value or start_at.value == 0:
        time.sleep(0.005)
    end = start_at.value + seconds
    latencies, failed, i = [], 0, 0
    while time.time() < end:
        t0 = time.perf_counter()
        answer = engine.score([query(i)])[0]
        elapsed = time.perf_counter() - t0
        if time.time() <= end:
            if answer.parsed:
                latencies.append(elapsed)
            else:
                failed += 1
        i += 1
    rss = psutil.Process().memory_info().rss
    engine.close()
    out.put(("done", index, RobotResult(latencies, failed, rss, setup_s)))


def run_fleet(mode: str, engine_settings: dict, modality: str, streams: int, seconds: float) -> dict:
    context = mp.get_context("spawn")
    out = context.Queue()
    start_at = context.Value("d", 0.0)
    procs = [
        context.Process(
            target=robot, args=(mode, engine_settings, modality, i, start_at, seconds, out), daemon=True
        )
        for i in range(streams)
    ]
    for proc in procs:
        proc.start()
    ready = 0
    while ready < streams:
        message = out.get(timeout=600)
        ready += message[0] == "ready"
    start_at.value = time.time() + 0.5
    results = []
    while len(results) < streams:
        message = out.get(timeout=seconds + 300)
        if message[0] == "done":
            results.append(message[2])
    for proc in procs:
        proc.join(timeout=30)
    latencies = sorted(x for r in results for x in r.latencies)
    return {
        "queries": len(latencies),
        "qps": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p95_ms": 1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
        if latencies
        else float("nan"),
        "failed": sum(r.failed for r in results),
        "robots_rss": sum(r.rss_bytes for r in results),
        "setup_s": max(r.setup_s for r in results),
    }


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,2,4,8", help="comma-separated robot counts")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per row")
    parser.add_argument("--modality", choices=["progress", "completion"], default="progress")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    counts = [int(x) for x in args.streams.split(",")]

    import platform

    import torch

    from lrm_reward.core import tiny_model
    from lrm_reward.serving import vllm_server as S

    torch.set_num_threads(1)
    tiny = tiny_model.cached_tiny_lrm(TINY_CACHE, seed=0, variant="head32")
    adapter = str(tiny.adapters[args.modality])
    local = {"base_model": str(tiny.base), "adapters": {args.modality: adapter}, "dtype": "float32"}
    merged = None
    if args.modality == "progress":
        merged = BENCH_CACHE / f"merged-progress-{tiny_model.cache_key(0, 'head32')}"
        if not S.merged_is_current(merged, str(tiny.base), adapter):
            S.merge_adapter(str(tiny.base), adapter, merged)

    print(f"# bench_vllm_fleet: {args.modality} queries, 640x480 frames, tiny Qwen3-VL (head_dim 32, fp32)")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores; {args.seconds:g} s per row")
    print(
        "# CPU numbers show the mechanism, not GPU capacity (see docs/vllm.md for the 8B estimate).",
        flush=True,
    )
    rows = []
    if not args.skip_local:
        for n in counts:
            row = run_fleet("local", local, args.modality, n, args.seconds)
            row.update(mode="local engines", streams=n, server_rss=0, load=os.getloadavg()[0])
            rows.append(row)
            print(f"  local  {n}: {row['qps']:.1f} q/s, p50 {row['p50_ms']:.0f} ms", flush=True)
    if not args.skip_vllm:
        if not VLLM_PYTHON.exists():
            print(f"# vLLM rows skipped: no {VLLM_PYTHON} (run scripts/setup_vllm.sh)")
        else:
            port = free_port()
            spec = S.ServerSpec(
                str(tiny.base),
                {args.modality: adapter},
                merged_progress=str(merged) if merged else None,
                port=port,
                progress_port=port,
                device="cpu",
                dtype="float32",
                max_model_len=2048,
                python=str(VLLM_PYTHON),
            )
            process = S.server_processes(spec)[-1]
            log_path = BENCH_CACHE / "server.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            server = S.start_server(process, log_path)
            try:
                S.wait_healthy(process.url, server, 600)
                remote = {**local, "backend": "vllm", "server_url": process.url, "request_timeout_s": 60.0}
                for n in counts:
                    row = run_fleet("vllm", remote, args.modality, n, args.seconds)
                    row.update(mode="one vLLM server", streams=n, server_rss=tree_rss(server.pid))
                    row["load"] = os.getloadavg()[0]
                    rows.append(row)
                    print(f"  vllm   {n}: {row['qps']:.1f} q/s, p50 {row['p50_ms']:.0f} ms", flush=True)
            finally:
                S.stop_server(server)

    print()
    header = ["mode", "streams", "queries/s (all)", "p50 [ms]", "p95 [ms]", "robots' RSS [GB]"]
    header += ["server RSS [GB]", "failed", "load"]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        server = f"{row['server_rss'] / 1e9:.2f}" if row["server_rss"] else "-"
        print(
            f"| {row['mode']} | {row['streams']} | {row['qps']:.1f} | {row['p50_ms']:.0f} "
            f"| {row['p95_ms']:.0f} | {row['robots_rss'] / 1e9:.2f} | {server} | {row['failed']} "
            f"| {row['load']:.1f} |"
        )
    print()
    print("CPU numbers show the mechanism (batching across robots in one server, one copy of the model),")
    print("not GPU capacity: the tiny model's compute is negligible here; overheads dominate. load: the")
    print("machine's 1-minute load average after the row (other jobs on the same cores move the numbers).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
