"""Judge recorded episodes with the reward model: was the task done?

What it is for: the nightly loop (and the refinement node's ~/judge_episode service) asks the reward
engine, per episode, for the completion probability on the last N frames and for a progress curve
([initial frame, frame] every k frames), and writes one judgment JSON per episode to
`<dataset>/judgments/episode_XXXXXX.json`. Refinement keeps the successes (arXiv 2603.16065, real-robot
self-improvement: LRM-judged successes refine the imitation policy).

Verdict: success when the mean completion probability over the last N frames reaches
`success_threshold` or, when `progress_success_threshold` is set, the final progress reaches that (the
progress adapter learns from every frame of every episode, and on the demo's rollouts it saw finished
tasks the completion adapter missed: docs/adaptation.md, "Either adapter"); when `progress_threshold` is
set, the final progress must reach it too. Unsure when fewer than `min_parsed_fraction` of the answers
parsed. Confidence is the probability mass on the side of the verdict (completion_prob, or the final
progress for a success that progress alone called; 1 - completion_prob for a failure) times the parsed
fraction.

Judgments are written one episode at a time (atomic rename), so a killed run resumes where it stopped;
judged episodes are skipped unless force=True. A per-dataset file lock keeps two judges apart. A caller
can watch (`on_progress`, after every model call) and stop a run between model calls (`should_stop`):
the episode under way is then dropped, never half written (JudgeCanceledError says what was finished).

Which model: `lrm-judge --model ...` (judge_cli.py) loads its own copy; `lrm-judge --via-node
/reward_node` loads none and sends the work to the running reward node's `~/judge_episodes` action, which
judges with the model it already holds (one copy of the 8B per GPU for day and night;
docs/refinement.md). The client for that lives in lrm_reward.ros.judge_action and is imported only with
--via-node.

What it is not: no model code (the engine comes from lrm_reward.core.engine), no ROS in the judging itself.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.core.types import Answer, Modality, Query
from lrm_reward.durable_files import try_exclusive_lock, write_json_atomic
from lrm_reward.refinement.data_root import resolve_inside

log = logging.getLogger(__name__)

JUDGE_VERSION = "lrm-judge/1"
JUDGMENT_SCHEMA = "lrm.judgment/1"
JUDGMENTS_DIR = "judgments"
VERDICT_FAILURE, VERDICT_SUCCESS, VERDICT_UNSURE = "failure", "success", "unsure"
VERDICT_CODES = {VERDICT_FAILURE: 0, VERDICT_SUCCESS: 1, VERDICT_UNSURE: 2}  # EpisodeJudgment.VERDICT_*


class JudgeBusyError(RuntimeError):
    """Another judge holds this dataset's judgment lock."""


class DatasetNotFoundError(FileNotFoundError):
    pass


class JudgeCanceledError(RuntimeError):
    """A run stopped by its caller between two model calls; `judged` were written, the episode under way
    was dropped whole (no judgment file)."""

    def __init__(self, message: str, judged: list[Judgment], skipped: list[int], dataset: Path) -> None:
        super().__init__(message)
        self.judged = judged
        self.skipped = skipped
        self.dataset = dataset


@dataclass(frozen=True)
class JudgeProgress:
    """Where a judge run is: sent to `on_progress` after every model call and every finished episode."""

    episodes_done: int  # requested episodes finished (judged or skipped)
    episodes_total: int  # requested episodes
    episode_index: int  # episode being judged; -1 when none
    queries_done: int  # model queries answered for that episode
    queries_total: int  # model queries that episode needs


class _Stopped(Exception):
    """judge_episode was told to stop between two model calls."""


