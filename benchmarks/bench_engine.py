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
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "lrm_reward"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lrm_reward.core import compiled_suffix, prompts, readouts, tiny_model  # noqa: E402
from lrm_reward.core.engine import EngineConfig, LocalRewardEngine  # noqa: E402
from lrm_reward.core.loading import LoadedModel, adopt_model, load_model  # noqa: E402
from lrm_reward.core.types import Modality, Query, Readout  # noqa: E402

TASK = "put the carrot on the plate"
GIB = 1024**3

# Qwen/Qwen3-VL-8B-Instruct config.json, written out by hand (no download).
QWEN3_VL_8B_TEXT = dict(
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=262144,
    rms_norm_eps=1e-6,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3_VL_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=2304,
    deepstack_visual_indexes=[8, 16, 24],
    hidden_act="gelu_pytorch_tanh",
)
# --smoke: the same construction at toy width (vocab kept), so the 8B code path can be checked on a CPU.
SMOKE_TEXT = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [8, 4, 4],
        "mrope_interleaved": True,
    },
)
SMOKE_VISION = dict(
    depth=2,
    hidden_size=64,
    intermediate_size=128,
    num_heads=2,
    out_hidden_size=128,
    deepstack_visual_indexes=[0, 1],
)


def frames(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(n)]


def stream_queries(
    modality: Modality, streams: int, rng: np.random.Generator, initials=None, tasks=None
) -> list[Query]:
    """One query per stream: progress [initial of that stream, new frame]; completion [new frame]."""
    initials = initials if initials is not None else frames(rng, streams)
    tasks = tasks or [TASK] * streams
    if modality is Modality.PROGRESS:
        return [
            Query(modality, task, [initial, frames(rng, 1)[0]])
            for task, initial in zip(tasks, initials[:streams], strict=True)
        ]
    return [Query(modality, task, frames(rng, 1)) for task in tasks]


def make_queries(modality: Modality, batch: int, rng: np.random.Generator, cot: bool = False) -> list[Query]:
    count = {Modality.PROGRESS: 2, Modality.CONTRASTIVE: 2, Modality.COMPLETION: 1}[modality]
    return [Query(modality, TASK, frames(rng, count), chain_of_thought=cot) for _ in range(batch)]


def build_8b_model(smoke: bool, device: str, r: int) -> LoadedModel:
    """Random Qwen3-VL-8B-shaped weights built directly on the device, three random LoRA adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = tiny_model.build_tiny_tokenizer()  # vocab size only matters for the embedding
    processor = tiny_model.build_tiny_processor(tokenizer, min_pixels=65536, max_pixels=16777216)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in tiny_model.SPECIAL_TOKENS}
    text = dict(QWEN3_VL_8B_TEXT, **(SMOKE_TEXT if smoke else {}))
    vision = dict(QWEN3_VL_8B_VISION, **(SMOKE_VISION if smoke else {}))
    config = Qwen3VLConfig(
        text_config=dict(text, pad_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"]),
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [ids["<|im_end|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False

    peft_model = None
    for modality in tiny_model.ADAPTER_ORDER:  # progress first, with the vision tower saved
        lora = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=list(tiny_model.LORA_TARGET_MODULES),
            modules_to_save=["visual"] if modality is Modality.PROGRESS else None,
            task_type="CAUSAL_LM",
        )
        if peft_model is None:
            peft_model = get_peft_model(model, lora, adapter_name=modality.value)
        else:
            peft_model.add_adapter(modality.value, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1e-3)
    return adopt_model(peft_model, processor, device, "float32" if device == "cpu" else "bfloat16")


def build_8b_engine(smoke: bool, device: str, r: int, **cfg_changes) -> LocalRewardEngine:
    loaded = build_8b_model(smoke, device, r)
    return LocalRewardEngine(base_config(loaded, "8b", smoke, r, **cfg_changes), loaded=loaded)


def build_tiny_model(device: str) -> LoadedModel:
    tiny = tiny_model.build_tiny_lrm(Path(tempfile.gettempdir()) / "lrm_bench_tiny", seed=0)
    adapters = {name: str(path) for name, path in tiny.adapters.items()}
    return load_model(str(tiny.base), adapters, device=device)


def base_config(loaded: LoadedModel, shape: str, smoke: bool, r: int, **changes) -> EngineConfig:
    if shape == "8b":
        name = "Qwen3-VL-8B-shaped (random weights)" + (" smoke" if smoke else "")
        adapters = {m.value: f"random r={r}" for m in tiny_model.ADAPTER_ORDER}
    else:
        name, adapters = "tiny Qwen3-VL (built offline)", {m.value: "tiny" for m in tiny_model.ADAPTER_ORDER}
    dtype = "float32" if loaded.dtype == torch.float32 else "bfloat16"
    cfg = EngineConfig(name, adapters, device=str(loaded.device), dtype=dtype, max_batch_size=64)
    return dataclasses.replace(cfg, **changes)


class HfForward:
    """Plain transformers: processor + one forward over prompt + answer prefix; next-token argmax only."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded

    def score(self, queries: list[Query]) -> list:
        loaded = self.loaded
        loaded.model.set_adapter(Modality(queries[0].modality).value)
        prefix = prompts.PROMPT_SPECS[Modality(queries[0].modality)].answer_prefix
        texts = [readouts.prompt_text(loaded.processor, q, 2000) + prefix for q in queries]
        inputs = readouts.encode_batch(loaded.processor, texts, queries, loaded.device)
        with torch.inference_mode():
            logits = loaded.model(**inputs, logits_to_keep=1).logits[:, -1]
            return logits.argmax(dim=-1).tolist()


