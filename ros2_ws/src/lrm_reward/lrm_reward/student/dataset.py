"""The student's training data: frames of recorded episodes labeled by the teacher reward model.

Which labels: the judge's outputs, `<dataset>/judgments/episode_XXXXXX.json` (``refinement/judge.py``):
the progress curve at ``curve_frame_indices`` and the completion probabilities at
``completion_frame_indices``. Those are exact teacher queries, each about that very frame. The recorder's
per-frame ``reward.progress`` / ``reward.completion`` columns are not used: they do not say which frames
the reward node actually queried and which carry a held (stale) value, and training on held values would
teach the student interval-hold's staircase.

Between two labeled progress frames the teacher's curve may be interpolated linearly (``interpolate``,
lower weight), which gives the student every frame of the motion to learn from; frames the teacher
called less than ``completion_negatives_below`` done become completion negatives (a frame the teacher
sees as barely started is not done), since the judge asks completion only on an episode's last frames.

Held-out episodes: those the teacher's own adapters never trained on, when `<adapters>/split.json`
(``lrm-train-reward``) lists episodes of these datasets; otherwise a seeded split stratified by the
judge's verdict.

What it is not: no training (``train.py``), no metrics (``evaluation.py``). Needs lerobot (frames).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lrm_reward.refinement.judge import VERDICT_SUCCESS, EpisodeFrames, load_judgments
from lrm_reward.student.loading import camera_name, normalize_task
from lrm_reward.student.model import resize_frames

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"  # lrm-train-reward's record of its held-out episodes


class LabelError(ValueError):
    """No usable teacher labels (no judgments, nothing for this task or camera, ambiguous choice)."""


@dataclass
class LabeledEpisode:
    """One judged episode: the teacher's answers by frame index."""

    dataset: Path
    dataset_number: int  # position in the list of datasets given
    episode_index: int
    task: str
    camera_key: str  # observation.images.<camera> the teacher saw
    num_frames: int
    progress: dict[int, float]  # frame -> teacher progress (finite answers only)
    completion: dict[int, float]  # frame -> teacher P(done)
    verdict: str
    model_id: str
    curve_every_k: int | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset_number}:{self.episode_index}"

    @property
    def success(self) -> bool:
        return self.verdict == VERDICT_SUCCESS


@dataclass
class TeacherLabels:
    episodes: list[LabeledEpisode]
    task: str
    camera: str  # camera name (without observation.images.)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> episodes

    @property
    def model_ids(self) -> list[str]:
        return sorted({ep.model_id for ep in self.episodes})


def teacher_labels(datasets: list[Path], task: str | None = None, camera: str | None = None) -> TeacherLabels:
    """Every judged episode of `datasets` for one task and camera, with its finite teacher answers.

    task / camera None: the only one present (several -> LabelError listing them).
    """
    found: list[LabeledEpisode] = []
    skipped: Counter = Counter()
    for number, root in enumerate(datasets):
        root = Path(root)
        if not (root / "meta" / "info.json").exists():
            raise LabelError(f"no LeRobotDataset at {root} (meta/info.json missing)")
        judgments = load_judgments(root)
        if not judgments:
            raise LabelError(f"{root} has no judgments: run `lrm-judge {root} ...` first")
        for index, j in sorted(judgments.items()):
            progress = _finite_by_frame(j.curve_frame_indices, j.progress_curve)
            completion = _finite_by_frame(j.completion_frame_indices, j.completion_probs)
            if not progress and not completion:
                skipped["no parsed teacher answer"] += 1
                continue
            k = (j.thresholds or {}).get("curve_every_k")
            found.append(
                LabeledEpisode(
                    dataset=root,
                    dataset_number=number,
                    episode_index=int(index),
                    task=j.task,
                    camera_key=j.camera,
                    num_frames=int(j.num_frames),
                    progress=progress,
                    completion=completion,
                    verdict=j.verdict,
                    model_id=j.model_id,
                    curve_every_k=int(k) if k else None,
                )
            )
    if task is not None:
        wanted = normalize_task(task)
        other = [ep for ep in found if normalize_task(ep.task) != wanted]
        if other:
            skipped["another task"] += len(other)
        found = [ep for ep in found if normalize_task(ep.task) == wanted]
        if not found:
            raise LabelError(f"no judged episode of task {task!r} in {', '.join(map(str, datasets))}")
    else:
        tasks = Counter(ep.task for ep in found)
        if len({normalize_task(t) for t in tasks}) > 1:
            listing = "; ".join(f"{t!r} ({n} episodes)" for t, n in tasks.most_common())
            raise LabelError(
                f"the datasets hold several tasks, one student is per task: give --task ({listing})"
            )
    if camera is not None:
        other = [ep for ep in found if camera_name(ep.camera_key) != camera_name(camera)]
        if len(other) == len(found):
            seen = sorted({camera_name(ep.camera_key) for ep in found})
            raise LabelError(
                f"the judgments were made on camera(s) {seen}, not {camera_name(camera)!r}: the labels "
                "belong to what the teacher saw (judge again with "
                f"`lrm-judge --camera {camera_name(camera)}`)"
            )
        if other:
            skipped["judged on another camera"] += len(other)
        found = [ep for ep in found if camera_name(ep.camera_key) == camera_name(camera)]
    else:
        cams = Counter(camera_name(ep.camera_key) for ep in found)
        if len(cams) > 1:
            raise LabelError(f"the episodes were judged on several cameras {dict(cams)}: give --camera")
    if not found:
        raise LabelError("no judged episode with a parsed teacher answer")
    return TeacherLabels(
        episodes=found, task=found[0].task, camera=camera_name(found[0].camera_key), skipped=dict(skipped)
    )


