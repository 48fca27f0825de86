"""Load a distilled reward student and refuse one that does not fit the task or camera.

What it is for: the reward node (``between: student``), the benchmark and ``lrm-distill``'s own
validation all run a student through ``Student``, so they see the same preprocessing and numbers.

Bad input, and what it gets:
- no student at the path (nothing there, no version folder, or a version without its weights or config):
  ``load_student`` logs a WARN naming what is missing and returns None; the caller holds the teacher's
  last values between queries, as without a student;
- a student trained for another task, camera or frame size: StudentMismatchError saying what it was
  trained on and what it was asked for (its config.json records both);
- a config that does not parse, an unknown schema or architecture, weights that do not match their
  checksum or the architecture: StudentLoadError.

Tasks match when they are equal after case folding, collapsing white space and dropping final
punctuation ("Put the cup  in the bowl." == "put the cup in the bowl").

What it is not: no training, no writing (``store.py``), no scheduling (``between.py``). torch, numpy and
safetensors only: it runs where the reward node runs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lrm_reward.core.images import to_rgb_uint8
from lrm_reward.student import store
from lrm_reward.student.model import (
    COMPLETION,
    PROGRESS,
    StudentArch,
    StudentNet,
    fold_batch_norm,
    preprocess,
    to_input,
)

log = logging.getLogger(__name__)

CAMERA_PREFIX = "observation.images."


class StudentLoadError(RuntimeError):
    """The student's files are there but cannot be used (unreadable, corrupt, unknown format)."""


class StudentMismatchError(ValueError):
    """The student was trained for another task, camera or frame size than the one it is asked to serve."""