def measure(
    scorer, queries: list[Query], repeats: int, warmup: int, cuda: bool, before_each=None, after_warmup=None
) -> dict:
    """Times repeats calls of scorer.score(queries); before_each runs untimed before every call."""
    for _ in range(warmup):
        if before_each:
            before_each()
        scorer.score(queries)
    if after_warmup:
        after_warmup()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, errors = [], 0
    for _ in range(repeats):
        if before_each:
            before_each()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        answers = scorer.score(queries)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        errors += sum(1 for a in answers if getattr(a, "error", None) and getattr(a, "value", 0) is None)
    times.sort()
    return dict(
        qps=len(queries) * len(times) / sum(times),
        p50=statistics.median(times),
        p95=times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        errors=errors,
        peak=torch.cuda.max_memory_allocated() if cuda else None,
    )


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


class Budget:
    """Wall-clock budget of the whole run (0 = none): rows that would start too late are skipped."""

    def __init__(self, seconds: float, started: float):
        self.seconds = seconds
        self.started = started
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, label: str, needed_s: float) -> bool:
        if self.seconds <= 0 or self.elapsed() + needed_s <= self.seconds:
            return True
        self.skipped.append(label)
        print(
            f"| {label} | skipped: {self.elapsed():.0f} s of --budget-s {self.seconds:.0f} used |", flush=True
        )
        return False


COLUMNS = (
    "variant",
    "batch",
    "q/s",
    "x hf-forward",
    "p50 call ms",
    "p95 call ms",
    "compile s",
    "peak GPU GiB",
    "errors",
    "fallbacks",
    "notes",
)


def compile_notes(scorer, before) -> str:
    """What the static suffix pass did during a row (empty for engines without it)."""
    stats = getattr(scorer, "stats", None)
    fast = getattr(scorer, "_fast", None)
    decoder = getattr(fast, "decoder", None) if fast is not None else None
    if stats is None or scorer.cfg.compile == "off":
        return ""
    notes = [f"{stats.compiled_graphs} graphs"]
    if decoder is None or not decoder.active:
        reason = decoder.disabled_reason if decoder is not None else "fast path off"
        notes.append(f"STATIC PATH OFF ({reason})"[:160])
    if stats.compile_eager_passes > before.compile_eager_passes:
        notes.append(f"{stats.compile_eager_passes - before.compile_eager_passes} eager passes")
    if stats.compile_unexpected_recompiles > before.compile_unexpected_recompiles:
        notes.append("UNEXPECTED RECOMPILES")
    return "; ".join(notes)


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


class _TimedDecoder:
    """Stands in for a SuffixDecoder and times its calls (synchronised), for the breakdown."""

    def __init__(self, inner, times: list[float], cuda: bool):
        self.inner, self.times, self.cuda = inner, times, cuda

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        return _timed_call(self.inner, args, self.times, self.cuda)


