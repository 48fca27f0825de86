#!/usr/bin/env python3
"""Reward-engine throughput, side by side: plain transformers vs each fast-path variant, one table.

What this is for: measuring the logits readout's fast path (issue 8) against the plain paths on the same
model, in one run: queries/s, p50/p95 latency of one score() call, compile/capture time, peak GPU memory,
ratios to the plain transformers forward; plus a numerics check (fast vs plain on the same inputs) and the
memory of the model + three adapters + prefix caches for 4 streams (the 24 GB question).
What it is not: a test (no assertions) and not a quality measure (random or toy weights).

Runs from the repository alone with only torch + transformers + peft (no ROS, no lerobot, no network, no
downloaded weights):
    python benchmarks/bench_engine.py                        # tiny model on the CPU (default), ~3 min
    python benchmarks/bench_engine.py --shape 8b             # Qwen3-VL-8B shape, random bf16, r=64, CUDA
    python benchmarks/bench_engine.py --shape 8b --smoke     # the 8B code path at toy width, on a CPU
    python benchmarks/bench_engine.py --shape 8b --cot       # adds the 256-token chain-of-thought row

Variants (progress queries, two 640x480 frames each: the stream's initial frame + a new one; every row of
a batch is its own stream):
- hf-forward: plain transformers -- processor + ONE forward over prompt + answer prefix, next-token logits
  only (no answer-set scoring); the baseline every ratio is taken against.
- prefix-cache: fast path, steady state: every stream's episode prefix (task + initial frame) is cached,
  so only the new frame + answer prefix are prefilled; answer trie scored in the same pass (eager).
- prefix-cache+cuda-graphs: the same with the suffix pass at static (padded) shapes, its language-model
  part captured once per shape as a CUDA graph and replayed (EngineConfig.compile="cuda-graphs").
  Images of one size go through the static vision tower (core/static_vision.py: batched attention,
  cached position tables, its own CUDA graph up to 8 images); the suffix's text tensors are reused per
  (texts, image grids) (core/suffix_tokens.py: the image processor alone runs per call).
- prefix-cache+cuda-graphs+hf-inputs: the same pass with its inputs made as on 2026-12-04 (the whole
  processor per call, transformers' eager vision tower; b <= 8): what the two change, side by side.
- prefix-cache+compile+cuda-graphs: the same, with each decoder layer compiled by torch.compile (inductor,
  default mode) before the capture: fused kernels, still one graph launch per pass.
- prefix-cache+reduce-overhead: the decoder layer compiled with torch.compile(mode="reduce-overhead")
  (inductor + torch's cudagraph trees, one graph per layer call); other modes with --compile-modes.
- plain: the engine's reference logits path (prompt pass, then a second pass scoring the answer trie).
- one-pass: fast path without prefix reuse (answer trie scored inside the prompt's pass).
- prefix-miss: fast path on the first query of every stream (cache cleared before each call).
- generate: greedy decoding of the JSON answer, as the authors serve it (batch 1).

Rows run in the order of what matters most for issue 8 and print as they finish (flushed, so a killed run
keeps its rows): hf-forward and the eager / CUDA-graph fast path per batch, their numerics, the
torch.compile variants, memory, then plain / one-pass / prefix-miss / generate. --budget-s bounds the
whole run: a row that would start too late is listed as skipped, and the run still ends with its tables.
Compile / capture time (the engine's warm-up for that batch size) is its own column, never in q/s or
latency.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time

import numpy as np
import torch
from bench_engine_measure import (
    Budget,
    breakdown,
    compile_notes,
    fallback_count,
    four_streams,
    measure,
    numerics,
)
from bench_engine_report import COLUMNS, failed, gib, guarded, print_breakdown, print_numerics
from bench_engine_workload import (
    GIB,
    HfForward,
    base_config,
    build_8b_engine,  # noqa: F401  (profile_engine_kernels.py uses bench_engine.build_8b_engine)
    build_8b_model,
    build_tiny_model,
    describe_device,
    frames,
    make_queries,
    prompt_tokens,
    stream_queries,
)

from lrm_reward.core import compiled_suffix
from lrm_reward.core.engine import LocalRewardEngine
from lrm_reward.core.types import Modality, Readout

# the CUDA-graph row with its inputs made as on 2026-12-04: the whole processor per call, transformers' tower
HF_INPUTS = "prefix-cache+cuda-graphs+hf-inputs"


def run(args) -> None:
    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "8b" and not args.smoke and not device.startswith("cuda"):
        sys.exit(
            "--shape 8b needs a CUDA device (about 20 GB of bf16 weights); use --smoke to check on a CPU"
        )
    if device == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device.startswith("cuda")
    if args.compile_backend:
        compiled_suffix.BACKEND_OVERRIDE = args.compile_backend
    modes = args.compile_modes
    if modes is None:
        modes = ["cuda-graphs", "compile+cuda-graphs", "reduce-overhead"] if cuda else ["cuda-graphs"]
    modes = [mode for mode in modes if mode != "off"]
    budget_s = args.budget_s
    if budget_s is None:
        budget_s = 420.0 if args.shape == "8b" and not args.smoke else 0.0
    budget = Budget(budget_s, started)

    build_started = time.perf_counter()
    loaded = build_8b_model(args.smoke, device, args.rank) if args.shape == "8b" else build_tiny_model(device)
    load_s = time.perf_counter() - build_started
    if cuda:
        torch.cuda.synchronize()
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    small = args.shape == "tiny" or args.smoke
    max_batch = max(args.batches)

    def engine(**changes) -> LocalRewardEngine:
        changes.setdefault("compile_warmup_batches", ())  # warmed up per row, so compile time is its own
        return LocalRewardEngine(
            base_config(loaded, args.shape, args.smoke, args.rank, **changes), loaded=loaded
        )

    # each row is its own stream; the prefix cache holds every stream of the largest batch
    cache_room = dict(prefix_cache_entries=2 * max_batch + 8, prefix_cache_bytes=args.cache_gib * GIB)
    fast = {"prefix-cache": engine(**cache_room)}
    for mode in modes:
        fast[f"prefix-cache+{mode}"] = engine(compile=mode, **cache_room)
    if "cuda-graphs" in modes:
        # the same CUDA-graphed pass, inputs made the 2026-12-04 way: what the static inputs change
        fast[HF_INPUTS] = engine(compile="cuda-graphs", **cache_room)
        if fast[HF_INPUTS]._fast is not None:
            fast[HF_INPUTS]._fast.vision = None
            fast[HF_INPUTS]._fast.suffix_tokens = None
    slow = {
        "plain": engine(fast_path=False),
        "one-pass": engine(prefix_cache=False),
        "prefix-miss": engine(**cache_room),
    }
    hf = HfForward(loaded)
    rng = np.random.default_rng(0)
    initials = frames(rng, max_batch)

    import peft
    import transformers

    attn = loaded.model.get_base_model().config._attn_implementation
    print(f"# engine benchmark: {slow['plain'].model_id}")
    print(
        f"# device: {describe_device(device)}; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{loaded.dtype}, attention {attn}; build {load_s:.1f} s"
    )
    sample = stream_queries(Modality.PROGRESS, 1, rng, initials)[0]
    print(f"# progress prompt: {prompt_tokens(loaded, sample)} tokens with two 640x480 frames", end="")
    print(f"; weights + adapters on the GPU: {gib(weights_bytes)} GiB" if cuda else "")
    step = fast["prefix-cache"].cfg.compile_length_step
    print(
        f"# compiled variants: {', '.join(modes) or 'none'} (suffix/prefix lengths padded to multiples of "
        f"{step}, batch to powers of two); budget {budget_s:.0f} s (0 = none); "
        f"rows print as they finish",
        flush=True,
    )
    print()
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)

    baselines: dict[int, float] = {}
    compiled_classes: dict[int, set[str]] = {}  # engine id -> batch classes compiled ("1", "2+")

    def repeats_for(batch: int) -> int:
        return args.repeats or (10 if small or batch > 8 else 20)

    def row(name: str, scorer, batch: int, before_each=None) -> dict | None:
        try:
            return measured_row(name, scorer, batch, before_each)
        except Exception as exc:  # one failing row (OOM, a compile error) must not end the only GPU run
            failed(f"{name} | {batch}", exc, cuda)
            return None

    def measured_row(name: str, scorer, batch: int, before_each=None) -> dict | None:
        label = f"{name} | {batch}"
        compiled = getattr(scorer, "cfg", None) is not None and scorer.cfg.compile != "off"
        if not budget.allows(label, args.row_reserve_s):
            return None
        compile_s = None
        stats_before = dataclasses.replace(scorer.stats) if hasattr(scorer, "stats") else None
        if compiled:
            # batch 1 has its own graph, batches of 2+ share one (dynamic batch dimension)
            batch_class = "1" if batch == 1 else "2+"
            seen = compiled_classes.setdefault(id(scorer), set())
            torch_compile = scorer.cfg.compile in compiled_suffix.TORCH_COMPILE_MODES
            if torch_compile and batch_class not in seen and not budget.allows(label, args.compile_reserve_s):
                return None
            seen.add(batch_class)
            compile_s = scorer.warm_up((batch,), (Modality.PROGRESS,))
        queries = stream_queries(Modality.PROGRESS, batch, rng, initials)
        fallbacks = fallback_count(scorer)
        compile_before_timing = {}

        def after_warmup():
            if compiled:
                compile_before_timing.update(graphs=scorer.stats.compiled_graphs, s=scorer.stats.compile_s)

        result = measure(
            scorer, queries, repeats_for(batch), 1 if small else 2, cuda, before_each, after_warmup
        )
        fallbacks = fallback_count(scorer) - fallbacks
        notes = ""
        if compiled:
            # compiles in the untimed warm-up calls count as compile time; in timed calls they are flagged
            compile_s += compile_before_timing["s"] - stats_before.compile_s
            notes = compile_notes(scorer, stats_before)
            if scorer.stats.compiled_graphs > compile_before_timing["graphs"]:
                notes += "; COMPILED DURING TIMED CALLS (latency includes it)"
        if name == "hf-forward":
            baselines[batch] = result["qps"]
        ratio = f"{result['qps'] / baselines[batch]:.2f}" if batch in baselines else "-"
        cells = (
            name,
            batch,
            f"{result['qps']:.2f}",
            ratio,
            f"{result['p50'] * 1e3:.1f}",
            f"{result['p95'] * 1e3:.1f}",
            "-" if compile_s is None else f"{compile_s:.1f}",
            gib(result["peak"]),
            result["errors"],
            fallbacks,
            notes,
        )
        print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)
        return result

    def breakdowns(names: list[str]) -> list:
        rows = []
        for name in names:
            scorer = fast[name]
            if scorer._fast is not None and budget.allows(f"breakdown {name} | 1", args.row_reserve_s):
                queries = stream_queries(Modality.PROGRESS, 1, rng, initials)
                found = guarded(
                    f"breakdown {name}", cuda, breakdown, name, scorer, queries, cuda, repeats_for(1)
                )
                rows += [found] if found else []
        return rows

    # 1. what issue 8 asks about: the fast path, eager and CUDA-graphed, against plain transformers
    for batch in args.batches:
        if batch <= args.baseline_max_batch:
            row("hf-forward", hf, batch)
        row("prefix-cache", fast["prefix-cache"], batch)
        if "prefix-cache+cuda-graphs" in fast:
            row("prefix-cache+cuda-graphs", fast["prefix-cache+cuda-graphs"], batch)
        if HF_INPUTS in fast and batch <= 8:
            row(HF_INPUTS, fast[HF_INPUTS], batch)
    numeric_batch = min(8, max_batch)
    eager_names = [name for name in fast if fast[name].cfg.compile not in compiled_suffix.TORCH_COMPILE_MODES]
    compiled_names = [name for name in fast if name not in eager_names]
    # printed right away (not after the compile rows), so a run killed while compiling keeps them
    print_breakdown(breakdowns(eager_names))
    if budget.allows("numerics (eager, cuda-graphs)", args.row_reserve_s):
        found = guarded("numerics", cuda, numerics, slow, fast, eager_names, initials, numeric_batch, True)
        print_numerics(found or [], numeric_batch, "progress + completion")

    # 2. torch.compile modes (one decoder layer compiled per batch class and mode)
    if compiled_names:
        print()
        print("# torch.compile variants (ratios to hf-forward of the table above)")
        print("| " + " | ".join(COLUMNS) + " |")
        print("|" + "---|" * len(COLUMNS), flush=True)
    for name in compiled_names:
        for batch in args.batches:
            row(name, fast[name], batch)
    compiled_names = [
        name
        for name in compiled_names
        if fast[name].stats.compiled_graphs
        and fast[name]._fast is not None
        and fast[name]._fast.decoder.active
    ]  # a variant that never compiled (budget) would compile in the checks below
    if compiled_names:
        print_breakdown(breakdowns(compiled_names))
        if budget.allows("numerics (torch.compile)", args.row_reserve_s):
            # progress only: completion would compile its adapter's graphs too
            found = guarded(
                "numerics", cuda, numerics, slow, fast, compiled_names, initials, numeric_batch, False
            )
            print_numerics(found or [], numeric_batch, "progress")

    # 3. memory: 4 streams with three adapters (earlier engines released first: only the measured one counts)
    for scorer in fast.values():
        scorer.close()
    for scorer in slow.values():
        if scorer.prefix_cache is not None:
            scorer.prefix_cache.clear()
    if any(mode in compiled_suffix.TORCH_COMPILE_MODES for mode in modes):
        torch._dynamo.reset()  # frees compiled code and its CUDA-graph pools
    if budget.allows("4 streams memory", args.row_reserve_s):
        memory_modes = ["off"] + (["cuda-graphs"] if "cuda-graphs" in modes else [])
        guarded("4 streams memory", cuda, four_streams, engine, rng, cuda, weights_bytes, memory_modes)

    # 4. the rest, as far as the budget goes
    print()
    print("# other paths (plain = the engine's reference path; ratios to hf-forward of the table above)")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for batch in args.batches:
        if batch > args.baseline_max_batch:
            continue
        row("plain", slow["plain"], batch)
        row("one-pass", slow["one-pass"], batch)
        row("prefix-miss", slow["prefix-miss"], batch, before_each=slow["prefix-miss"].prefix_cache.clear)
    generate = engine(readout=Readout.GENERATE, max_new_tokens={"progress": 16})
    rows = [("generate 16 tok", generate, stream_queries(Modality.PROGRESS, 1, rng, initials))]
    if args.cot:
        cot = engine(max_new_tokens={"contrastive": 256})
        rows.append(
            ("generate CoT 256 tok (contrastive)", cot, make_queries(Modality.CONTRASTIVE, 1, rng, True))
        )
    for name, scorer, queries in rows:
        if not budget.allows(f"{name} | 1", 30.0 if "CoT" in name else args.row_reserve_s):
            continue
        result = guarded(name, cuda, measure, scorer, queries, 3 if not small else 5, 1, cuda)
        if result is None:
            continue
        print(
            f"| {name} | 1 | {result['qps']:.2f} | - | {result['p50'] * 1e3:.1f} | "
            f"{result['p95'] * 1e3:.1f} | - | {gib(result['peak'])} | - | - | |",
            flush=True,
        )
    print()
    skipped = f"; skipped for the budget: {', '.join(budget.skipped)}" if budget.skipped else ""
    print(f"# done in {budget.elapsed():.0f} s{skipped}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny model built offline (the default)")
    parser.add_argument("--shape", choices=("tiny", "8b"), default="tiny", help="model shape")
    parser.add_argument("--smoke", action="store_true", help="with --shape 8b: toy width, runs on a CPU")
    parser.add_argument("--cot", action="store_true", help="add the 256-token chain-of-thought row")
    parser.add_argument("--device", default=None, help="cpu / cuda / cuda:N (default: cuda when available)")
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 32, 64], help="logits batch sizes (progress)"
    )
    parser.add_argument(
        "--baseline-max-batch",
        type=int,
        default=32,
        help="largest batch for hf-forward / plain / one-pass / prefix-miss (they are slow)",
    )
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed calls per row (default 10 small or batch > 8, else 20)"
    )
    parser.add_argument(
        "--compile-modes",
        nargs="+",
        choices=compiled_suffix.COMPILE_MODES,
        default=None,
        help="compiled suffix-pass variants (default on CUDA: cuda-graphs compile+cuda-graphs "
        "reduce-overhead; on a CPU: cuda-graphs)",
    )
    parser.add_argument(
        "--compile-backend",
        default=None,
        help="torch.compile backend instead of inductor, e.g. aot_eager (quick CPU checks of compile rows)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the run; later rows are skipped (default 420 for --shape 8b, else none)",
    )
    parser.add_argument(
        "--row-reserve-s", type=float, default=20.0, help="a row starts only with this much budget left"
    )
    parser.add_argument(
        "--compile-reserve-s",
        type=float,
        default=90.0,
        help="a torch.compile row that compiles a new batch class starts only with this much budget left",
    )
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the random 8B adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--cache-gib", type=int, default=8, help="prefix cache budget of the timed variants")
    args = parser.parse_args()
    if args.tiny:
        args.shape = "tiny"
    run(args)


if __name__ == "__main__":
    main()
