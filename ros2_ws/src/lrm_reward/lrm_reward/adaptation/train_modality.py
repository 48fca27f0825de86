"""Training one modality's LoRA adapter: what ``train.train`` runs once per modality.

Attach LoRA (started from an adapter trained earlier in the run when ``init_from`` says so; for completion
after an optional vision warm-up), optimise with gradient accumulation, autocast and a warm-up + linear
decay schedule, checkpoint every ``save_every`` steps, and save the adapter with its metadata. An adapter
already trained with the same settings (its run fingerprint) is skipped.

What it is not: no config (``train_config``), no batches (``train_batches``), no file layout
(``train_outputs``), no loading or checks of the base (``base_model``).
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation.base_model import _load_base_model
from lrm_reward.adaptation.train_batches import AnswerTokens, SampleOrder, encode_batch
from lrm_reward.adaptation.train_config import TrainConfig
from lrm_reward.adaptation.train_errors import BaseModelMismatchError, OutOfMemoryTrainingError, TrainingError
from lrm_reward.adaptation.train_outputs import (
    CHECKPOINT_DIR,
    METADATA_FILE,
    _read_json,
    _resume,
    _save_adapter,
    _save_checkpoint,
)
from lrm_reward.core.types import Modality

log = logging.getLogger("lrm_reward.adaptation.train")  # lrm-train-reward's logger: its lines keep their name


@dataclass
class ModalityResult:
    modality: Modality
    adapter_dir: Path
    steps: int
    samples: int
    final_loss: float
    resumed_from_step: int = 0
    skipped: bool = False  # already trained with the same settings


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


def merged_image_tokens(visual, pixel_values, grid_thw):
    """The vision tower's merged image tokens, (n_tokens, hidden) for all images of the batch in turn.

    transformers 5 returns an output object (pooler_output: the merged tokens); 4.x a tuple, tokens first.
    """
    out = visual(pixel_values, grid_thw=grid_thw)
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


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
        tokens = merged_image_tokens(visual, pixels["pixel_values"], grid)
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
