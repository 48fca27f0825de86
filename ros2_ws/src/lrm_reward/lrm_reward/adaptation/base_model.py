"""The frozen base model a run trains on: whether it fits, and loading it with clear errors.

``base_fingerprint`` reads the shape-defining facts of a base from its config (no weights); adapters,
checkpoints and runs are keyed by it. ``adapter_base_mismatch`` says why an adapter folder cannot sit on a
base (``lrm-eval-reward`` uses it too). What it is not: no LoRA and no device placement (``train_modality``).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation.train_config import TrainConfig
from lrm_reward.adaptation.train_errors import BaseModelMismatchError
from lrm_reward.adaptation.train_outputs import METADATA_FILE


def base_fingerprint(base_model: str, local_files_only: bool = True) -> dict:
    """The shape-defining facts of a base model, from its config (no weights loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            base_model, local_files_only=local_files_only, trust_remote_code=False
        )
    except Exception as exc:
        raise BaseModelMismatchError(f"cannot read the base model config from {base_model!r}: {exc}") from exc
    model_type = str(getattr(config, "model_type", ""))
    if not model_type.startswith("qwen3_vl"):
        raise BaseModelMismatchError(
            f"base model {base_model!r} is a {model_type!r} model; LRM adapters and prompts need a Qwen3-VL "
            "checkpoint (e.g. Qwen/Qwen3-VL-8B-Instruct)"
        )
    text = getattr(config, "text_config", config)
    vision = getattr(config, "vision_config", None)
    return {
        "model_type": model_type,
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
        "intermediate_size": int(getattr(text, "intermediate_size", 0) or 0),
        "vocab_size": int(text.vocab_size),
        "vision_hidden_size": int(getattr(vision, "hidden_size", 0) or 0),
    }


def adapter_base_mismatch(adapter_dir: Path, fingerprint: dict) -> str | None:
    """Why an adapter folder cannot sit on a base with this fingerprint, or None when it fits.

    Uses our metadata file when there is one, else the LoRA weight shapes (released adapters).
    """
    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / METADATA_FILE
    if meta_path.is_file():
        with contextlib.suppress(ValueError, OSError):
            trained_on = json.loads(meta_path.read_text()).get("base_fingerprint")
            if trained_on and trained_on != fingerprint:
                return f"{adapter_dir} was trained on a base with {trained_on}, this base has {fingerprint}"
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return f"{adapter_dir} has no adapter_model.safetensors"
    from safetensors import safe_open

    layer_re = re.compile(r"layers\.(\d+)\.")
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
            if "lora_A" not in key or "visual" in key:
                continue
            match = layer_re.search(key)
            if match and int(match.group(1)) >= fingerprint["num_hidden_layers"]:
                return (
                    f"{adapter_dir} has LoRA weights for layer {match.group(1)}, the base has only "
                    f"{fingerprint['num_hidden_layers']} layers"
                )
            in_dim = handle.get_slice(key).get_shape()[-1]
            expected = (
                fingerprint["intermediate_size"] if ".down_proj." in key else fingerprint["hidden_size"]
            )
            if (
                any(
                    f".{name}." in key
                    for name in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
                )
                and expected
                and in_dim != expected
            ):
                return f"{adapter_dir}: {key} expects input size {in_dim}, the base has {expected}"
    return None


def load_processor(base_model: str, local_files_only: bool):
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(base_model, local_files_only=local_files_only)
    except Exception as exc:
        raise BaseModelMismatchError(f"cannot load the processor of {base_model!r}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise BaseModelMismatchError(
            f"{base_model!r} has no multimodal processor (tokenizer + image processor)"
        )
    if S.END_TOKEN not in tokenizer.get_vocab():
        raise BaseModelMismatchError(
            f"the tokenizer of {base_model!r} has no {S.END_TOKEN} token: not a Qwen chat model"
        )
    return processor


def _load_base_model(cfg: TrainConfig):
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    kwargs = dict(dtype=dtype, use_safetensors=True, local_files_only=cfg.local_files_only)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        # No device_map: adapters attach on the CPU first (PEFT left lora_B at zero otherwise).
        return AutoModelForImageTextToText.from_pretrained(cfg.base_model, **kwargs)
    except Exception as exc:
        raise BaseModelMismatchError(f"cannot load the base model {cfg.base_model!r}: {exc}") from exc