@dataclass
class JudgeConfig:
    completion_last_n: int = 3  # completion is asked on the last N frames and averaged
    curve_every_k: int = 10  # progress sampled every k frames (paper: k = 10), plus the last frame
    success_threshold: float = 0.5  # mean completion probability needed for success
    progress_threshold: float | None = None  # if set, final progress must reach it as well
    progress_success_threshold: float | None = None  # if set, final progress this high is a success alone
    min_parsed_fraction: float = 0.5  # below this the verdict is "unsure"
    camera: str | None = None  # image feature to judge (observation.images.<camera>); None = first
    max_queries_per_call: int = 16  # queries per engine.score call
    skip_partial: bool = False  # do not judge episodes their recorder marked partial

    def __post_init__(self) -> None:
        if self.completion_last_n < 1:
            raise ValueError("JudgeConfig.completion_last_n must be >= 1")
        if self.curve_every_k < 1:
            raise ValueError("JudgeConfig.curve_every_k must be >= 1")
        if not 0.0 < self.success_threshold < 1.0:
            raise ValueError("JudgeConfig.success_threshold must be in (0, 1)")
        if self.progress_threshold is not None and not 0.0 <= self.progress_threshold <= 1.0:
            raise ValueError("JudgeConfig.progress_threshold must be in [0, 1]")
        pst = self.progress_success_threshold
        if pst is not None and not 0.0 < pst <= 1.0:
            raise ValueError("JudgeConfig.progress_success_threshold must be in (0, 1]")
        if not 0.0 <= self.min_parsed_fraction <= 1.0:
            raise ValueError("JudgeConfig.min_parsed_fraction must be in [0, 1]")
        if self.max_queries_per_call < 1:
            raise ValueError("JudgeConfig.max_queries_per_call must be >= 1")

    def thresholds(self) -> dict:
        return {
            "completion_last_n": self.completion_last_n,
            "curve_every_k": self.curve_every_k,
            "success_threshold": self.success_threshold,
            "progress_threshold": self.progress_threshold,
            "progress_success_threshold": self.progress_success_threshold,
            "min_parsed_fraction": self.min_parsed_fraction,
        }


@dataclass
class Judgment:
    dataset: str
    episode_index: int
    task: str
    verdict: str
    success: bool
    confidence: float
    completion_prob: float
    final_progress: float
    curve_frame_indices: list[int]
    progress_curve: list[float]
    completion_frame_indices: list[int]
    completion_probs: list[float]
    num_frames: int
    parsed_fraction: float
    errors: list[str]
    model_id: str
    thresholds: dict
    camera: str
    recorded_outcome: str | None = None  # operator label from the recording sidecar
    partial: bool = False
    judged_at: str = ""
    judge_version: str = JUDGE_VERSION
    schema: str = JUDGMENT_SCHEMA
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Judgment:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


def judgment_path(dataset_root: Path, episode_index: int) -> Path:
    return Path(dataset_root) / JUDGMENTS_DIR / f"episode_{episode_index:06d}.json"


def load_judgments(dataset_root: Path) -> dict[int, Judgment]:
    """Every stored judgment of a dataset, by episode index (unreadable files are skipped, logged)."""
    out: dict[int, Judgment] = {}
    folder = Path(dataset_root) / JUDGMENTS_DIR
    for path in sorted(folder.glob("episode_*.json")):
        try:
            j = Judgment.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("skipping unreadable judgment %s: %s", path, exc)
            continue
        out[j.episode_index] = j
    return out


def passes(
    completion_prob: float,
    final_progress: float,
    success_threshold: float,
    progress_threshold: float | None = None,
    progress_success_threshold: float | None = None,
) -> bool:
    """The verdict rule on an episode's two numbers (NaN reaches no threshold); calibration uses it too."""
    enough = progress_success_threshold
    said = completion_prob >= success_threshold or (enough is not None and final_progress >= enough)
    return said and (progress_threshold is None or final_progress >= progress_threshold)


def decide(
    completion_probs: list[float | None],
    progress_curve: list[float | None],
    cfg: JudgeConfig,
) -> tuple[str, float, float, float, float]:
    """(verdict, confidence, completion_prob, final_progress, parsed_fraction) from the raw answers.

    None stands for an answer that did not parse.
    """
    answers = list(completion_probs) + list(progress_curve)
    parsed = [a for a in answers if a is not None]
    parsed_fraction = len(parsed) / len(answers) if answers else 0.0
    comp = [c for c in completion_probs if c is not None]
    prog = [p for p in progress_curve if p is not None]
    completion_prob = float(np.mean(comp)) if comp else float("nan")
    final_progress = float(prog[-1]) if prog else float("nan")
    if not comp or parsed_fraction < cfg.min_parsed_fraction:
        return VERDICT_UNSURE, 0.0, completion_prob, final_progress, parsed_fraction
    # final_progress is NaN without a parsed progress answer: no progress threshold passes then
    success = passes(
        completion_prob,
        final_progress,
        cfg.success_threshold,
        cfg.progress_threshold,
        cfg.progress_success_threshold,
    )
    by_completion = completion_prob >= cfg.success_threshold
    if success:
        confidence = (completion_prob if by_completion else final_progress) * parsed_fraction
    else:
        confidence = (1.0 - completion_prob) * parsed_fraction
    return (
        (VERDICT_SUCCESS if success else VERDICT_FAILURE),
        confidence,
        completion_prob,
        final_progress,
        parsed_fraction,
    )


