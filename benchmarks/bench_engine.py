#!/usr/bin/env python3
"""Reward-engine throughput: readout x batch size -> queries/s and p50/p95 latency per batch call.

What this is for: knowing where the straightforward engine stands (CPU with the tiny model here; a GPU at
the real Qwen3-VL-8B shape with random weights on a GPU machine) against the anchors in issue 3.
What it is not: a test (no assertions) and not a quality measure (random or toy weights).

Runs without ROS, lerobot, network or downloaded weights:
    python benchmarks/bench_engine.py                 # --tiny on the CPU (default), ~1-2 min on 2 cores
    python benchmarks/bench_engine.py --shape 8b      # Qwen3-VL-8B shape, random bf16, r=64 LoRA, CUDA
    python benchmarks/bench_engine.py --shape 8b --cot   # adds the 256-token chain-of-thought row
    python benchmarks/bench_engine.py --shape 8b --smoke # same code path at toy width, to check it on a CPU

Every query carries 640x480 frames (progress: initial + current).
"""

from __future__ import annotations

import argparse
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

from lrm_reward.core import tiny_model  # noqa: E402
from lrm_reward.core.engine import EngineConfig, LocalRewardEngine, make_engine  # noqa: E402
from lrm_reward.core.loading import adopt_model  # noqa: E402
from lrm_reward.core.types import Modality, Query, Readout  # noqa: E402

TASK = "put the carrot on the plate"

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


def make_queries(modality: Modality, batch: int, rng: np.random.Generator, cot: bool = False) -> list[Query]:
    count = {Modality.PROGRESS: 2, Modality.CONTRASTIVE: 2, Modality.COMPLETION: 1}[modality]
    return [Query(modality, TASK, frames(rng, count), chain_of_thought=cot) for _ in range(batch)]


def build_8b_engine(smoke: bool, device: str, r: int) -> LocalRewardEngine:
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
    cfg = EngineConfig(
        base_model="Qwen3-VL-8B-shaped (random weights)" + (" smoke" if smoke else ""),
        adapters={m.value: f"random r={r}" for m in tiny_model.ADAPTER_ORDER},
        device=device,
        dtype="float32" if device == "cpu" else "bfloat16",
        max_batch_size=64,
    )
    return LocalRewardEngine(cfg, loaded=adopt_model(peft_model, processor, device, cfg.dtype))


def build_tiny_engine(device: str) -> LocalRewardEngine:
    root = Path(tempfile.gettempdir()) / "lrm_bench_tiny"
    tiny = tiny_model.build_tiny_lrm(root, seed=0)
    cfg = EngineConfig(
        str(tiny.base),
        {name: str(path) for name, path in tiny.adapters.items()},
        device=device,
        max_batch_size=64,
    )
    return make_engine(cfg)


def measure(engine, queries: list[Query], repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        engine.score(queries)
    times = []
    unparsed = 0
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        answers = engine.score(queries)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        unparsed += sum(1 for a in answers if a.error and a.value is None)
    times.sort()
    p95 = times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]
    return dict(
        qps=len(queries) * len(times) / sum(times),
        p50=statistics.median(times),
        p95=p95,
        errors=unparsed,
    )


def run(args) -> None:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "8b" and not args.smoke and not device.startswith("cuda"):
        sys.exit(
            "--shape 8b needs a CUDA device (about 20 GB of bf16 weights); use --smoke to check on a CPU"
        )
    if device == "cpu":
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    engine = (
        build_8b_engine(args.smoke, device, args.rank) if args.shape == "8b" else build_tiny_engine(device)
    )
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    small = args.shape == "tiny" or args.smoke
    repeats = args.repeats or (10 if small else 20)

    rows = []
    for batch in args.batches:
        rows.append(("logits", "progress", batch, make_queries(Modality.PROGRESS, batch, rng), None))
    rows.append(("generate 16 tok", "progress", 1, make_queries(Modality.PROGRESS, 1, rng), 16))
    if args.cot:
        rows.append(
            ("CoT 256 tok", "contrastive", 1, make_queries(Modality.CONTRASTIVE, 1, rng, cot=True), 256)
        )

    print(f"# engine benchmark: {engine.model_id}")
    print(f"# device: {describe_device(device)}; torch {torch.__version__}; load/build {load_s:.1f} s")
    print(f"# progress prompt: {prompt_tokens(engine, rows[0][3][0])} tokens with two 640x480 frames")
    print("| readout | modality | batch | queries/s | p50 batch (ms) | p95 batch (ms) | unparsed |")
    print("|---|---|---|---|---|---|---|")
    for name, modality, batch, queries, new_tokens in rows:
        engine.cfg.readout = Readout.GENERATE if new_tokens else Readout.LOGITS
        if new_tokens:
            engine.cfg.max_new_tokens[Modality(modality).value] = new_tokens
        reps = repeats if not new_tokens or small else max(3, repeats // 4)
        result = measure(engine, queries, reps, warmup=1 if small else 2)
        print(
            f"| {name} | {modality} | {batch} | {result['qps']:.2f} | {result['p50'] * 1e3:.1f} | "
            f"{result['p95'] * 1e3:.1f} | {result['errors']} |",
            flush=True,
        )
    engine.close()


def prompt_tokens(engine: LocalRewardEngine, query: Query) -> int:
    from lrm_reward.core.readouts import prompt_text

    processor = engine._loaded.processor
    text = prompt_text(processor, query, engine.cfg.max_task_chars)
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
        "--repeats", type=int, default=0, help="timed calls per row (default 10 small / 20 8b)"
    )
    parser.add_argument("--rank", type=int, default=64, help="LoRA rank of the random 8B adapters")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if args.tiny:
        args.shape = "tiny"
    run(args)


if __name__ == "__main__":
    main()