def _timed_call(fn, args, times: list[float], cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    return out


def breakdown(name: str, engine, queries: list[Query], cuda: bool, repeats: int) -> tuple:
    """Median ms per score() call at batch 1, split into stages (steady state: prefix cached)."""
    fast = engine._fast
    stages = {key: [] for key in ("total", "processor", "suffix pass", "vision + embeddings", "decoder")}
    wrapped = {"_encode": "processor", "_suffix_pass": "suffix pass", "_embeddings": "vision + embeddings"}
    for method, stage in wrapped.items():
        original = getattr(fast, method)
        setattr(fast, method, lambda *args, _fn=original, _t=stages[stage]: _timed_call(_fn, args, _t, cuda))
    decoder = fast.decoder
    if decoder is not None:
        fast.decoder = _TimedDecoder(decoder, stages["decoder"], cuda)
    try:
        engine.score(queries)  # prefix cached, shapes warm
        for values in stages.values():
            values.clear()
        for _ in range(repeats):
            _timed_call(engine.score, (queries,), stages["total"], cuda)
    finally:
        for method in wrapped:
            delattr(fast, method)
        fast.decoder = decoder
    median = {key: statistics.median(values) * 1e3 if values else None for key, values in stages.items()}
    # processor runs once per call here (prefix cached): inside the suffix pass
    net_suffix = median["suffix pass"] - (median["processor"] or 0.0)
    return (
        name,
        median["total"],
        median["processor"],
        net_suffix,
        median["vision + embeddings"],
        median["decoder"],
    )


def print_breakdown(rows: list) -> None:
    if not rows:
        return
    print()
    print("# batch 1, where a steady-state progress query's time goes (median ms per score() call)")
    print(
        "| variant | total | processor | suffix pass net of processor | of which vision + embeddings "
        "| of which decoder (static pass) | rest (prompt, hashing, positions, readout) |"
    )
    print("|---|---|---|---|---|---|---|")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, total, processor, suffix, vision, decoder in rows:
        rest = total - (processor or 0.0) - suffix
        print(
            f"| {name} | {fmt(total)} | {fmt(processor)} | {fmt(suffix)} | {fmt(vision)} | {fmt(decoder)} "
            f"| {fmt(rest)} |"
        )
    sys.stdout.flush()


def failed(label: str, exc: Exception, cuda: bool) -> None:
    """Report a failed row in the table (and its traceback on stderr), then go on."""
    print(f"| {label} | FAILED: {type(exc).__name__}: {str(exc)[:300]} |", flush=True)
    traceback.print_exception(exc, file=sys.stderr)
    if cuda:
        torch.cuda.empty_cache()


def guarded(label: str, cuda: bool, fn, *args):
    """fn(*args), or None (reported by failed()) when it raises."""
    try:
        return fn(*args)
    except Exception as exc:
        failed(label, exc, cuda)
        return None


def numerics(slow: dict, fast: dict, names: list[str], initials, batch: int, completion: bool) -> list:
    """Fast vs plain on the same inputs: max |diff| of the expected value and argmax agreement (rows)."""
    rows = []
    rng = np.random.default_rng(1)
    modalities = (Modality.PROGRESS, Modality.COMPLETION) if completion else (Modality.PROGRESS,)
    for modality in modalities:
        queries = stream_queries(modality, batch, rng, initials)
        reference = slow["plain"].score(queries)
        runs = [("one-pass", slow["one-pass"], "")] if completion else []
        for name in names:
            runs += [(name, fast[name], " (miss)"), (name, fast[name], " (hit)")]
        for name in names:
            if fast[name].prefix_cache is not None:
                fast[name].prefix_cache.clear()
        for name, engine, suffix in runs:
            before = fallback_count(engine)
            answers = engine.score(queries)
            fallbacks = fallback_count(engine) - before
            diff = max(abs(a.value - b.value) for a, b in zip(answers, reference, strict=True))
            same = all(argmax(a) == argmax(b) for a, b in zip(answers, reference, strict=True))
            rows.append((name + suffix, modality.value, diff, same, fallbacks))
    return rows


def print_numerics(rows: list, batch: int, modalities: str) -> None:
    print()
    print(f"# numerics: fast path vs plain path on the same {batch} queries of each of {modalities}")
    print("| variant | modality | max abs diff of expected value | argmax identical | fallbacks |")
    print("|---|---|---|---|---|")
    for label, modality, diff, same, fallbacks in rows:
        print(f"| {label} | {modality} | {diff:.2e} | {'yes' if same else 'NO'} | {fallbacks} |")
    if not rows:
        print("| (failed: see above) | | | | |")
    sys.stdout.flush()


def four_streams(engine, rng, cuda: bool, weights_bytes: int | None, modes: list[str]) -> None:
    """Memory with three adapters resident and prefix caches for 4 streams (progress + completion)."""
    print()
    print("# 4 streams x (progress + completion), three adapters resident, prefix caches kept")
    print(
        "| compile | cached prefixes | prefix cache MiB | weights+adapters GiB | peak alloc GiB | "
        "peak reserved GiB | 24 GB card |"
    )
    print("|---|---|---|---|---|---|---|")
    initials = frames(rng, 4)
    tasks = [f"{TASK} (stream {i})" for i in range(4)]  # own task per stream: own completion prefix too
    for mode in modes:
        fast = engine(prefix_cache_entries=64, prefix_cache_bytes=64 * GIB, compile=mode)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # three rounds: every stream queries progress and completion, all in one call
            progress = stream_queries(Modality.PROGRESS, 4, rng, initials, tasks)
            fast.score(progress + stream_queries(Modality.COMPLETION, 4, rng, tasks=tasks))
        stats = fast.prefix_cache.stats()
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        cached = stats.bytes / 2**20
        # a CUDA context takes roughly another 0.5 GiB outside the allocator
        verdict = "-"
        if cuda:
            verdict = "fits" if reserved + 0.5 * GIB <= 24e9 else "does NOT fit"
        print(
            f"| {mode} | {stats.entries} | {cached:.2f} | {gib(weights_bytes)} | {gib(peak)} "
            f"| {gib(reserved)} | {verdict} |",
            flush=True,
        )
        fast.close()


def fallback_count(scorer) -> int:
    """Batches the fast path handed to the plain path (a fast-path row with fallbacks measured plain)."""
    stats = getattr(scorer, "stats", None)
    return stats.fast_path_fallbacks if stats is not None else 0


def argmax(answer) -> str:
    return max(answer.probabilities, key=answer.probabilities.get)


def prompt_tokens(loaded: LoadedModel, query: Query) -> int:
    processor = loaded.processor
    text = readouts.prompt_text(processor, query, 2000)
    return int(processor(text=[text], images=query.images, return_tensors="pt")["input_ids"].shape[1])


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    arch = platform.processor() or platform.machine()
    return f"CPU ({arch}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


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