def _finite_by_frame(indices: list[int], values: list[float]) -> dict[int, float]:
    return {
        int(i): float(v)
        for i, v in zip(indices, values, strict=False)
        if v is not None and math.isfinite(float(v))
    }


# ---------------------------------------------------------------------------- split
def split_episodes(
    episodes: list[LabeledEpisode],
    val_fraction: float,
    seed: int,
    adapters_dir: Path | None = None,
) -> tuple[list[LabeledEpisode], list[LabeledEpisode], str]:
    """(train, held_out, how): the teacher's held-out episodes when its split.json names some of these,
    else a seeded split stratified by verdict (each verdict with >= 2 episodes keeps one on each side)."""
    teacher_held = _teacher_held_out(episodes, adapters_dir)
    if teacher_held:
        held = [ep for ep in episodes if (ep.dataset.resolve(), ep.episode_index) in teacher_held]
        train = [ep for ep in episodes if (ep.dataset.resolve(), ep.episode_index) not in teacher_held]
        if held and train:
            return train, held, f"teacher split ({Path(adapters_dir) / SPLIT_FILE})"
    if val_fraction <= 0:
        return list(episodes), [], "none (val_fraction 0)"
    rng = np.random.default_rng(seed)
    train: list[LabeledEpisode] = []
    held: list[LabeledEpisode] = []
    for success in (True, False):
        group = sorted(
            (ep for ep in episodes if ep.success is success),
            key=lambda ep: (ep.dataset_number, ep.episode_index),
        )
        order = rng.permutation(len(group))
        n_held = round(val_fraction * len(group))
        n_held = min(max(n_held, 1), len(group) - 1) if len(group) >= 2 else 0
        held += [group[i] for i in order[:n_held]]
        train += [group[i] for i in order[n_held:]]
    return train, held, f"seeded (val_fraction {val_fraction}, seed {seed}, stratified by verdict)"


def _teacher_held_out(episodes: list[LabeledEpisode], adapters_dir: Path | None) -> set[tuple[Path, int]]:
    if adapters_dir is None:
        return set()
    path = Path(adapters_dir) / SPLIT_FILE
    if not path.is_file():
        return set()
    try:
        split = json.loads(path.read_text())
        roots = [Path(d["root"]).expanduser().resolve() for d in split["datasets"]]
        held = set()
        for key in split["held_out"]:
            number, _, episode = str(key).partition(":")
            held.add((roots[int(number)], int(episode)))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        log.warning("ignoring %s (unreadable: %s); splitting by seed", path, exc)
        return set()
    ours = {(ep.dataset.resolve(), ep.episode_index) for ep in episodes}
    return held & ours


# ---------------------------------------------------------------------------- frames
class FrameReader:
    """Frames of one dataset's camera, resized for the student (uint8, (N, 3, S, S))."""

    def __init__(self, dataset: Path, camera: str, image_size: int) -> None:
        self.frames = EpisodeFrames(dataset, camera=camera_name(camera))
        self.image_size = image_size
        shape = self.frames.ds.meta.features[self.frames.camera_key]["shape"]
        names = self.frames.ds.meta.features[self.frames.camera_key].get("names") or []
        # lerobot stores (height, width, channels); older layouts may say (channels, height, width)
        if list(names)[:1] == ["channels"]:
            self.source_shape = (int(shape[1]), int(shape[2]))
        else:
            self.source_shape = (int(shape[0]), int(shape[1]))

    def read(self, episode_index: int, indices: list[int], chunk: int = 64) -> torch.Tensor:
        out = []
        for start in range(0, len(indices), chunk):
            batch = np.stack([self.frames.frame(episode_index, i) for i in indices[start : start + chunk]])
            out.append(resize_frames(torch.from_numpy(batch), self.image_size))
        return (
            torch.cat(out) if out else torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        )


# ---------------------------------------------------------------------------- training rows
@dataclass
class SampleConfig:
    interpolate: bool = True  # linear teacher progress between labeled frames
    interpolated_weight: float = 0.5  # weight of an interpolated label (an exact one weighs 1)
    completion_negatives_below: float | None = 0.25  # teacher progress below this -> completion 0
    max_frames: int = 20000  # cap on the frames kept in memory for training (interpolated ones thinned)

    def __post_init__(self) -> None:
        if not 0.0 < self.interpolated_weight <= 1.0:
            raise ValueError("interpolated_weight must be in (0, 1]")
        if self.completion_negatives_below is not None and not 0.0 < self.completion_negatives_below < 1.0:
            raise ValueError("completion_negatives_below must be in (0, 1) or None")
        if self.max_frames < 1:
            raise ValueError("max_frames must be >= 1")


