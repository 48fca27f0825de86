"""Labelled samples for training and evaluating LRM-style adapters, built from LeRobotDatasets.

What this is for: turning recorded (or demonstration) episodes plus trusted success labels into samples of
the three modalities, each with exactly the prompt of ``core/prompts.py`` and the JSON answer text the
released adapters produce:

- progress: [initial frame, frame t] of a successful episode -> ``{ "completion_progress": 0.7 }``, the
  label being t / (T - 1) rounded to the 0.1 grid of the prompt's answer list (one frame per grid value
  and episode, so the classes are balanced);
- completion: [frame] -> ``{ "task_completed": "yes" }`` on the last frames of successful episodes,
  ``"no"`` on their early frames and on the end frames of failed episodes (classes balanced);
- contrastive: [A, B] from one successful episode -> ``{ "more_complete_image": "ImageB" }`` when B is
  the later frame, ``"ImageA"`` when swapped, plus "rewound" pairs: a clip played forward to frame k and
  rewound to frame m < k, where B is the later frame of the rewound clip (so A is more complete).
  Half the pairs say ImageB, half ImageA.

Success labels come from a source the user trusts, per episode: a labels file (JSON or CSV mapping
episode index -> success), the recorder's sidecars (``<root>/recording/episode_XXXXXX.json``, field
``outcome``), or a per-frame boolean feature ``next.success`` / ``success``. Episodes are split into
training and held-out sets by episode (stratified by outcome, deterministic seed).

What it is not: no tokenization or model (see ``train.py``); frames are loaded lazily from the datasets.
"""

from __future__ import annotations

import csv
import enum
import json
import logging
import math
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.core import prompts
from lrm_reward.core.types import Modality, Query
from lrm_reward.refinement.recorder_config import SIDECAR_DIR  # the recorder's per-episode metadata

log = logging.getLogger(__name__)

SUCCESS_FEATURES = ("next.success", "success")
PROGRESS_GRID = tuple(sorted(prompts.PROGRESS_ANSWERS.values()))  # 0.0, 0.1, ..., 1.0
END_TOKEN = "<|im_end|>"

LABELS_HELP = (
    "Success labels are needed to train or evaluate: progress is learned from successful episodes only, "
    "completion from successful vs. failed ends. Provide ONE of:\n"
    '  1. the recorder\'s sidecars <root>/recording/episode_XXXXXX.json with "outcome": "success" or '
    '"failure" (set the outcome when stopping an episode: StopEpisode OUTCOME_SUCCESS / OUTCOME_FAILURE);\n'
    "  2. a per-frame boolean feature 'next.success' or 'success' in the dataset (e.g. simulator ground "
    "truth; an episode counts as successful when any frame is true);\n"
    '  3. a labels file: JSON {"0": true, "1": false, ...} (or {"episodes": {...}}) or CSV with the '
    "header 'episode_index,success', values true/false, 1/0, yes/no or success/failure; give it as "
    "'labels:' in the dataset entry of the config or with --labels."
)


class LabelError(ValueError):
    """Episodes cannot be labelled (no source, bad file, nothing usable); the message says what to do."""


class LabelSource(enum.StrEnum):
    AUTO = "auto"  # labels file if given, else sidecars, else a success feature
    FILE = "file"
    SIDECAR = "sidecar"
    FEATURE = "feature"


@dataclass
class DatasetSpec:
    """One LeRobotDataset on disk and where its success labels are."""

    root: Path
    repo_id: str | None = None  # None: "local/<folder name>" (only used as a name: root is always passed)
    camera: str | None = None  # image feature ("observation.images.front") or camera name; None = first
    labels: Path | None = None  # JSON / CSV labels file
    task: str | None = None  # overrides the dataset's task text

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        if self.labels is not None:
            self.labels = Path(self.labels).expanduser()
        if not self.repo_id:
            self.repo_id = f"local/{self.root.name}"
        if self.task is not None and not str(self.task).strip():
            raise ValueError("DatasetSpec.task must not be blank (leave it out to use the dataset's task)")