def normalize_task(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip().rstrip(".!;").strip().casefold()


def camera_name(name_or_key: str) -> str:
    """'observation.images.front' or 'front' -> 'front'."""
    name = str(name_or_key)
    return name[len(CAMERA_PREFIX) :] if name.startswith(CAMERA_PREFIX) else name


@dataclass(frozen=True)
class StudentValues:
    progress: float  # [0, 1]
    completion: float  # [0, 1] probability that the task is done


class Student:
    """A loaded student, ready for inference (batch norm folded, eval mode, no gradients).

    Per episode: ``z0 = student.embed(first_frame)`` once, then ``student.predict(frame, z0)`` per frame.
    Frames are HxWx3 (any layout core.images.to_rgb_uint8 reads) or a (B, H, W, 3) uint8 batch.
    Uses torch's current thread count (the caller sets it: a reward node pins one core).
    """

    def __init__(self, net: StudentNet, config: dict, path: Path | None = None) -> None:
        self.net = fold_batch_norm(net)
        self.config = config
        self.path = path
        self.arch: StudentArch = net.arch

    @classmethod
    def from_state_dict(cls, state_dict: dict, config: dict, path: Path | None = None) -> Student:
        arch = StudentArch.from_json(config["arch"])
        net = StudentNet(arch)
        net.load_state_dict(state_dict, strict=True)
        return cls(net, config, path)

    @property
    def version(self) -> str:
        return str(self.config.get("version", "unversioned"))

    @property
    def task(self) -> str:
        return str(self.config.get("task", ""))

    @property
    def camera(self) -> str:
        return str(self.config.get("camera", {}).get("name", ""))

    @property
    def completion_threshold(self) -> float:
        return float(self.config.get("completion_threshold", 0.5))

    def describe(self) -> str:
        where = f" ({self.path})" if self.path else ""
        return f"student {self.version} for {self.task!r} on camera {self.camera!r}{where}"

    def _batch(self, frames) -> torch.Tensor:
        if isinstance(frames, np.ndarray) and frames.ndim == 4:
            if frames.dtype != np.uint8 or frames.shape[-1] != 3:
                raise ValueError(
                    f"a frame batch must be (B, H, W, 3) uint8, got {frames.shape} {frames.dtype}"
                )
            array = np.ascontiguousarray(frames)
        else:
            array = to_rgb_uint8(np.asarray(frames))[None]
        return preprocess(torch.from_numpy(array), self.arch.image_size)

    @torch.inference_mode()
    def embed(self, frames) -> torch.Tensor:
        """Embedding(s) of frame(s): (B, D). For the episode's first frame, computed once per episode."""
        return self.net.embed(self._batch(frames))

    @torch.inference_mode()
    def predict(self, frames, initial: torch.Tensor | None) -> np.ndarray:
        """(B, 2) float32: progress and completion of every frame, given the first frame's embedding."""
        logits = self.net.head_logits(self.net.embed(self._batch(frames)), initial)
        return torch.sigmoid(logits).numpy().astype(np.float32)

    @torch.inference_mode()
    def predict_resized(self, resized: torch.Tensor, initial_resized: torch.Tensor | None) -> np.ndarray:
        """Like predict, for frames already through model.resize_frames (uint8 (B, 3, S, S)); the first
        frame likewise ((1, 3, S, S)). What training's validation and the benchmark use."""
        z0 = None
        if self.arch.use_initial_frame:
            if initial_resized is None:
                raise ValueError("this student conditions on the episode's first frame: give it")
            z0 = self.net.embed(to_input(initial_resized))
        logits = self.net.head_logits(self.net.embed(to_input(resized)), z0)
        return torch.sigmoid(logits).numpy().astype(np.float32)

    def predict_one(self, frame, initial: torch.Tensor | None) -> StudentValues:
        out = self.predict(frame, initial)[0]
        return StudentValues(progress=float(out[PROGRESS]), completion=float(out[COMPLETION]))


def resolve_version(path: Path | str) -> Path | None:
    """A version folder as given, or the newest version under a student folder (or an adapters folder
    holding student/). None when there is none."""
    path = Path(path).expanduser()
    if (path / store.CONFIG_FILE).exists() or (path / store.WEIGHTS_FILE).exists():
        return path
    newest = store.latest(path)
    if newest is None and (path / store.STUDENT_DIR).is_dir():
        newest = store.latest(path / store.STUDENT_DIR)
    return newest


def read_config(version_dir: Path) -> dict:
    path = Path(version_dir) / store.CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StudentLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(config, dict) or config.get("schema") != store.SCHEMA:
        schema = config.get("schema") if isinstance(config, dict) else None
        raise StudentLoadError(f"{path}: schema {schema!r} is not {store.SCHEMA!r}: not an lrm student")
    return config


def check_fits(
    config: dict, task: str, camera: str | None = None, source_shape: tuple[int, int] | None = None
) -> None:
    """Raise StudentMismatchError unless the student was trained for this task (and camera, frame size)."""
    version = config.get("version", "?")
    trained_task = str(config.get("task", ""))
    trained_cam = config.get("camera", {}) or {}
    trained_name = str(trained_cam.get("name", ""))
    trained_shape = trained_cam.get("source_shape")
    trained_on = f"task {trained_task!r}, camera {trained_name!r}" + (
        f" at {trained_shape[1]}x{trained_shape[0]}" if trained_shape else ""
    )
    if normalize_task(trained_task) != normalize_task(task):
        raise StudentMismatchError(
            f"student {version} was trained for {trained_on}; it cannot score task {task!r} "
            "(distill one for this task with lrm-distill)"
        )
    if camera is not None and camera_name(camera) != trained_name:
        raise StudentMismatchError(
            f"student {version} was trained for {trained_on}; it cannot score camera {camera_name(camera)!r}"
        )
    if source_shape is not None and trained_shape and tuple(source_shape[:2]) != tuple(trained_shape):
        h, w = source_shape[:2]
        raise StudentMismatchError(
            f"student {version} was trained for {trained_on}; this camera sends {w}x{h} frames"
        )


def load_student(
    path: Path | str | None,
    task: str,
    camera: str | None = None,
    source_shape: tuple[int, int] | None = None,
) -> Student | None:
    """The student at `path` (a version folder, a student folder: its newest version, or the adapters
    folder holding student/) checked against the task (and camera name, frame height x width, when given).

    None, with a WARN, when there is no student there; StudentMismatchError when it was trained for
    something else; StudentLoadError when its files are unusable.
    """
    if path is None or str(path).strip() == "":
        log.warning("no student configured: holding the reward model's last values between queries")
        return None
    version_dir = resolve_version(path)
    if version_dir is None:
        log.warning("no student at %s (no version folder): holding the last values between queries", path)
        return None
    missing = [n for n in (store.CONFIG_FILE, store.WEIGHTS_FILE) if not (version_dir / n).is_file()]
    if missing:
        log.warning(
            "student %s is missing %s: holding the last values between queries",
            version_dir,
            ", ".join(missing),
        )
        return None
    config = read_config(version_dir)
    check_fits(config, task, camera, source_shape)
    weights = version_dir / store.WEIGHTS_FILE
    expected = (config.get("files") or {}).get(store.WEIGHTS_FILE)
    if expected and store.sha256_file(weights) != expected:
        raise StudentLoadError(f"{weights} does not match its checksum in config.json (corrupt or altered)")
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
        student = Student.from_state_dict(state, config, version_dir)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise StudentLoadError(f"cannot load {weights}: {exc}") from exc
    log.info("loaded %s", student.describe())
    return student
