"""``lrm-train-reward``: fine-tune one LoRA adapter per LRM modality on recorded episodes.

What this is for: a user's own robot, camera and tasks. From LeRobotDatasets with success labels
(``samples.py``) it trains, with peft, the ``progress``, ``contrastive`` and ``completion`` adapters on any
Qwen3-VL base (a tiny one on the CPU, the 8B on a GPU), with the loss on the answer tokens only, and writes
them in exactly the layout the engine loads and the released adapters use::

    <output_dir>/progress/{adapter_config.json, adapter_model.safetensors}   (+ modules_to_save ["visual"])
    <output_dir>/contrastive/...
    <output_dir>/completion/...
    <output_dir>/split.json            which episodes were held out (lrm-eval-reward reads it)

Also: a YAML/JSON config (``TrainConfig``), gradient accumulation, bf16/fp16 autocast on CUDA, resumable
checkpoints (``<output_dir>/checkpoints/<modality>/step-XXXXXX``; a killed run resumes from the last one),
tqdm progress bars, and clear errors for a base model that does not match, out-of-memory and datasets
without labels.

What it is not: no evaluation (``evaluate.py``), no serving (the engine loads the result).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.adaptation import samples as S
from lrm_reward.core.types import Modality
from lrm_reward.durable_files import write_json_atomic

log = logging.getLogger(__name__)

ADAPTER_LAYOUT = tuple(m.value for m in (Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION))
# The released adapters put LoRA on every attention and MLP projection of the language model (the vision
# tower's attention is a fused qkv, so these names do not reach it).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METADATA_FILE = "lrm_adapter.json"
PER_MODALITY_KEYS = (
    "learning_rate",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "warmup_ratio",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "weight_decay",
    "progress_modules_to_save",
    "modules_to_save",
    "modules_learning_rate",
    "vision_warmup_steps",
)
SPLIT_FILE = "split.json"
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR_RE = re.compile(r"^step-(\d{6,})$")


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class BaseModelMismatchError(TrainingError):
    """Adapters or checkpoints that were made for another base model."""


class OutOfMemoryTrainingError(TrainingError):
    """The device ran out of memory; the message suggests a smaller batch with more accumulation."""


@dataclass
class TrainConfig:
    """Everything one training run needs. Paths relative to a config file are resolved against its folder."""

    base_model: str  # local folder (or Hub id, when local_files_only is False) of a Qwen3-VL checkpoint
    datasets: list[S.DatasetSpec]
    output_dir: Path
    modalities: tuple[Modality, ...] = (Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION)
    samples: S.SampleConfig = field(default_factory=S.SampleConfig)
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int | None = None  # optimizer steps per modality; when set, overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (autocast, CUDA only)
    dtype: str = "float32"  # weights of the frozen base: "float32" | "bfloat16" | "float16"
    device: str = "auto"  # "auto" (cuda when available) | "cpu" | "cuda" | "cuda:1"
    seed: int = 0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    progress_modules_to_save: tuple[str, ...] = ("visual",)  # like the released progress adapter; () = none
    # fully trained (and saved) modules of the contrastive and completion adapters; the released ones have
    # none, but a small base may need its vision tower trained to see the task ("visual")
    modules_to_save: tuple[str, ...] = ()
    # learning rate of the fully trained modules (modules_to_save); None = learning_rate. A small base
    # whose vision tower / lm_head are trained learns to see the task faster when they move faster than LoRA.
    modules_learning_rate: float | None = None
    # completion only, with "visual" in modules_to_save: steps that first train the vision tower alone
    # (a linear yes/no probe on its mean image token) before the adapter trains. A small base whose
    # language model does not yet look at the task's details then finds them in the image tokens at once.
    vision_warmup_steps: int = 0
    gradient_checkpointing: bool = False
    save_every: int = 50  # optimizer steps between checkpoints
    keep_checkpoints: int = 2
    # per-modality changes of the optimisation settings, e.g. {"contrastive": {"max_steps": 80}}
    per_modality: dict[str, dict] = field(default_factory=dict)
    attn_implementation: str | None = None
    local_files_only: bool = True
    # torch CPU threads while training (None = torch's default). Small models on a busy CPU train several
    # times faster with 1 thread than with one per core (thread hand-offs cost more than the math).
    cpu_threads: int | None = None
    # start an adapter from another one trained earlier in the same run, e.g. {"progress": "completion"}:
    # its LoRA weights and trained modules (vision tower) are copied in before training. A small base
    # learns to see the task much faster for a binary question (completion) than for the 11 progress values.
    init_from: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError("base_model is required (folder of a Qwen3-VL checkpoint)")
        if not self.datasets:
            raise ValueError("datasets: at least one LeRobotDataset is required")
        self.datasets = [d if isinstance(d, S.DatasetSpec) else _dataset_spec(d, None) for d in self.datasets]
        self.output_dir = Path(self.output_dir).expanduser()
        self.modalities = tuple(Modality(m) for m in self.modalities)
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be a non-empty list without repeats, got {self.modalities}")
        if isinstance(self.samples, dict):
            self.samples = _build(S.SampleConfig, self.samples, "samples")
        if not self.learning_rate > 0:
            raise ValueError("learning_rate must be > 0")
        if self.modules_learning_rate is not None and not self.modules_learning_rate > 0:
            raise ValueError("modules_learning_rate must be > 0 (or left out)")
        if int(self.vision_warmup_steps) < 0:
            raise ValueError(f"vision_warmup_steps must be >= 0, got {self.vision_warmup_steps}")
        if self.vision_warmup_steps and "visual" not in (self.modules_to_save or ()):
            raise ValueError(
                "vision_warmup_steps needs 'visual' in modules_to_save (else the tower is frozen)"
            )
        if self.max_steps is None and not self.epochs > 0:
            raise ValueError("epochs must be > 0 (or set max_steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        for name in ("batch_size", "grad_accum", "save_every", "keep_checkpoints", "lora_r", "lora_alpha"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("warmup_ratio must be in [0, 1)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError("lora_dropout must be in [0, 1)")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.mixed_precision != "no" and self.device == "cpu":
            raise ValueError(
                "mixed_precision bf16/fp16 needs a CUDA device; use mixed_precision: no on the CPU"
            )
        self.target_modules = tuple(self.target_modules)
        self.progress_modules_to_save = tuple(self.progress_modules_to_save or ())
        self.modules_to_save = tuple(self.modules_to_save or ())
        if self.cpu_threads is not None and int(self.cpu_threads) < 1:
            raise ValueError(f"cpu_threads must be >= 1 (or left out), got {self.cpu_threads}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")
        self.init_from = dict(self.init_from or {})
        order = [m.value for m in self.modalities]
        for target, source in self.init_from.items():
            if target not in ADAPTER_LAYOUT or source not in ADAPTER_LAYOUT or target == source:
                raise ValueError(
                    f"init_from: {target!r} <- {source!r} must name two different modalities "
                    f"({list(ADAPTER_LAYOUT)})"
                )
            if target in order and source in order and order.index(source) > order.index(target):
                raise ValueError(
                    f"init_from: {source!r} must be trained before {target!r}; list it first in modalities"
                )
        self.per_modality = dict(self.per_modality or {})
        for name, changes in self.per_modality.items():
            if name not in ADAPTER_LAYOUT:
                raise ValueError(f"per_modality: {name!r} is not a modality ({list(ADAPTER_LAYOUT)})")
            if not isinstance(changes, dict) or set(changes) - set(PER_MODALITY_KEYS):
                raise ValueError(
                    f"per_modality.{name}: only {list(PER_MODALITY_KEYS)} can change per modality"
                )
            # validate the changed values with the same rules
            dataclasses.replace(self, per_modality={}, **changes)

    def for_modality(self, modality: Modality) -> TrainConfig:
        """This config with the per-modality changes of one modality applied."""
        changes = self.per_modality.get(modality.value)
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict:
        def plain(value):
            if isinstance(value, Path):
                return str(value)
            if isinstance(value, Modality | S.LabelSource):
                return value.value
            if dataclasses.is_dataclass(value):
                return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
            if isinstance(value, list | tuple):
                return [plain(v) for v in value]
            return value

        return plain(self)


def load_train_config(path: Path, overrides: dict | None = None) -> TrainConfig:
    """A TrainConfig from YAML or JSON; overrides (e.g. from the command line) win over the file."""
    raw = read_config_file(path)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    base = Path(path).resolve().parent
    if "datasets" in raw:
        if not isinstance(raw["datasets"], list):
            raise ValueError("datasets must be a list of dataset folders or {root: ..., labels: ...} entries")
        raw["datasets"] = [_dataset_spec(d, base) for d in raw["datasets"]]
    if isinstance(raw.get("output_dir"), str):
        raw["output_dir"] = _resolve(raw["output_dir"], base)
    if isinstance(raw.get("base_model"), str):
        raw["base_model"] = _resolve(raw["base_model"], base, only_if_exists=True)
    return _build(TrainConfig, raw, "config")


def read_config_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a mapping of settings")
    return data


def _resolve(value: str, base: Path | None, only_if_exists: bool = False) -> str:
    path = Path(value).expanduser()
    if base is not None and not path.is_absolute():
        candidate = base / path
        # base_model may also be a Hub id: only treat it as relative when that folder exists
        if not only_if_exists or candidate.exists():
            return str(candidate)
    return str(path)


def _dataset_spec(entry, base: Path | None) -> S.DatasetSpec:
    if isinstance(entry, str | Path):
        entry = {"root": str(entry)}
    if not isinstance(entry, dict) or "root" not in entry:
        raise ValueError(f"dataset entry {entry!r} needs at least 'root' (the dataset folder)")
    entry = dict(entry)
    entry["root"] = _resolve(str(entry["root"]), base)
    if entry.get("labels"):
        entry["labels"] = _resolve(str(entry["labels"]), base)
    return _build(S.DatasetSpec, entry, "dataset entry")


def _build(cls, raw: dict, where: str):
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from exc


# --- base model checks --------------------------------------------------------------------------------


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


# --- training ---------------------------------------------------------------------------------------


@dataclass
class ModalityResult:
    modality: Modality
    adapter_dir: Path
    steps: int
    samples: int
    final_loss: float
    resumed_from_step: int = 0
    skipped: bool = False  # already trained with the same settings


@dataclass
class TrainResult:
    output_dir: Path
    modalities: list[ModalityResult]
    episodes: dict


StepHook = Callable[[Modality, int, float], None]  # (modality, optimizer steps done, loss)


def train(
    cfg: TrainConfig, restart: bool = False, on_step: StepHook | None = None, show_progress: bool = True
) -> TrainResult:
    """Train every configured modality; resumes from checkpoints unless restart. Raises TrainingError,
    samples.LabelError."""
    import torch

    if restart and cfg.output_dir.exists():
        for name in (*ADAPTER_LAYOUT, CHECKPOINT_DIR, SPLIT_FILE):
            target = cfg.output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    device = resolve_device(cfg.device)
    if cfg.mixed_precision != "no" and device.type != "cuda":
        raise TrainingError("mixed_precision bf16/fp16 needs a CUDA device; set mixed_precision: no")
    fingerprint = base_fingerprint(cfg.base_model, cfg.local_files_only)
    episode_set = S.load_episodes(cfg.datasets, cfg.samples)
    train_eps, held_out = S.split_episodes(episode_set.episodes, cfg.samples.eval_fraction, cfg.samples.seed)
    if not any(ep.success for ep in train_eps):
        raise S.LabelError(
            "no successful episode left for training: progress and contrastive samples come from successful "
            f"episodes only ({episode_set.summary()})"
        )
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    _write_split(cfg, episode_set, train_eps, held_out)
    processor = load_processor(cfg.base_model, cfg.local_files_only)
    torch.manual_seed(cfg.seed)

    results = []
    threads = torch.get_num_threads()
    if cfg.cpu_threads is not None:
        torch.set_num_threads(int(cfg.cpu_threads))
    try:
        for modality in cfg.modalities:
            samples = S.build_samples(train_eps, modality, cfg.samples, cfg.samples.seed)
            if not samples:
                raise TrainingError(f"no {modality.value} samples could be built from the training episodes")
            results.append(
                _train_modality(
                    cfg.for_modality(modality),
                    modality,
                    samples,
                    episode_set,
                    processor,
                    fingerprint,
                    device,
                    on_step,
                    show_progress,
                )
            )
    finally:
        torch.set_num_threads(threads)
    return TrainResult(cfg.output_dir, results, episode_set.summary())


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but no CUDA device is available; use device: cpu")
    return torch.device(name)


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


def _write_split(cfg: TrainConfig, episode_set: S.EpisodeSet, train_eps, held_out) -> None:
    split = {
        "datasets": [
            {
                "root": str(s.root),
                "repo_id": s.repo_id,
                "camera": s.camera,
                "labels": str(s.labels) if s.labels else None,
                "task": s.task,
            }
            for s in cfg.datasets
        ],
        "samples": cfg.to_dict()["samples"],
        "train": [str(ep.key) for ep in train_eps],
        "held_out": [str(ep.key) for ep in held_out],
        "episodes": episode_set.summary(),
    }
    write_json_atomic(cfg.output_dir / SPLIT_FILE, split)


def _run_fingerprint(cfg: TrainConfig, modality: Modality, samples: list[S.Sample], base: dict) -> str:
    relevant = cfg.to_dict()
    for volatile in (
        "output_dir",
        "device",
        "save_every",
        "keep_checkpoints",
        "modalities",
        "datasets",
        "cpu_threads",
    ):
        relevant.pop(volatile, None)
    # settings added later, at their defaults, leave the fingerprints of earlier runs unchanged
    for added, default in (
        ("modules_to_save", []),
        ("init_from", {}),
        ("modules_learning_rate", None),
        ("vision_warmup_steps", 0),
    ):
        if relevant.get(added) == default:
            relevant.pop(added)
    if relevant["samples"].get("progress_per_label") == 1:
        relevant["samples"].pop("progress_per_label")
    relevant["modality"] = modality.value
    relevant["base"] = base
    relevant["samples_list"] = [(str(s.episode), s.frames, s.label) for s in samples]
    source = cfg.init_from.get(modality.value)
    if source:  # a retrained source adapter must retrain this one too
        relevant["init_from_run"] = _read_json(cfg.output_dir / source / METADATA_FILE).get("run_id")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


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


def _lora_config(cfg: TrainConfig, modality: Modality):
    from peft import LoraConfig

    modules_to_save = list(
        cfg.progress_modules_to_save if modality is Modality.PROGRESS else cfg.modules_to_save
    )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def _train_modality(
    cfg, modality, samples, episode_set, processor, fingerprint, device, on_step, show_progress
):
    import torch
    from peft import get_peft_model
    from tqdm.auto import tqdm

    final_dir = cfg.output_dir / modality.value
    run_id = _run_fingerprint(cfg, modality, samples, fingerprint)
    done = _read_json(final_dir / METADATA_FILE)
    if done:
        if done.get("base_fingerprint") != fingerprint:
            raise BaseModelMismatchError(
                f"{final_dir} holds a {modality.value} adapter trained on another base model "
                f"({done.get('base_fingerprint')}); use another output_dir or --restart"
            )
        if done.get("run_id") == run_id:
            log.info("%s: already trained in %s, skipping", modality.value, final_dir)
            return ModalityResult(
                modality, final_dir, done["steps"], len(samples), done["final_loss"], skipped=True
            )

    per_step = cfg.batch_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(samples) / per_step))
    warmup = int(cfg.warmup_ratio * total_steps)

    model = _load_base_model(cfg)
    try:
        model = get_peft_model(model, _lora_config(cfg, modality))
    except Exception as exc:
        raise BaseModelMismatchError(f"cannot attach LoRA to {cfg.base_model!r}: {exc}") from exc
    source = cfg.init_from.get(modality.value)
    if source:
        _init_from_adapter(model, cfg.output_dir / source, modality)
    if modality is Modality.COMPLETION and cfg.vision_warmup_steps:
        _warm_up_vision(model, cfg, samples, episode_set, processor)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        model.to(device)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemoryTrainingError(_oom_message(cfg, "loading the model")) from exc
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if cfg.mixed_precision == "fp16" else None
    ckpt_root = cfg.output_dir / CHECKPOINT_DIR / modality.value
    start_step, losses = _resume(ckpt_root, run_id, model, optimizer, scheduler, scaler, fingerprint)

    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)
        if cfg.mixed_precision != "no"
        else contextlib.nullcontext()
    )
    answer_tokens = AnswerTokens(processor)
    order = SampleOrder(len(samples), cfg.seed, modality)
    episodes = episode_set.by_key()
    bar = tqdm(
        total=total_steps,
        initial=start_step,
        desc=f"train {modality.value}",
        unit="step",
        disable=not show_progress,
        dynamic_ncols=True,
    )
    loss_value = losses[-1] if losses else float("nan")
    try:
        for step in range(start_step, total_steps):
            step_loss = 0.0
            try:
                for micro in range(cfg.grad_accum):
                    first = (step * cfg.grad_accum + micro) * cfg.batch_size
                    batch = [samples[i] for i in order.indices(first, cfg.batch_size)]
                    inputs, labels = encode_batch(
                        processor, answer_tokens, batch, episodes, episode_set.store
                    )
                    inputs = inputs.to(device)
                    labels = labels.to(device)
                    with autocast:
                        loss = model(**inputs, labels=labels).loss / cfg.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += float(loss.detach())
                if scaler:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            except torch.OutOfMemoryError as exc:
                raise OutOfMemoryTrainingError(
                    _oom_message(cfg, f"{modality.value} step {step + 1}")
                ) from exc
            if not math.isfinite(step_loss):
                raise TrainingError(
                    f"{modality.value}: loss became {step_loss} at step {step + 1}; lower learning_rate "
                    "(or use bf16 instead of fp16)"
                )
            loss_value = step_loss
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            done_steps = step + 1
            if done_steps % cfg.save_every == 0 and done_steps < total_steps:
                _save_checkpoint(
                    ckpt_root,
                    done_steps,
                    run_id,
                    model,
                    optimizer,
                    scheduler,
                    scaler,
                    losses,
                    fingerprint,
                    cfg.keep_checkpoints,
                )
            if on_step is not None:
                on_step(modality, done_steps, step_loss)
    finally:
        bar.close()

    _save_adapter(
        model,
        final_dir,
        modality,
        {
            "schema": "lrm.adapter/1",
            "modality": modality.value,
            "base_model": cfg.base_model,
            "base_fingerprint": fingerprint,
            "run_id": run_id,
            "steps": total_steps,
            "samples": len(samples),
            "class_counts": S.class_counts(samples),
            "final_loss": loss_value,
            "loss_curve": losses,
            "resumed_from_step": start_step,
            "config": cfg.to_dict(),
        },
    )
    shutil.rmtree(ckpt_root, ignore_errors=True)
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ModalityResult(
        modality, final_dir, total_steps, len(samples), loss_value, resumed_from_step=start_step
    )


def _warm_up_vision(model, cfg: TrainConfig, samples: list[S.Sample], episode_set, processor) -> None:
    """Train the (trainable copy of the) vision tower alone to tell "yes" frames from "no" frames.

    A linear head reads the mean of each frame's merged image tokens (roughly what the language model's
    attention sees at first) and is thrown away afterwards; only the vision tower keeps what it learned.
    Runs on the CPU before the model moves to its device: the vision tower of a small base is cheap.
    """
    import torch

    visual = model.get_base_model().model.visual
    params = [p for p in visual.parameters() if p.requires_grad]
    merge = visual.spatial_merge_size
    head = torch.nn.Linear(model.get_base_model().config.text_config.hidden_size, 1)
    optimizer = torch.optim.AdamW(
        [*params, *head.parameters()], lr=cfg.modules_learning_rate or cfg.learning_rate, weight_decay=0.0
    )
    order = SampleOrder(len(samples), cfg.seed + 1, Modality.COMPLETION)
    episodes = episode_set.by_key()
    visual.train()
    for step in range(cfg.vision_warmup_steps):
        batch = [samples[i] for i in order.indices(step * cfg.batch_size, cfg.batch_size)]
        frames = [episode_set.store.frame(episodes[s.episode], s.frames[-1]) for s in batch]
        pixels = processor.image_processor(images=frames, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        out = visual(pixels["pixel_values"], grid_thw=grid)
        tokens = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
        counts = (grid.prod(-1) // (merge * merge)).tolist()
        pooled = torch.stack([t.mean(0) for t in tokens.split(counts)])
        target = torch.tensor([float(s.label == "yes") for s in batch])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(pooled).squeeze(-1), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
    log.info(
        "completion: vision warm-up, %d steps, last probe loss %.4f",
        cfg.vision_warmup_steps,
        float(loss.detach()),
    )


def _param_groups(model, cfg: TrainConfig) -> list[dict]:
    """LoRA weights at learning_rate; fully trained modules (PEFT's modules_to_save copies) at theirs."""
    lora, full = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (full if ".modules_to_save." in name else lora).append(param)
    groups = [{"params": lora, "lr": cfg.learning_rate}]
    if full:
        groups.append({"params": full, "lr": cfg.modules_learning_rate or cfg.learning_rate})
    return [g for g in groups if g["params"]]


def _init_from_adapter(model, folder: Path, modality: Modality) -> None:
    """Copy the weights of a trained adapter folder into this one (the ones both have)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise TrainingError(
            f"{modality.value}: init_from {folder.name!r}, but {weights} does not exist (train it first)"
        )
    # modules this adapter trains but the source did not (e.g. lm_head) keep their fresh values
    state = get_peft_model_state_dict(model)
    loaded = load_file(str(weights))
    used = {key: value for key, value in loaded.items() if key in state}
    state.update(used)
    try:
        set_peft_model_state_dict(model, state)
    except (RuntimeError, KeyError) as exc:
        raise TrainingError(f"{modality.value}: cannot start from {folder}: {exc}") from exc
    log.info("%s: started from %s (%d of %d tensors)", modality.value, folder, len(used), len(state))


class SampleOrder:
    """Sample position p -> sample index: a fresh deterministic permutation per epoch (resumable by step)."""

    def __init__(self, n: int, seed: int, modality: Modality) -> None:
        self.n = n
        self.seed = seed
        self.salt = list(Modality).index(modality)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + count)]


class AnswerTokens:
    """Token ids of each answer text + end token (a handful of distinct answers: cached)."""

    def __init__(self, processor) -> None:
        self.tokenizer = processor.tokenizer
        self._cache: dict[str, list[int]] = {}

    def ids(self, answer: str) -> list[int]:
        if answer not in self._cache:
            self._cache[answer] = self.tokenizer(answer + S.END_TOKEN, add_special_tokens=False)["input_ids"]
        return self._cache[answer]


def encode_batch(processor, answer_tokens: AnswerTokens, batch: list[S.Sample], episodes, store):
    """Processor inputs for prompt + answer + end token, left padded, and labels on the answer tokens only."""
    import torch

    texts, images, answers = [], [], []
    for sample in batch:
        prompt = processor.apply_chat_template(
            S.chat_messages(sample), tokenize=False, add_generation_prompt=True
        )
        answers.append(answer_tokens.ids(sample.answer_text))
        texts.append(prompt + sample.answer_text + S.END_TOKEN)
        episode = episodes[sample.episode]
        images.extend(store.frame(episode, t) for t in sample.frames)
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for row, answer in enumerate(answers):
        n = len(answer)
        if ids[row, -n:].tolist() != answer:
            # The answer must tokenize the same inside the full text, or the loss would sit on wrong tokens.
            raise TrainingError(
                "the answer tokens differ inside the full prompt (tokenizer merges across the prompt/answer "
                f"boundary) for {batch[row].answer_text!r}"
            )
        labels[row, -n:] = ids[row, -n:]
    return inputs, labels


def _oom_message(cfg: TrainConfig, where: str) -> str:
    smaller = max(1, cfg.batch_size // 2)
    more = cfg.grad_accum * (cfg.batch_size // smaller)
    tips = [
        f"set batch_size: {smaller} and grad_accum: {more} "
        f"(same effective batch of {cfg.batch_size * cfg.grad_accum})"
        if cfg.batch_size > 1
        else "batch_size is already 1",
    ]
    if not cfg.gradient_checkpointing:
        tips.append("gradient_checkpointing: true")
    if cfg.dtype == "float32":
        tips.append("dtype: bfloat16 with mixed_precision: bf16")
    return (
        f"out of memory while {where} (batch_size {cfg.batch_size}, grad_accum {cfg.grad_accum}). Try: "
        + "; ".join(tips)
        + ". The run resumes from its last checkpoint."
    )


# --- checkpoints --------------------------------------------------------------------------------------


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of complete checkpoints, oldest first (half-written ones carry no state file)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for path in ckpt_root.iterdir():
        match = _STEP_DIR_RE.match(path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _save_checkpoint(ckpt_root, step, run_id, model, optimizer, scheduler, scaler, losses, fingerprint, keep):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(tmp / "adapter_weights.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "torch_rng": torch.get_rng_state(),
        },
        tmp / "optimizer.pt",
    )
    # The state file is written last: a folder without it is an interrupted save and is ignored.
    write_json_atomic(
        tmp / "trainer_state.json",
        {
            "step": step,
            "run_id": run_id,
            "losses": losses,
            "base_fingerprint": fingerprint,
        },
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _resume(ckpt_root, run_id, model, optimizer, scheduler, scaler, fingerprint) -> tuple[int, list[float]]:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    checkpoints = list_checkpoints(ckpt_root)
    if not checkpoints:
        return 0, []
    step, folder = checkpoints[-1]
    state = _read_json(folder / "trainer_state.json")
    if state.get("base_fingerprint") != fingerprint:
        raise BaseModelMismatchError(
            f"checkpoint {folder} was made on another base model ({state.get('base_fingerprint')}, this one "
            f"is {fingerprint}); use another output_dir or --restart"
        )
    if state.get("run_id") != run_id:
        raise TrainingError(
            f"checkpoint {folder} belongs to a run with other settings or data; resume with the same config, "
            "or pass --restart to start over"
        )
    try:
        set_peft_model_state_dict(model, load_file(str(folder / "adapter_weights.safetensors")))
    except RuntimeError as exc:
        raise BaseModelMismatchError(f"checkpoint {folder} does not fit the base model: {exc}") from exc
    extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    log.info("resuming %s from %s (step %d)", ckpt_root.name, folder, step)
    return step, list(state.get("losses", []))


def _save_adapter(model, final_dir: Path, modality: Modality, metadata: dict) -> None:
    tmp = final_dir.parent / f".tmp-{final_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["inference_mode"] = True
    config_path.write_text(json.dumps(config, indent=2))
    write_json_atomic(tmp / METADATA_FILE, metadata)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrm-train-reward",
        description="Train LRM-style LoRA adapters (progress, contrastive, completion) on recorded episodes.",
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON training config (see docs/adaptation.md)")
    parser.add_argument("--base-model", help="folder of a Qwen3-VL checkpoint")
    parser.add_argument("--dataset", action="append", default=None, help="LeRobotDataset folder (repeatable)")
    parser.add_argument("--labels", type=Path, help="JSON/CSV episode->success file (for a single --dataset)")
    parser.add_argument("--output-dir", type=Path, help="where the adapters go")
    parser.add_argument("--modalities", nargs="+", choices=list(ADAPTER_LAYOUT))
    parser.add_argument("--max-steps", type=int, help="optimizer steps per modality (overrides epochs)")
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--device")
    parser.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"])
    parser.add_argument("--restart", action="store_true", help="discard checkpoints and adapters, start over")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides = {
        "base_model": args.base_model,
        "output_dir": str(args.output_dir) if args.output_dir else None,
        "modalities": args.modalities,
        "max_steps": args.max_steps,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": args.grad_accum,
        "learning_rate": args.learning_rate,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
    }
    if args.dataset:
        if args.labels and len(args.dataset) != 1:
            raise ValueError("--labels goes with exactly one --dataset (use a config file for several)")
        overrides["datasets"] = [
            {"root": d, "labels": str(args.labels) if args.labels else None} for d in args.dataset
        ]
    if args.config:
        return load_train_config(args.config, overrides)
    missing = [
        flag
        for flag, key in (
            ("--base-model", "base_model"),
            ("--dataset", "datasets"),
            ("--output-dir", "output_dir"),
        )
        if not overrides.get(key)
    ]
    if missing:
        raise ValueError(f"without --config, {', '.join(missing)} are required")
    raw = {k: v for k, v in overrides.items() if v is not None}
    raw["datasets"] = [_dataset_spec(d, None) for d in raw["datasets"]]
    return _build(TrainConfig, raw, "command line")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = train(cfg, restart=args.restart, show_progress=not args.quiet)
    except (ValueError, FileNotFoundError) as exc:  # config and label errors (LabelError is a ValueError)
        print(f"lrm-train-reward: {exc}", file=sys.stderr)
        return 2
    except BaseModelMismatchError as exc:
        print(f"lrm-train-reward: base model mismatch: {exc}", file=sys.stderr)
        return 3
    except OutOfMemoryTrainingError as exc:
        print(f"lrm-train-reward: {exc}", file=sys.stderr)
        return 4
    except TrainingError as exc:
        print(f"lrm-train-reward: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "lrm-train-reward: interrupted; run the same command again to resume from the last checkpoint",
            file=sys.stderr,
        )
        return 130
    for r in result.modalities:
        state = "already trained" if r.skipped else f"{r.steps} steps, final loss {r.final_loss:.4f}"
        print(f"{r.modality.value}: {r.adapter_dir} ({r.samples} samples, {state})")
    print(f"held-out episodes: {result.output_dir / SPLIT_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
