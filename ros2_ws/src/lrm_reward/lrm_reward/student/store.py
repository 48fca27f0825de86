"""Versioned students on disk, next to the reward adapters they were distilled from.

Layout:
    <adapters>/student/v0001/model.safetensors   the network's weights (batch norm not folded)
    <adapters>/student/v0001/config.json         what it is and what it was trained on (schema below)
    <adapters>/student/.staging/                 versions being written; a killed run leaves its folder
                                                 here and the next run deletes it
    <adapters>/student/.lock                     held while a version is written

config.json (schema "lrm.student/1"): version, task, camera (name, source frame size), arch (model.py's
StudentArch), completion_threshold, teacher (model ids, judge settings), data (datasets, train and
held-out episodes, how they were split), training (settings, final loss), validation (held-out metrics),
files (sha256 of the weights), created_at.

Rules (those of the policy store): a version is written completely in .staging/, then moved into place
with one rename, never over an existing version; the newest version number is the default student.

What it is not: no refusal logic (``loading.py`` decides whether a student fits a task and camera), no
training. torch + safetensors only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
import shutil
from pathlib import Path

import torch

from lrm_reward.durable_files import try_exclusive_lock, write_json_atomic

STUDENT_DIR = "student"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
SCHEMA = "lrm.student/1"
STAGING = ".staging"
VERSION_RE = re.compile(r"^v(\d{4,})$")


class StudentStoreBusyError(RuntimeError):
    """Another lrm-distill run is writing a version into the same folder."""


def student_root(adapters_dir: Path | str) -> Path:
    """Where the students distilled from the adapters in `adapters_dir` live."""
    return Path(adapters_dir).expanduser() / STUDENT_DIR


def versions(root: Path | str) -> list[Path]:
    """Every finished version folder under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(found, key=lambda p: int(p.name[1:]))


def latest(root: Path | str) -> Path | None:
    found = versions(root)
    return found[-1] if found else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_version(root: Path | str, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write a new version (the next number) and return its folder. `config` gets version, files and
    created_at filled in; it must be JSON-serialisable."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = try_exclusive_lock(root / ".lock")
    if lock is None:
        raise StudentStoreBusyError(f"another lrm-distill run is writing into {root}")
    try:
        staging = root / STAGING
        if staging.exists():  # left by a killed run: never a finished version
            shutil.rmtree(staging)
        existing = versions(root)
        number = int(existing[-1].name[1:]) + 1 if existing else 1
        name = f"v{number:04d}"
        work = staging / name
        work.mkdir(parents=True)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(work / WEIGHTS_FILE), metadata={"schema": SCHEMA, "version": name})
        config = dict(config)
        config["schema"] = SCHEMA
        config["version"] = name
        config["files"] = {WEIGHTS_FILE: sha256_file(work / WEIGHTS_FILE)}
        config.setdefault("created_at", _dt.datetime.now().astimezone().isoformat(timespec="seconds"))
        write_json_atomic(work / CONFIG_FILE, config)
        _fsync_dir(work)
        target = root / name
        os.rename(work, target)  # an existing version folder makes this fail: never overwritten
        _fsync_dir(root)
        shutil.rmtree(staging, ignore_errors=True)
        return target
    finally:
        lock.close()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
