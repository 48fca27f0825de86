"""The settings of an ``lrm-train-reward`` run: ``TrainConfig`` (validated in ``__post_init__``, with
per-modality changes) and building it from a YAML or JSON file, paths relative to the file resolved against
its folder.

``evaluate.py`` reads its own config with the same helpers (``read_config_file``, ``_build``,
``_dataset_spec``, ``_resolve``). What it is not: no command line (``train.build_parser`` and
``config_from_args``), no training.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lrm_reward.adaptation import samples as S
from lrm_reward.core.types import Modality

ADAPTER_LAYOUT = tuple(m.value for m in (Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION))
# The released adapters put LoRA on every attention and MLP projection of the language model (the vision
# tower's attention is a fused qkv, so these names do not reach it).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
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