@dataclass
class SampleConfig:
    """How samples are drawn from episodes. Times are normalized to [0, 1] within an episode."""

    label_source: LabelSource = LabelSource.AUTO
    eval_fraction: float = (
        0.25  # share of episodes held out (per outcome), at least one of each when possible
    )
    seed: int = 0
    min_frames: int = 8  # shorter episodes are skipped (counted as "too_short")
    use_initial_frame: bool = True  # progress prompt with [initial, current]; False: [current] only
    progress_per_label: int = 1  # frames per 0.1 grid value and successful episode (more: more data)
    completion_end_fraction: float = 0.1  # last 10% of a successful episode answers "yes"
    completion_no_before: float = 0.6  # frames of a successful episode before this time answer "no"
    completion_per_episode: int = 6  # samples per class and episode (before balancing)
    contrastive_per_episode: int = 8  # pairs per successful episode (half ImageB, half ImageA)
    contrastive_min_gap: float = 0.25  # minimum normalized time between the two frames
    rewound_share: float = 0.5  # of the ImageA pairs, the share made as rewound clips (rest: swapped pairs)
    voc_frames: int = 11  # frames per held-out successful episode for the VOC metric

    def __post_init__(self) -> None:
        self.label_source = LabelSource(self.label_source)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.min_frames < 3:
            raise ValueError(f"min_frames must be >= 3, got {self.min_frames}")
        if not 0.0 < self.completion_end_fraction < 0.5:
            raise ValueError("completion_end_fraction must be in (0, 0.5)")
        if not 0.0 < self.completion_no_before <= 1.0 - self.completion_end_fraction:
            raise ValueError("completion_no_before must be in (0, 1 - completion_end_fraction]")
        if not 0.0 < self.contrastive_min_gap < 1.0:
            raise ValueError("contrastive_min_gap must be in (0, 1)")
        if not 0.0 <= self.rewound_share <= 1.0:
            raise ValueError("rewound_share must be in [0, 1]")
        for name in ("progress_per_label", "completion_per_episode", "contrastive_per_episode", "voc_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.voc_frames < 2:
            raise ValueError("voc_frames must be >= 2 (a correlation needs two points)")


@dataclass(frozen=True)
class EpisodeKey:
    dataset: int  # index into the dataset list
    episode: int  # episode_index in that dataset

    def __str__(self) -> str:
        return f"{self.dataset}:{self.episode}"


@dataclass
class Episode:
    key: EpisodeKey
    task: str
    start: int  # global index of the first frame in the dataset
    length: int
    success: bool
    label_from: str  # "file" | "sidecar" | "feature"


@dataclass(frozen=True)
class Sample:
    """One question with its known answer. frames are indices within the episode, in prompt order."""

    modality: Modality
    episode: EpisodeKey
    task: str
    frames: tuple[int, ...]
    label: str  # answer-set text: "0.7", "yes", "ImageB"
    source: str  # how it was made: "time", "success_end", "success_early", "failure_end", "forward", ...

    @property
    def answer_text(self) -> str:
        return answer_text(self.modality, self.label)

    @property
    def value(self) -> float:
        return PROMPT_VALUES[self.modality][self.label]


PROMPT_VALUES = {m: spec.answers for m, spec in prompts.PROMPT_SPECS.items()}


def answer_text(modality: Modality, label: str) -> str:
    """The JSON answer the released adapters produce: answer prefix + value + closing (no end token)."""
    spec = prompts.PROMPT_SPECS[modality]
    if label not in spec.answers:
        raise ValueError(f"{label!r} is not an allowed {modality.value} answer ({list(spec.answers)})")
    if modality is Modality.PROGRESS:
        return f"{spec.answer_prefix}{label} }}"
    return f'{spec.answer_prefix}{label}" }}'


def progress_label(t: int, length: int) -> str:
    """Normalized time t / (length - 1) rounded to the 0.1 grid, as answer text."""
    return f"{round(10 * t / (length - 1)) / 10:.1f}"


@dataclass
class EpisodeSet:
    """Episodes that can be used, why the others were skipped, and access to their frames."""

    episodes: list[Episode]
    skipped: Counter
    store: FrameStore
    specs: list[DatasetSpec] = field(default_factory=list)

    def by_key(self) -> dict[EpisodeKey, Episode]:
        return {ep.key: ep for ep in self.episodes}

    def summary(self) -> dict:
        return {
            "episodes": len(self.episodes),
            "successful": sum(ep.success for ep in self.episodes),
            "failed": sum(not ep.success for ep in self.episodes),
            "skipped": dict(self.skipped),
            "label_sources": dict(Counter(ep.label_from for ep in self.episodes)),
        }


class FrameStore:
    """Opens the datasets once and hands out frames as HxWx3 uint8 RGB, with a small LRU cache."""

    def __init__(self, specs: list[DatasetSpec], cache_size: int = 512) -> None:
        self.specs = specs
        self._datasets: dict[int, object] = {}
        self._camera: dict[int, str] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def dataset(self, index: int):
        if index not in self._datasets:
            self._datasets[index] = open_dataset(self.specs[index])
            self._camera[index] = pick_camera(self._datasets[index], self.specs[index])
        return self._datasets[index]

    def camera(self, index: int) -> str:
        self.dataset(index)
        return self._camera[index]

    def frame(self, episode: Episode, t: int) -> np.ndarray:
        if not 0 <= t < episode.length:
            raise IndexError(f"frame {t} outside episode {episode.key} of {episode.length} frames")
        key = (episode.key.dataset, episode.start + t)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        ds = self.dataset(episode.key.dataset)
        item = ds[episode.start + t]
        image = to_uint8_rgb(item[self.camera(episode.key.dataset)])
        self._cache[key] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image


def to_uint8_rgb(image) -> np.ndarray:
    """LeRobot frames come as CxHxW float tensors in [0, 1]; the engine wants HxWx3 uint8."""
    array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.dtype != np.uint8:
        array = np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def open_dataset(spec: DatasetSpec):
    """LeRobotDataset from a local root (never the Hub). Raises FileNotFoundError with the path."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    if not (spec.root / "meta" / "info.json").is_file():
        raise FileNotFoundError(
            f"{spec.root} is not a LeRobotDataset (no meta/info.json); give the dataset folder as root"
        )
    return LeRobotDataset(spec.repo_id, root=spec.root, video_backend="pyav")


def pick_camera(ds, spec: DatasetSpec) -> str:
    cameras = list(ds.meta.camera_keys)
    if not cameras:
        raise ValueError(f"dataset {spec.root} has no image or video feature to show the model")
    if spec.camera is None:
        return cameras[0]
    for name in (spec.camera, f"observation.images.{spec.camera}"):
        if name in cameras:
            return name
    raise ValueError(f"dataset {spec.root}: camera {spec.camera!r} not found; it has {cameras}")


# --- labels -------------------------------------------------------------------------------------------


def parse_success(raw, where: str) -> bool | None:
    """true/false, 1/0, yes/no, success/failure -> bool; "unknown" / null -> None; anything else errors."""
    if isinstance(raw, bool):
        return raw
    if raw is None:
        return None
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    text = str(raw).strip().lower()
    if text in ("true", "1", "yes", "success", "succeeded", "y"):
        return True
    if text in ("false", "0", "no", "failure", "failed", "fail", "n"):
        return False
    if text in ("", "unknown", "none", "null", "na"):
        return None
    raise LabelError(
        f"{where}: cannot read {raw!r} as success (use true/false, 1/0, yes/no, success/failure)"
    )


def read_labels_file(path: Path) -> dict[int, bool | None]:
    """episode_index -> success from a JSON or CSV file (see LABELS_HELP)."""
    if not path.is_file():
        raise LabelError(f"labels file {path} does not exist.\n{LABELS_HELP}")
    labels: dict[int, bool | None] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            if "episode_index" not in fields or "success" not in fields:
                raise LabelError(f"{path}: CSV needs the header 'episode_index,success', found {fields}")
            for line, row in enumerate(reader, start=2):
                row = {k.strip(): v for k, v in row.items() if k}
                labels[_episode_index(row["episode_index"], f"{path}:{line}")] = parse_success(
                    row["success"], f"{path}:{line}"
                )
        return labels
    try:
        raw = json.loads(path.read_text())
    except ValueError as exc:
        raise LabelError(f'{path} is not valid JSON ({exc}); expected {{"0": true, ...}}') from exc
    if isinstance(raw, dict) and isinstance(raw.get("episodes"), dict):
        raw = raw["episodes"]
    if not isinstance(raw, dict):
        raise LabelError(f"{path}: expected a JSON object mapping episode index to success")
    for key, value in raw.items():
        labels[_episode_index(key, f"{path} key {key!r}")] = parse_success(value, f"{path} episode {key}")
    return labels


def _episode_index(raw, where: str) -> int:
    try:
        index = int(str(raw).strip())
    except ValueError:
        raise LabelError(f"{where}: episode index {raw!r} is not an integer") from None
    if index < 0:
        raise LabelError(f"{where}: episode index {index} is negative")
    return index


def read_sidecar_labels(root: Path) -> dict[int, bool | str | None]:
    """episode_index -> success from recorder sidecars; "discard" outcomes come back as the string."""
    labels: dict[int, bool | str | None] = {}
    for path in sorted((root / SIDECAR_DIR).glob("episode_*.json")):
        try:
            data = json.loads(path.read_text())
            index = int(data["episode_index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LabelError(f"sidecar {path} is unreadable ({exc})") from exc
        outcome = str(data.get("outcome", "unknown")).lower()
        labels[index] = "discard" if outcome == "discard" else parse_success(outcome, str(path))
    return labels


def read_feature_labels(ds) -> tuple[str, dict[int, bool]] | None:
    """(feature, episode_index -> any frame successful) from a success feature, or None without one."""
    feature = next((f for f in SUCCESS_FEATURES if f in ds.meta.features), None)
    if feature is None:
        return None
    columns = ds.hf_dataset.select_columns(["episode_index", feature])[:]
    success: dict[int, bool] = {}
    for episode, flag in zip(columns["episode_index"], columns[feature], strict=True):
        value = bool(np.asarray(flag).any())
        episode = int(np.asarray(episode))
        success[episode] = success.get(episode, False) or value
    return feature, success


def episode_labels(spec: DatasetSpec, ds, source: LabelSource) -> tuple[str, dict[int, bool | str | None]]:
    """(source used, labels) for one dataset; LabelError with LABELS_HELP when there is none."""
    if source in (LabelSource.FILE, LabelSource.AUTO) and spec.labels is not None:
        return "file", read_labels_file(spec.labels)
    if source is LabelSource.FILE:
        raise LabelError(f"label_source 'file' but no labels file is given for {spec.root}.\n{LABELS_HELP}")
    if source in (LabelSource.SIDECAR, LabelSource.AUTO):
        sidecars = read_sidecar_labels(spec.root)
        if sidecars:
            return "sidecar", sidecars
        if source is LabelSource.SIDECAR:
            raise LabelError(f"no sidecars in {spec.root / SIDECAR_DIR}.\n{LABELS_HELP}")
    found = read_feature_labels(ds)
    if found is not None:
        return "feature", dict(found[1])
    raise LabelError(f"dataset {spec.root} has no success labels.\n{LABELS_HELP}")


def load_episodes(specs: list[DatasetSpec], cfg: SampleConfig) -> EpisodeSet:
    """Every labelled, long-enough episode of the datasets; skipped ones are counted by reason."""
    if not specs:
        raise ValueError("no datasets given")
    store = FrameStore(specs)
    episodes: list[Episode] = []
    skipped: Counter = Counter()
    for d, spec in enumerate(specs):
        ds = store.dataset(d)
        label_from, labels = episode_labels(spec, ds, cfg.label_source)
        meta = ds.meta.episodes
        for row in range(len(meta)):
            index = int(meta[row]["episode_index"])
            start, stop = int(meta[row]["dataset_from_index"]), int(meta[row]["dataset_to_index"])
            label = labels.get(index)
            if label == "discard":
                skipped["discarded"] += 1
                continue
            if label is None:
                skipped["unlabeled"] += 1
                continue
            if stop - start < cfg.min_frames:
                skipped["too_short"] += 1
                continue
            tasks = meta[row]["tasks"]
            task = spec.task or (tasks[0] if isinstance(tasks, list) and tasks else str(tasks))
            try:
                task = prompts.check_task(task)
            except prompts.PromptError as exc:
                log.warning("episode %s of %s skipped: %s", index, spec.root, exc)
                skipped["bad_task"] += 1
                continue
            episodes.append(Episode(EpisodeKey(d, index), task, start, stop - start, bool(label), label_from))
    if not episodes:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "the datasets are empty"
        hint = f"\n{LABELS_HELP}" if skipped.get("unlabeled") else ""
        raise LabelError(f"no usable episode ({reasons}).{hint}")
    for reason, count in skipped.items():
        log.info("skipped %d episodes: %s", count, reason)
    return EpisodeSet(episodes, skipped, store, list(specs))


# --- splitting and sampling ---------------------------------------------------------------------------


def split_episodes(
    episodes: list[Episode], eval_fraction: float, seed: int
) -> tuple[list[Episode], list[Episode]]:
    """(train, held_out), by episode, stratified by outcome; deterministic for a seed.

    Each outcome with at least two episodes keeps one in each part.
    """
    rng = np.random.default_rng(seed)
    train: list[Episode] = []
    held: list[Episode] = []
    for outcome in (True, False):
        group = sorted(
            (ep for ep in episodes if ep.success is outcome), key=lambda ep: (ep.key.dataset, ep.key.episode)
        )
        order = rng.permutation(len(group))
        n_held = round(eval_fraction * len(group)) if eval_fraction > 0 else 0
        if eval_fraction > 0 and len(group) >= 2:
            n_held = min(max(n_held, 1), len(group) - 1)
        held += [group[i] for i in order[:n_held]]
        train += [group[i] for i in order[n_held:]]
    return train, held


def progress_samples(episodes: list[Episode], cfg: SampleConfig, rng: np.random.Generator) -> list[Sample]:
    """progress_per_label frames per 0.1 grid value and successful episode (balanced over the answers)."""
    out: list[Sample] = []
    for ep in episodes:
        if not ep.success:
            continue
        by_label: dict[str, list[int]] = {}
        for t in range(ep.length):
            by_label.setdefault(progress_label(t, ep.length), []).append(t)
        for label in sorted(by_label):
            chosen = (
                [int(rng.choice(by_label[label]))]
                if cfg.progress_per_label == 1
                else _pick(by_label[label], cfg.progress_per_label, rng)
            )
            for t in chosen:
                frames = (0, t) if cfg.use_initial_frame else (t,)
                out.append(Sample(Modality.PROGRESS, ep.key, ep.task, frames, label, "time"))
    return out


def completion_samples(
    episodes: list[Episode], cfg: SampleConfig, rng: np.random.Generator, balance: str = "oversample"
) -> list[Sample]:
    """yes: last frames of successes; no: early frames of successes and end frames of failures."""
    yes: list[Sample] = []
    no: list[Sample] = []
    k = cfg.completion_per_episode
    for ep in episodes:
        last = ep.length - 1
        end_start = min(last, math.ceil((1.0 - cfg.completion_end_fraction) * last))
        end_frames = list(range(end_start, ep.length))
        if ep.success:
            early = [t for t in range(ep.length) if t / last < cfg.completion_no_before]
            yes += [
                _one(Modality.COMPLETION, ep, (t,), "yes", "success_end") for t in _pick(end_frames, k, rng)
            ]
            no += [
                _one(Modality.COMPLETION, ep, (t,), "no", "success_early") for t in _pick(early, k // 2, rng)
            ]
        else:
            no += [
                _one(Modality.COMPLETION, ep, (t,), "no", "failure_end") for t in _pick(end_frames, k, rng)
            ]
    return balance_classes([yes, no], rng, balance)


def contrastive_samples(episodes: list[Episode], cfg: SampleConfig, rng: np.random.Generator) -> list[Sample]:
    """Time-ordered pairs within successful episodes: forward (ImageB), swapped or rewound (ImageA)."""
    out: list[Sample] = []
    n = cfg.contrastive_per_episode
    for ep in episodes:
        if not ep.success:
            continue
        last = ep.length - 1
        gap = max(1, math.ceil(cfg.contrastive_min_gap * last))
        if gap > last:
            continue
        for i in range(n):
            early = int(rng.integers(0, last - gap + 1))
            late = int(rng.integers(early + gap, last + 1))
            if i % 2 == 0:
                out.append(_one(Modality.CONTRASTIVE, ep, (early, late), "ImageB", "forward"))
            elif rng.random() < cfg.rewound_share:
                # A clip played forward up to `late`, then rewound to `early`: B (the later frame of the
                # rewound clip) shows less progress than A (where the rewind started).
                out.append(_one(Modality.CONTRASTIVE, ep, (late, early), "ImageA", "rewound"))
            else:
                out.append(_one(Modality.CONTRASTIVE, ep, (late, early), "ImageA", "swapped"))
    return out


def voc_frames(ep: Episode, n: int) -> list[int]:
    """n frame indices spread evenly over an episode (fewer when it is shorter), first and last included."""
    return sorted({round(x) for x in np.linspace(0, ep.length - 1, num=min(n, ep.length))})


def build_samples(
    episodes: list[Episode], modality: Modality, cfg: SampleConfig, seed: int, balance: str = "oversample"
) -> list[Sample]:
    """All samples of one modality, shuffled deterministically for the seed."""
    rng = np.random.default_rng([seed, list(Modality).index(modality)])
    if modality is Modality.PROGRESS:
        samples = progress_samples(episodes, cfg, rng)
    elif modality is Modality.COMPLETION:
        samples = completion_samples(episodes, cfg, rng, balance)
    else:
        samples = contrastive_samples(episodes, cfg, rng)
    return [samples[i] for i in rng.permutation(len(samples))]


def balance_classes(groups: list[list[Sample]], rng: np.random.Generator, mode: str) -> list[Sample]:
    """Equal class sizes: "oversample" repeats the minority, "downsample" trims the majority, "none"."""
    groups = [g for g in groups if g]
    if mode == "none" or len(groups) < 2:
        return [s for g in groups for s in g]
    if mode == "oversample":
        size = max(len(g) for g in groups)
        return [s for g in groups for s in (g + [g[int(i)] for i in rng.integers(0, len(g), size - len(g))])]
    if mode == "downsample":
        size = min(len(g) for g in groups)
        return [g[int(i)] for g in groups for i in sorted(rng.choice(len(g), size, replace=False))]
    raise ValueError(f"balance mode must be oversample, downsample or none, got {mode!r}")


def class_counts(samples: list[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in samples).items()))


def to_query(sample: Sample, episodes: dict[EpisodeKey, Episode], store: FrameStore) -> Query:
    """The engine query for a sample (images loaded from the dataset)."""
    ep = episodes[sample.episode]
    return Query(sample.modality, sample.task, [store.frame(ep, t) for t in sample.frames])


def chat_messages(sample: Sample) -> list[dict]:
    """The user turn of a sample, exactly as core/prompts.py builds it for the engine."""
    return prompts.build_messages(sample.modality, sample.task, len(sample.frames))


def _pick(candidates: list[int], k: int, rng: np.random.Generator) -> list[int]:
    if not candidates or k <= 0:
        return []
    if len(candidates) <= k:
        return list(candidates)
    return sorted(int(c) for c in rng.choice(candidates, k, replace=False))


def _one(modality: Modality, ep: Episode, frames: tuple[int, ...], label: str, source: str) -> Sample:
    return Sample(modality, ep.key, ep.task, frames, label, source)
