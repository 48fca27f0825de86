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

This module is the run over all modalities and the command line; the parts sit beside it:
``train_config`` (the settings), ``base_model`` (does the base fit, loading it), ``train_batches``
(samples -> batches), ``train_modality`` (one adapter's training), ``train_outputs`` (split, checkpoints
and adapters on disk) and ``train_errors``. Their public names are exported from here too (``__all__``),
as importers and tests use ``train.X``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation.base_model import adapter_base_mismatch, base_fingerprint, load_processor
from lrm_reward.adaptation.train_batches import AnswerTokens, SampleOrder, encode_batch
from lrm_reward.adaptation.train_config import (
    ADAPTER_LAYOUT,
    DEFAULT_TARGET_MODULES,
    PER_MODALITY_KEYS,
    TrainConfig,
    _build,
    _dataset_spec,
    _resolve,  # noqa: F401 - evaluate.py reads it as train._resolve
    load_train_config,
    read_config_file,
)
from lrm_reward.adaptation.train_errors import BaseModelMismatchError, OutOfMemoryTrainingError, TrainingError
from lrm_reward.adaptation.train_modality import ModalityResult, _train_modality
from lrm_reward.adaptation.train_outputs import (
    CHECKPOINT_DIR,
    METADATA_FILE,
    SPLIT_FILE,
    _write_split,
    list_checkpoints,
)
from lrm_reward.core.types import Modality

__all__ = [  # the public names of training, wherever they are defined: importers may take them from here
    "ADAPTER_LAYOUT",
    "CHECKPOINT_DIR",
    "DEFAULT_TARGET_MODULES",
    "METADATA_FILE",
    "PER_MODALITY_KEYS",
    "SPLIT_FILE",
    "AnswerTokens",
    "BaseModelMismatchError",
    "ModalityResult",
    "OutOfMemoryTrainingError",
    "SampleOrder",
    "StepHook",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "adapter_base_mismatch",
    "base_fingerprint",
    "build_parser",
    "config_from_args",
    "encode_batch",
    "list_checkpoints",
    "load_processor",
    "load_train_config",
    "main",
    "read_config_file",
    "resolve_device",
    "train",
]

log = logging.getLogger(__name__)  # the moved parts (train_modality, train_outputs) log under this name too


# --- training ---------------------------------------------------------------------------------------


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
