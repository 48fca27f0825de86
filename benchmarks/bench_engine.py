#!/usr/bin/env python3
"""Reward-engine throughput, side by side: plain transformers vs each fast-path variant, one table.

What this is for: measuring the logits readout's fast path (issue 8) against the plain paths on the same
model, in one run: queries/s, p50/p95 latency of one score() call, peak GPU memory, ratios to the plain
transformers forward; plus a numerics check (fast vs plain on the same inputs) and the memory of the
model + three adapters + prefix caches for 4 streams (the 24 GB question).
What it is not: a test (no assertions) and not a quality measure (random or toy weights).

Runs from the repository alone with only torch + transformers + peft (no ROS, no lerobot, no network, no
downloaded weights):
    python benchmarks/bench_engine.py                        # tiny model on the CPU (default), ~2 min
    python benchmarks/bench_engine.py --shape 8b             # Qwen3-VL-8B shape, random bf16, r=64, CUDA
    python benchmarks/bench_engine.py --shape 8b --smoke     # the 8B code path at toy width, on a CPU
    python benchmarks/bench_engine.py --shape 8b --cot       # adds the 256-token chain-of-thought row

Variants (progress queries, two 640x480 frames each: the stream's initial frame + a new one):
- hf-forward: plain transformers -- processor + ONE forward over prompt + answer prefix, next-token logits
  only (no answer-set scoring); the baseline every ratio is taken against.
- plain: the engine's reference logits path (prompt pass, then a second pass scoring the answer trie).
- one-pass: fast path without prefix reuse (answer trie scored inside the prompt's pass).
- prefix-cache: fast path, steady state: every row is its own stream whose episode prefix (task + initial
  frame) is cached, so only the new frame + answer prefix are prefilled.
- prefix-miss: fast path on the first query of every stream (cache cleared before each call).
- generate: greedy decoding of the JSON answer, as the authors serve it (batch 1).
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

from lrm_reward.core import prompts, readouts, tiny_model  # noqa: E402
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


def measure(scorer, queries: list[Query], repeats: int, warmup: int, cuda: bool, before_each=None) -> dict:
    """Times repeats calls of scorer.score(queries); before_each runs untimed before every call."""
    for _ in range(warmup):
        if before_each:
            before_each()
        scorer.score(queries)
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


def run(args) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "8b" and not args.smoke and not device.startswith("cuda"):
        sys.exit(
            "--shape 8b needs a CUDA device (about 20 GB of bf16 weights); use --smoke to check on a CPU"
        )
    if device == "cpu":
        torch.set_num_threads(args.threads)
    cuda = device.startswith("cuda")
    started = time.perf_counter()
    loaded = build_8b_model(args.smoke, device, args.rank) if args.shape == "8b" else build_tiny_model(device)
    load_s = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
    weights_bytes = torch.cuda.memory_allocated() if cuda else None
    small = args.shape == "tiny" or args.smoke
    max_batch = max(args.batches)

    def engine(**changes) -> LocalRewardEngine:
        return LocalRewardEngine(
            base_config(loaded, args.shape, args.smoke, args.rank, **changes), loaded=loaded
        )

    # each row is its own stream; the prefix cache holds every stream of the largest batch
    cache_room = dict(prefix_cache_entries=2 * max_batch + 8, prefix_cache_bytes=args.cache_gib * GIB)
    variants = {
        "hf-forward": HfForward(loaded),
        "plain": engine(fast_path=False),
        "one-pass": engine(prefix_cache=False),
        "prefix-cache": engine(**cache_room),
        "prefix-miss": engine(**cache_room),
    }
    rng = np.random.default_rng(0)
    initials = frames(rng, max_batch)

    import peft
    import transformers

    attn = loaded.model.get_base_model().config._attn_implementation
    print(f"# engine benchmark: {variants['plain'].model_id}")
    print(
        f"# device: {describe_device(device)}; python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"{loaded.dtype}, attention {attn}; build {load_s:.1f} s"
    )
    sample = stream_queries(Modality.PROGRESS, 1, rng, initials)[0]
    print(f"# progress prompt: {prompt_tokens(loaded, sample)} tokens with two 640x480 frames", end="")
    print(f"; weights + adapters on the GPU: {gib(weights_bytes)} GiB" if cuda else "")
    print()
    columns = (
        "variant | batch | q/s | x hf-forward | p50 call ms | p95 call ms | peak GPU GiB | errors | fallbacks"
    )
    print(f"| {columns} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in args.batches:
        queries = stream_queries(Modality.PROGRESS, batch, rng, initials)
        repeats = args.repeats or (10 if small or batch > 8 else 20)
        baseline = None
        for name, scorer in variants.items():
            before = None
            if name == "prefix-miss":
                before = scorer.prefix_cache.clear
            fallbacks = fallback_count(scorer)
            result = measure(scorer, queries, repeats, 1 if small else 2, cuda, before_each=before)
            fallbacks = fallback_count(scorer) - fallbacks
            baseline = baseline or result["qps"]
            print(
                f"| {name} | {batch} | {result['qps']:.2f} | {result['qps'] / baseline:.2f} | "
                f"{result['p50'] * 1e3:.1f} | {result['p95'] * 1e3:.1f} | {gib(result['peak'])} | "
                f"{result['errors']} | {fallbacks} |",
                flush=True,
            )
    generate = engine(readout=Readout.GENERATE, max_new_tokens={"progress": 16})
    rows = [("generate 16 tok", generate, stream_queries(Modality.PROGRESS, 1, rng, initials))]
    if args.cot:
        cot = engine(max_new_tokens={"contrastive": 256})
        rows.append(
            ("generate CoT 256 tok (contrastive)", cot, make_queries(Modality.CONTRASTIVE, 1, rng, True))
        )
    for name, scorer, queries in rows:
        result = measure(scorer, queries, 3 if not small else 5, 1, cuda)
        print(
            f"| {name} | 1 | {result['qps']:.2f} | - | {result['p50'] * 1e3:.1f} | "
            f"{result['p95'] * 1e3:.1f} | {gib(result['peak'])} | - | - |",
            flush=True,
        )

    numerics(variants, initials, rng, min(8, max_batch))
    for scorer in variants.values():  # the 24 GB question counts only the 4 streams' prefixes
        if getattr(scorer, "prefix_cache", None) is not None:
            scorer.prefix_cache.clear()
    four_streams(loaded, engine, rng, cuda, weights_bytes)


def numerics(variants: dict, initials: list[np.ndarray], rng, batch: int) -> None:
    """Fast vs plain on the same inputs: max |diff| of the expected value and argmax agreement."""
    print()
    print(f"# numerics: fast path vs plain path on the same {batch} progress + {batch} completion queries")
    print("| variant | modality | max abs diff of expected value | argmax identical | fallbacks |")
    print("|---|---|---|---|---|")
    for modality in (Modality.PROGRESS, Modality.COMPLETION):
        queries = stream_queries(modality, batch, rng, initials)
        reference = variants["plain"].score(queries)
        runs = [
            ("one-pass", "one-pass"),
            ("prefix-cache", "prefix-cache (miss)"),
            ("prefix-cache", "prefix-cache (hit)"),
        ]
        variants["prefix-cache"].prefix_cache.clear()
        for name, label in runs:
            engine = variants[name]
            before = fallback_count(engine)
            answers = engine.score(queries)
            fallbacks = fallback_count(engine) - before
            diff = max(abs(a.value - b.value) for a, b in zip(answers, reference, strict=True))
            same = all(argmax(a) == argmax(b) for a, b in zip(answers, reference, strict=True))
            verdict = "yes" if same else "NO"
            print(f"| {label} | {modality.value} | {diff:.2e} | {verdict} | {fallbacks} |")


def four_streams(loaded: LoadedModel, engine, rng, cuda: bool, weights_bytes: int | None) -> None:
    """Memory with three adapters resident and prefix caches for 4 streams (progress + completion)."""
    fast = engine(prefix_cache_entries=64, prefix_cache_bytes=64 * GIB)
    initials = frames(rng, 4)
    tasks = [f"{TASK} (stream {i})" for i in range(4)]  # own task per stream: own completion prefix too
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # three rounds: every stream queries progress and completion, all in one call
        progress = stream_queries(Modality.PROGRESS, 4, rng, initials, tasks)
        fast.score(progress + stream_queries(Modality.COMPLETION, 4, rng, tasks=tasks))
    stats = fast.prefix_cache.stats()
    print()
    print("# 4 streams x (progress + completion), three adapters resident, prefix caches kept")
    print(
        "| cached prefixes | prefix cache MiB | weights+adapters GiB | peak alloc GiB | peak reserved GiB |"
    )
    print("|---|---|---|---|---|")
    peak = torch.cuda.max_memory_allocated() if cuda else None
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    cached = stats.bytes / 2**20
    print(f"| {stats.entries} | {cached:.2f} | {gib(weights_bytes)} | {gib(peak)} | {gib(reserved)} |")
    if cuda:
        # a CUDA context takes roughly another 0.5 GiB outside the allocator
        verdict = "fits" if reserved + 0.5 * GIB <= 24e9 else "does NOT fit"
        print(f"# 24 GB card: {verdict} (peak reserved {reserved / 1e9:.1f} GB + ~0.5 GiB CUDA context)")


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
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="logits batch sizes")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed calls per row (default 10 small or batch > 8, else 20)"
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