@dataclass
class TrainingRows:
    """Everything training needs, in memory: frames and per-row targets / weights (weight 0 = no label)."""

    frames: torch.Tensor  # uint8 (N, 3, S, S)
    initial: torch.Tensor  # int64 (N,): row of the episode's first frame
    progress: torch.Tensor  # float32 (N,)
    progress_weight: torch.Tensor
    completion: torch.Tensor
    completion_weight: torch.Tensor
    counts: dict[str, int]


def episode_rows(ep: LabeledEpisode, cfg: SampleConfig, stride: int = 1) -> dict[int, list[float]]:
    """frame -> [progress, progress weight, completion, completion weight] for one episode."""
    rows: dict[int, list[float]] = {}

    def row(i: int) -> list[float]:
        return rows.setdefault(i, [0.0, 0.0, 0.0, 0.0])

    labeled = sorted(ep.progress)
    if cfg.interpolate:
        for a, b in itertools.pairwise(labeled):
            for i in range(a + stride, b, stride):
                t = (i - a) / (b - a)
                r = row(i)
                r[0], r[1] = (1 - t) * ep.progress[a] + t * ep.progress[b], cfg.interpolated_weight
    for i in labeled:
        r = row(i)
        r[0], r[1] = ep.progress[i], 1.0
        if cfg.completion_negatives_below is not None and ep.progress[i] < cfg.completion_negatives_below:
            r[2], r[3] = 0.0, 1.0
    for i, c in ep.completion.items():
        r = row(i)
        r[2], r[3] = c, 1.0  # an exact completion answer wins over a derived negative
    return {i: r for i, r in rows.items() if 0 <= i < ep.num_frames}


def build_training_rows(
    episodes: list[LabeledEpisode], readers: dict[Path, FrameReader], cfg: SampleConfig, progress=None
) -> TrainingRows:
    """Read the frames of every labeled row (and each episode's first frame)."""
    exact = sum(len(ep.progress) + len(ep.completion) + 1 for ep in episodes)
    interpolated = sum(max(0, max(ep.progress, default=0) - min(ep.progress, default=0)) for ep in episodes)
    stride = 1
    if cfg.interpolate and exact + interpolated > cfg.max_frames:
        stride = math.ceil(interpolated / max(1, cfg.max_frames - exact))
        log.info(
            "thinning interpolated frames to every %d-th to stay under %d frames", stride, cfg.max_frames
        )
    frames, initial, targets = [], [], []
    counts = Counter()
    for ep in episodes:
        rows = episode_rows(ep, cfg, stride)
        indices = sorted(set(rows) | {0})  # the first frame is read even when unlabeled (weights 0)
        first = sum(len(f) for f in frames) + indices.index(0)
        frames.append(readers[ep.dataset].read(ep.episode_index, indices))
        for i in indices:
            r = rows.get(i, [0.0, 0.0, 0.0, 0.0])
            initial.append(first)
            targets.append(r)
            counts["progress exact"] += int(i in ep.progress)
            counts["progress interpolated"] += int(r[1] > 0.0 and i not in ep.progress)
            counts["completion exact"] += int(i in ep.completion)
            counts["completion negatives from progress"] += int(r[3] > 0.0 and i not in ep.completion)
        if progress is not None:
            progress.update(1)
    t = torch.tensor(targets, dtype=torch.float32).reshape(-1, 4)
    return TrainingRows(
        frames=torch.cat(frames),
        initial=torch.tensor(initial, dtype=torch.int64),
        progress=t[:, 0],
        progress_weight=t[:, 1],
        completion=t[:, 2],
        completion_weight=t[:, 3],
        counts=dict(counts),
    )


# ---------------------------------------------------------------------------- held-out frames
@dataclass
class HeldOutEpisode:
    labels: LabeledEpisode
    frame_indices: list[int]  # frames read (labeled ones + evenly spaced ones for VOC), ascending
    frames: torch.Tensor  # uint8 (n, 3, S, S), in frame_indices order; frame 0 included


def read_held_out(
    episodes: list[LabeledEpisode], readers: dict[Path, FrameReader], voc_frames: int, progress=None
) -> list[HeldOutEpisode]:
    out = []
    for ep in episodes:
        spaced = np.linspace(0, ep.num_frames - 1, min(voc_frames, ep.num_frames)).round().astype(int)
        indices = sorted({0, *map(int, spaced), *ep.progress, *ep.completion})
        indices = [i for i in indices if 0 <= i < ep.num_frames]
        out.append(HeldOutEpisode(ep, indices, readers[ep.dataset].read(ep.episode_index, indices)))
        if progress is not None:
            progress.update(1)
    return out
