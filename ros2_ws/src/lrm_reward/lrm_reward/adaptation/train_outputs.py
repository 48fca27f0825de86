"""What an ``lrm-train-reward`` run writes into its output_dir, and reads back when it resumes.

- ``split.json``: which episodes trained and which were held out (``lrm-eval-reward`` reads it);
- ``checkpoints/<modality>/step-XXXXXX``: LoRA weights, optimizer, scheduler and RNG state, saved so that
  a half-written one is ignored, the oldest pruned; resuming refuses one from another base or other settings;
- ``<modality>/``: the finished adapter, with its metadata file (``METADATA_FILE``) beside it.

What it is not: no choice of when to save or of what the metadata holds (``train_modality``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation.train_config import TrainConfig
from lrm_reward.adaptation.train_errors import BaseModelMismatchError, TrainingError
from lrm_reward.core.types import Modality
from lrm_reward.durable_files import write_json_atomic

log = logging.getLogger("lrm_reward.adaptation.train")  # lrm-train-reward's logger: its lines keep their name

METADATA_FILE = "lrm_adapter.json"
SPLIT_FILE = "split.json"
CHECKPOINT_DIR = "checkpoints"
_STEP_DIR_RE = re.compile(r"^step-(\d{6,})$")


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