class EpisodeFrames:
    """Reads frames of one recorded dataset (stock lerobot, pyav) as HxWx3 uint8 arrays."""

    def __init__(self, dataset_root: Path, camera: str | None = None) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.root = Path(dataset_root)
        if not (self.root / "meta" / "info.json").exists():
            raise DatasetNotFoundError(f"no LeRobotDataset at {self.root} (meta/info.json missing)")
        self.ds = LeRobotDataset(f"lrm/{self.root.name}", root=self.root, video_backend="pyav")
        cams = self.ds.meta.camera_keys
        if not cams:
            raise ValueError(f"dataset {self.root.name} has no camera feature to judge")
        self.camera_key = cams[0] if camera is None else f"observation.images.{camera}"
        if self.camera_key not in cams:
            raise ValueError(f"dataset {self.root.name} has no camera {camera!r}; it has {cams}")

    @property
    def num_episodes(self) -> int:
        return self.ds.meta.total_episodes

    def episode_length(self, episode_index: int) -> int:
        return int(self.ds.meta.episodes[episode_index]["length"])

    def task(self, episode_index: int) -> str:
        return str(self.ds.meta.episodes[episode_index]["tasks"][0])

    def frame(self, episode_index: int, frame_index: int) -> np.ndarray:
        start = int(self.ds.meta.episodes[episode_index]["dataset_from_index"])
        item = self.ds[start + frame_index]
        chw = item[self.camera_key].numpy()
        return np.ascontiguousarray(
            (np.clip(chw, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0)
        )


def curve_frame_indices(num_frames: int, every_k: int) -> list[int]:
    idx = list(range(0, num_frames, every_k))
    if idx[-1] != num_frames - 1:
        idx.append(num_frames - 1)
    return idx


def judge_episode(
    frames: EpisodeFrames,
    episode_index: int,
    engine,
    cfg: JudgeConfig,
    on_queries: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Judgment:
    """Ask the engine about one episode and build its judgment (not written).

    on_queries(done, total) after every model call; should_stop() before each: when true, raises _Stopped.
    """
    n = frames.episode_length(episode_index)
    task = frames.task(episode_index)
    curve_idx = curve_frame_indices(n, cfg.curve_every_k)
    comp_idx = list(range(max(0, n - cfg.completion_last_n), n))
    cache: dict[int, np.ndarray] = {}

    def image(i: int) -> np.ndarray:
        if i not in cache:
            cache[i] = frames.frame(episode_index, i)
        return cache[i]

    initial = image(0)
    queries = [Query(Modality.PROGRESS, task, [initial, image(i)]) for i in curve_idx]
    queries += [Query(Modality.COMPLETION, task, [image(i)]) for i in comp_idx]
    answers: list[Answer] = []
    for start in range(0, len(queries), cfg.max_queries_per_call):
        if should_stop is not None and should_stop():
            raise _Stopped
        answers.extend(engine.score(queries[start : start + cfg.max_queries_per_call]))
        if on_queries is not None:
            on_queries(len(answers), len(queries))
    if len(answers) != len(queries):
        raise RuntimeError(f"engine returned {len(answers)} answers for {len(queries)} queries")

    def value(a: Answer) -> float | None:
        return float(a.value) if a.parsed and a.value is not None and np.isfinite(a.value) else None

    progress = [value(a) for a in answers[: len(curve_idx)]]
    completion = [value(a) for a in answers[len(curve_idx) :]]
    verdict, confidence, comp_prob, final_progress, parsed_fraction = decide(completion, progress, cfg)
    errors = sorted({a.error for a in answers if a.error})
    sidecar = _read_sidecar(frames.root, episode_index)
    return Judgment(
        dataset=str(frames.root),
        episode_index=episode_index,
        task=task,
        verdict=verdict,
        success=verdict == VERDICT_SUCCESS,
        confidence=float(confidence),
        completion_prob=comp_prob,
        final_progress=final_progress,
        curve_frame_indices=curve_idx,
        progress_curve=[float("nan") if p is None else p for p in progress],
        completion_frame_indices=comp_idx,
        completion_probs=[float("nan") if c is None else c for c in completion],
        num_frames=n,
        parsed_fraction=parsed_fraction,
        errors=errors[:10],
        model_id=str(getattr(engine, "model_id", "unknown")),
        thresholds=cfg.thresholds(),
        camera=frames.camera_key,
        recorded_outcome=sidecar.get("outcome"),
        partial=bool(sidecar.get("partial", False)),
        judged_at=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    )


@dataclass
class JudgeRunResult:
    judged: list[Judgment]
    skipped: list[int]  # already judged (or partial, when skipped)
    dataset: Path


def judge_dataset(
    dataset_root: Path | str,
    engine,
    cfg: JudgeConfig | None = None,
    episodes: Iterable[int] | None = None,
    force: bool = False,
    progress_bar: bool = True,
    data_root: Path | str | None = None,
    on_progress: Callable[[JudgeProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> JudgeRunResult:
    """Judge the episodes of one dataset; writes a judgment file per episode as it goes.

    data_root: when given (service calls), the dataset must resolve inside it (OutsideDataRootError).
    on_progress: called after every model call and every finished episode (JudgeProgress).
    should_stop: asked before every model call; when it answers true the run ends with JudgeCanceledError
    (episodes finished before stay written, the one under way is dropped whole).
    Raises DatasetNotFoundError, IndexError (unknown episode), JudgeBusyError, JudgeCanceledError.
    """
    cfg = cfg or JudgeConfig()
    root = resolve_inside(data_root, dataset_root) if data_root is not None else Path(dataset_root).resolve()
    if not (root / "meta" / "info.json").exists():
        raise DatasetNotFoundError(f"no LeRobotDataset at {root}")
    with _judge_lock(root):
        frames = EpisodeFrames(root, cfg.camera)
        wanted = list(range(frames.num_episodes)) if episodes is None else list(episodes)
        for e in wanted:
            if not 0 <= e < frames.num_episodes:
                raise IndexError(f"dataset {root.name} has episodes 0..{frames.num_episodes - 1}, not {e}")
        todo, skipped = [], []
        for e in wanted:
            if (not force and judgment_path(root, e).exists()) or (
                cfg.skip_partial and _read_sidecar(root, e).get("partial")
            ):
                skipped.append(e)
            else:
                todo.append(e)
        judged: list[Judgment] = []
        total = len(wanted)

        def report(episode: int, queries_done: int = 0, queries_total: int = 0) -> None:
            if on_progress is not None:
                done = len(skipped) + len(judged)
                on_progress(JudgeProgress(done, total, episode, queries_done, queries_total))

        report(-1)
        for e in _progress(todo, progress_bar, f"judging {root.name}"):
            try:
                j = judge_episode(
                    frames,
                    e,
                    engine,
                    cfg,
                    on_queries=lambda done, n, e=e: report(e, done, n),
                    should_stop=should_stop,
                )
            except _Stopped:
                raise JudgeCanceledError(
                    f"stopped during episode {e} (not written); {len(judged)} judged before it",
                    judged,
                    skipped,
                    root,
                ) from None
            write_json_atomic(judgment_path(root, e), j.to_json())
            judged.append(j)
            report(-1)
        return JudgeRunResult(judged=judged, skipped=skipped, dataset=root)


def calibrate_against_operator(
    dataset_root: Path, cfg: JudgeConfig, judgments: dict[int, Judgment] | None = None
) -> str:
    """Compare every stored judgment of a dataset (`judgments`: already loaded with load_judgments) with
    the operator's labels (written to judgments/calibration.json + .png); one line saying how well they
    agree, or how to get labels."""
    from lrm_reward.refinement.calibration import calibrate, write_calibration

    if judgments is None:
        judgments = load_judgments(dataset_root)
    cal = calibrate(
        judgments.values(), cfg.success_threshold, cfg.progress_threshold, cfg.progress_success_threshold
    )
    if cal is None:
        return (
            "no operator labels to check the judge against (stop episodes with OUTCOME_SUCCESS or "
            "OUTCOME_FAILURE to get them)"
        )
    _, png = write_calibration(dataset_root, cal)
    return f"{cal.summary()}; plot: {png}"


def _progress(items: list[int], enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="episode")


class _judge_lock:
    def __init__(self, root: Path) -> None:
        self.path = root / JUDGMENTS_DIR / ".lock"

    def __enter__(self):
        self.handle = try_exclusive_lock(self.path)
        if self.handle is None:
            raise JudgeBusyError(f"another judge is working on {self.path.parent.parent}")
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def _read_sidecar(root: Path, episode_index: int) -> dict:
    path = Path(root) / "recording" / f"episode_{episode_index:06d}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def parse_adapters(spec: str | None) -> dict[str, str] | None:
    """ "progress=/a,completion=/b" or one folder holding progress/ completion/ contrastive/ subfolders."""
    if not spec:
        return None
    if "=" not in spec:
        folder = Path(spec)
        found = {m.value: str(folder / m.value) for m in Modality if (folder / m.value).is_dir()}
        if not found:
            raise ValueError(f"{folder} holds none of the adapter folders {[m.value for m in Modality]}")
        return found
    out = {}
    for part in spec.split(","):
        name, _, path = part.partition("=")
        name = name.strip()
        if name not in {m.value for m in Modality}:
            raise ValueError(f"unknown adapter {name!r}; expected one of {[m.value for m in Modality]}")
        out[name] = path.strip()
    return out
