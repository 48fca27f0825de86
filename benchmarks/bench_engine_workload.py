"""The workload of bench_engine.py: the model builders, engine configs, queries and hf-forward baseline."""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import tempfile
from pathlib import Path

# set before lrm_reward / transformers load (the other bench_engine_* modules import this one first)
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
from lrm_reward.core.types import Modality, Query  # noqa: E402

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


def prompt_tokens(loaded: LoadedModel, query: Query) -> int:
    processor = loaded.processor
    text = readouts.prompt_text(processor, query, 2000)
    return int(processor(text=[text], images=query.images, return_tensors="pt")["input_ids"].shape[1])


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    arch = platform.processor() or platform.machine()
    return f"CPU ({arch}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
