"""Episode state, interval-hold scheduling and reward fusion for one camera stream (or robot).

Turns a stream of frames into the model queries the LRM recipe asks for (arXiv 2603.16065) and the
model's answers back into one dense reward per frame:

- progress compares the episode's initial frame with the current one: images [initial, current];
- contrastive compares the frame of the previous query (A) with the current one (B); it is skipped on an
  episode's first query, where there is no previous frame;
- completion looks at the current frame only.

Interval-Hold (the paper's k=10): the model is asked every k frames, or every T seconds of frame stamp
time; frames in between repeat ("hold") the last values, or get reward 0 ("zero"). Fusion is a weighted
mean of the available modalities with contrastive mapped from [-1, 1] to [0, 1] by (x+1)/2; equal
weights over the three modalities is the paper's "tri" mode. A completion flag needs N consecutive
answers on the same side of the threshold to change (debounce).

Not here: running the model (``RewardEngine``), ROS message handling, or threads. One tracker belongs to
one stream and is not thread-safe; the node serialises access. Time only comes from frame stamps, never
from a wall clock, so tests and replays are deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lrm_reward.core.images import to_rgb_uint8
from lrm_reward.core.types import Answer, Modality, Query, RewardResult

# "student": the tracker holds, and the caller fills the frames between queries with a distilled student's
# values (student/between.py; with_student below), falling back to hold where it has no student.
BETWEEN_MODES = ("hold", "zero", "student")

# Prefix of Answer.error when score_frames turns an engine exception into failed answers.
ENGINE_ERROR_PREFIX = "engine raised "

# Valid value range of each modality's answer (see core.types.Answer).
_VALUE_RANGE = {
    Modality.PROGRESS: (0.0, 1.0),
    Modality.CONTRASTIVE: (-1.0, 1.0),
    Modality.COMPLETION: (0.0, 1.0),
}

# Stamps are floats in seconds; this tolerance keeps k*T grids from missing a slot to rounding.
_STAMP_EPS = 1e-9


@dataclass
class TrackerConfig:
    """How often to ask the model, what to do in between, and how to fuse the answers."""

    modalities: tuple[Modality, ...] = (Modality.PROGRESS, Modality.COMPLETION)
    interval_frames: int = 10  # query every k frames (paper: k=10) ...
    interval_s: float | None = None  # ... or every T seconds of stamp time, when set (takes precedence)
    between: str = "hold"  # "hold" repeats the last values between queries, "zero" zeros the reward
    # Per-modality fusion weights keyed by modality name; None = equal ("tri" mean over all three).
    # A queried modality missing from the dict gets weight 0: still asked (e.g. for the completion flag),
    # but left out of the reward.
    weights: dict[str, float] | None = None
    completion_threshold: float = 0.5  # P(yes) at or above this counts as "done"
    completion_debounce: int = 3  # consecutive answers on one side of the threshold to flip the flag
    chain_of_thought: bool = False  # passed to contrastive queries (step-by-step analysis, generate readout)

    def __post_init__(self) -> None:
        if isinstance(self.modalities, (str, Modality)):
            raise ValueError("modalities must be a sequence of modality names, not a single string")
        try:
            self.modalities = tuple(Modality(m) for m in self.modalities)
        except ValueError as exc:
            raise ValueError(f"modalities: {exc}; known: {[m.value for m in Modality]}") from None
        if not self.modalities:
            raise ValueError("modalities must name at least one of " + str([m.value for m in Modality]))
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must not repeat, got {[m.value for m in self.modalities]}")

        if isinstance(self.interval_frames, bool) or not isinstance(self.interval_frames, (int, np.integer)):
            raise ValueError(f"interval_frames must be an integer >= 1, got {self.interval_frames!r}")
        if self.interval_frames < 1:
            raise ValueError(f"interval_frames must be >= 1, got {self.interval_frames}")
        self.interval_frames = int(self.interval_frames)
        if self.interval_s is not None:
            if not _is_real(self.interval_s) or not math.isfinite(self.interval_s) or self.interval_s <= 0:
                raise ValueError(f"interval_s must be a finite number > 0 or None, got {self.interval_s!r}")
            self.interval_s = float(self.interval_s)

        if self.between not in BETWEEN_MODES:
            raise ValueError(f"between must be one of {BETWEEN_MODES}, got {self.between!r}")

        if self.weights is not None:
            self.weights = self._validated_weights(self.weights)

        threshold = self.completion_threshold
        if not _is_real(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"completion_threshold must be in [0, 1], got {threshold!r}")
        self.completion_threshold = float(threshold)
        debounce = self.completion_debounce
        if isinstance(debounce, bool) or not isinstance(debounce, (int, np.integer)) or debounce < 1:
            raise ValueError(f"completion_debounce must be an integer >= 1, got {debounce!r}")
        self.completion_debounce = int(debounce)
        if not isinstance(self.chain_of_thought, bool):
            raise ValueError(f"chain_of_thought must be a bool, got {self.chain_of_thought!r}")

    def _validated_weights(self, weights: dict[str, float]) -> dict[str, float]:
        if not isinstance(weights, dict):
            raise ValueError(
                f"weights must be a dict of modality name -> weight, got {type(weights).__name__}"
            )
        clean: dict[str, float] = {}
        for key, weight in weights.items():
            try:
                modality = Modality(key)
            except ValueError:
                raise ValueError(
                    f"weights: unknown modality {key!r}; known: {[m.value for m in Modality]}"
                ) from None
            if modality not in self.modalities:
                raise ValueError(
                    f"weights: {modality.value!r} has a weight but is not in modalities "
                    f"{[m.value for m in self.modalities]}"
                )
            if not _is_real(weight) or not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weights[{modality.value!r}] must be a finite number >= 0, got {weight!r}")
            clean[modality.value] = float(weight)
        if sum(clean.values()) <= 0:
            raise ValueError(f"weights must have a positive sum, got {clean}")
        return clean

    def fusion_weights(self) -> dict[Modality, float]:
        """Weight of every queried modality (equal weights when ``weights`` is None)."""
        if self.weights is None:
            return {m: 1.0 for m in self.modalities}
        return {m: self.weights.get(m.value, 0.0) for m in self.modalities}


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class IntervalHold:
    """Decides which frames go to the model: every ``every_frames`` frames, or every ``every_s`` seconds.

    Time comes from the frame stamps passed in, never from a wall clock. With ``every_s`` the query
    slots sit on a grid anchored at the first queried stamp (so camera jitter does not slowly lower the
    query rate); a stamp that goes backwards (bag loop, clock reset) re-anchors and queries at once.
    A frame that is due but not queried (the caller called ``skip``) leaves the next frame due.
    """

    def __init__(self, every_frames: int = 10, every_s: float | None = None) -> None:
        if every_frames < 1:
            raise ValueError(f"every_frames must be >= 1, got {every_frames}")
        if every_s is not None and not (math.isfinite(every_s) and every_s > 0):
            raise ValueError(f"every_s must be a finite number > 0 or None, got {every_s}")
        self.every_frames = int(every_frames)
        self.every_s = every_s
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next frame is due."""
        self._frames_since_query: int | None = None  # None: nothing queried yet
        self._anchor_s: float | None = None
        self._last_query_s: float | None = None
        self._next_due_s: float | None = None

    def is_due(self, stamp_s: float) -> bool:
        """Whether a frame with this stamp should be queried (no state change)."""
        if self._frames_since_query is None:
            return True
        if self.every_s is None:
            return self._frames_since_query + 1 >= self.every_frames
        assert self._last_query_s is not None and self._next_due_s is not None
        return stamp_s < self._last_query_s or stamp_s >= self._next_due_s - _STAMP_EPS

    def step(self, stamp_s: float) -> bool:
        """Advance by one frame; return True when this frame is queried."""
        if self.is_due(stamp_s):
            self._mark_queried(stamp_s)
            return True
        self.skip()
        return False

    def skip(self) -> None:
        """Advance by one frame that is not queried (it still counts towards the next frame interval)."""
        if self._frames_since_query is not None:
            self._frames_since_query += 1

    def _mark_queried(self, stamp_s: float) -> None:
        self._frames_since_query = 0
        if self.every_s is not None:
            if self._anchor_s is None or self._last_query_s is None or stamp_s < self._last_query_s:
                self._anchor_s = stamp_s
            slots = math.floor((stamp_s - self._anchor_s) / self.every_s + _STAMP_EPS) + 1
            self._next_due_s = self._anchor_s + slots * self.every_s
        self._last_query_s = stamp_s


@dataclass
class FramePlan:
    """What to ask the model about one frame; ``queries == []`` means the frame is held."""

    stamp_s: float
    episode_id: int
    frame_index: int
    queries: list[Query] = field(default_factory=list)


class ScoringEngine(Protocol):
    """The part of ``RewardEngine`` the tracker needs."""

    def score(self, queries: list[Query]) -> list[Answer]: ...


class EpisodeTracker:
    """Episode state for one stream: initial frame, previous query frame, last values, completion flag.

    Use ``plan`` -> engine.score(plan.queries) -> ``update`` per frame (or ``score_frames`` for several
    streams at once), and ``held`` for frames that skip the model entirely (e.g. dropped while busy).

    Attributes: ``task``; ``episode_id`` (0 for the first episode, +1 on each reset); ``frame_index``
    (frames seen in this episode, i.e. the index the next frame gets); ``queries_total``,
    ``unparsed_total`` and ``frames_total`` count across episodes for diagnostics.
    """

    def __init__(self, task: str, cfg: TrackerConfig | None = None, stream: str = "") -> None:
        self.cfg = cfg if cfg is not None else TrackerConfig()
        self.stream = stream
        self.task = _validated_task(task)
        self.episode_id = 0
        self.queries_total = 0
        self.unparsed_total = 0
        self.frames_total = 0
        self._weights = self.cfg.fusion_weights()
        self._schedule = IntervalHold(self.cfg.interval_frames, self.cfg.interval_s)
        self._clear_episode()

    # -- episode ---------------------------------------------------------------------------------

    def reset(self, task: str | None = None) -> None:
        """Start a new episode (optionally with a new task): the next frame becomes the initial frame."""
        if task is not None:
            self.task = _validated_task(task)
        self.episode_id += 1
        self._clear_episode()

    def set_config(self, cfg: TrackerConfig) -> None:
        """Switch to a new (already validated) config mid-episode, e.g. after a parameter change.

        The episode's frames and values stay; the interval restarts, so the next frame is queried.
        """
        self.cfg = cfg
        self._weights = cfg.fusion_weights()
        self._schedule = IntervalHold(cfg.interval_frames, cfg.interval_s)
        self._values = {m: v for m, v in self._values.items() if m in cfg.modalities}

    def _clear_episode(self) -> None:
        self.frame_index = 0
        self._schedule.reset()
        self._initial: np.ndarray | None = None
        self._previous_query: np.ndarray | None = None
        self._values: dict[Modality, float] = {}
        self._scored_stamp_s = float("nan")
        self._latency_s = 0.0
        self._reasoning = ""
        self._completed = False
        self._streak = 0  # consecutive completion answers disagreeing with the current flag

    @property
    def initial_frame(self) -> np.ndarray | None:
        """The episode's first frame (RGB uint8), or None before it arrives."""
        return self._initial

    @property
    def completed(self) -> bool:
        return self._completed

    # -- per frame -------------------------------------------------------------------------------

    def plan(self, image: np.ndarray, stamp_s: float) -> FramePlan:
        """Count this frame and return the queries to ask about it ([] when it is held).

        Raises ValueError (before any state changes) for an image ``to_rgb_uint8`` rejects or a stamp
        that is not a finite number.
        """
        rgb = to_rgb_uint8(image)
        return self._plan_rgb(rgb, _validated_stamp(stamp_s))

    def _plan_rgb(self, rgb: np.ndarray, stamp_s: float) -> FramePlan:
        plan = FramePlan(stamp_s=stamp_s, episode_id=self.episode_id, frame_index=self.frame_index)
        self.frame_index += 1
        self.frames_total += 1
        if not self._schedule.step(stamp_s):
            return plan
        # Own the pixels: the caller may reuse its buffer, and these frames live for the episode.
        current = np.array(rgb, copy=True)
        if self._initial is None:
            self._initial = current
        for modality in self.cfg.modalities:
            if modality is Modality.PROGRESS:
                plan.queries.append(Query(modality, self.task, [self._initial, current]))
            elif modality is Modality.CONTRASTIVE:
                if self._previous_query is not None:
                    plan.queries.append(
                        Query(
                            modality,
                            self.task,
                            [self._previous_query, current],
                            chain_of_thought=self.cfg.chain_of_thought,
                        )
                    )
            else:
                plan.queries.append(Query(modality, self.task, [current]))
        self._previous_query = current
        return plan

    def update(self, plan: FramePlan, answers: Sequence[Answer]) -> RewardResult:
        """Apply the model's answers to ``plan.queries`` (same order) and return the frame's reward.

        A held plan (no queries) gives the held result. Answers that did not parse (or carry a value that
        is None/NaN, or the wrong modality) are counted and leave the last good value in place. Answers to
        a plan from an earlier episode are returned in the result but not applied.
        """
        if len(answers) != len(plan.queries):
            raise ValueError(f"update got {len(answers)} answers for {len(plan.queries)} queries")
        if plan.episode_id == self.episode_id and not plan.queries:
            return self._held_result(plan.stamp_s, plan.frame_index)
        if plan.episode_id != self.episode_id:
            return RewardResult(
                stamp_s=plan.stamp_s,
                scored_stamp_s=plan.stamp_s,
                episode_id=plan.episode_id,
                frame_index=plan.frame_index,
                queried=bool(plan.queries),
                held=not plan.queries,
                answers=list(answers),
            )

        unparsed = 0
        applied = False
        latency = 0.0
        for query, answer in zip(plan.queries, answers, strict=True):
            latency = max(latency, answer.latency_s)
            value = _usable_value(query.modality, answer)
            if value is None:
                unparsed += 1
                continue
            applied = True
            self._values[query.modality] = value
            if query.modality is Modality.CONTRASTIVE and query.chain_of_thought and answer.raw_text:
                self._reasoning = answer.raw_text
            if query.modality is Modality.COMPLETION:
                self._debounce(value)
        self.queries_total += len(plan.queries)
        self.unparsed_total += unparsed
        if applied:
            self._scored_stamp_s = plan.stamp_s
            self._latency_s = latency

        result = self._result_from_values(plan.stamp_s, plan.frame_index)
        result.queried = True
        result.unparsed = unparsed
        result.latency_s = latency
        result.answers = list(answers)
        return result

    def held(self, stamp_s: float) -> RewardResult:
        """Count a frame that is not sent to the model and return its held (or zeroed) reward.

        If the frame was due for a query, the next planned frame still is.
        """
        stamp_s = _validated_stamp(stamp_s)
        index = self.frame_index
        self.frame_index += 1
        self.frames_total += 1
        self._schedule.skip()
        return self._held_result(stamp_s, index)

    def dropped(self, plan: FramePlan) -> RewardResult:
        """The reward of a frame planned for a query that will never be scored (a newer frame replaced it).

        The frame was already counted by ``plan``, so unlike ``held`` this counts nothing; it gets the held
        values at its own frame index. A plan from an earlier episode gets that episode's id and no values.
        """
        if plan.episode_id != self.episode_id:
            return self.update(FramePlan(plan.stamp_s, plan.episode_id, plan.frame_index), [])
        return self._held_result(plan.stamp_s, plan.frame_index)

    # -- fusion ----------------------------------------------------------------------------------

    def fused_reward(self) -> float:
        """Weighted mean of the available modality values (contrastive mapped to [0, 1]); 0 if none."""
        return self._fuse(self._values)

    def _fuse(self, values: dict[Modality, float]) -> float:
        total = 0.0
        weight_sum = 0.0
        for modality, value in values.items():
            weight = self._weights.get(modality, 0.0)
            if weight <= 0:
                continue
            if modality is Modality.CONTRASTIVE:
                value = (value + 1.0) / 2.0
            total += weight * value
            weight_sum += weight
        return total / weight_sum if weight_sum > 0 else 0.0

    def with_student(self, held: RewardResult, progress: float, completion: float) -> RewardResult:
        """A held frame's result with the student's progress and completion in place of the held ones
        (for the modalities the tracker asks), the reward fused from them. Contrastive (no student) and the
        completion flag stay the teacher's: the flag flips only on the reward model's own answers."""
        values = dict(self._values)
        if Modality.PROGRESS in self.cfg.modalities:
            values[Modality.PROGRESS] = min(max(float(progress), 0.0), 1.0)
        if Modality.COMPLETION in self.cfg.modalities:
            values[Modality.COMPLETION] = min(max(float(completion), 0.0), 1.0)
        return dataclasses.replace(
            held,
            progress=values.get(Modality.PROGRESS, float("nan")),
            completion_prob=values.get(Modality.COMPLETION, float("nan")),
            reward=self._fuse(values),
            student=True,
        )

    def _debounce(self, completion_prob: float) -> None:
        done = completion_prob >= self.cfg.completion_threshold
        if done == self._completed:
            self._streak = 0
            return
        self._streak += 1
        if self._streak >= self.cfg.completion_debounce:
            self._completed = done
            self._streak = 0

    def _result_from_values(self, stamp_s: float, frame_index: int) -> RewardResult:
        return RewardResult(
            stamp_s=stamp_s,
            scored_stamp_s=self._scored_stamp_s,
            episode_id=self.episode_id,
            frame_index=frame_index,
            progress=self._values.get(Modality.PROGRESS, float("nan")),
            contrastive=self._values.get(Modality.CONTRASTIVE, float("nan")),
            completion_prob=self._values.get(Modality.COMPLETION, float("nan")),
            completed=self._completed,
            reward=self.fused_reward(),
            latency_s=self._latency_s,
            reasoning=self._reasoning,
        )

    def _held_result(self, stamp_s: float, frame_index: int) -> RewardResult:
        result = self._result_from_values(stamp_s, frame_index)
        result.held = True
        if self.cfg.between == "zero":
            result.reward = 0.0
        return result


def _validated_task(task: str) -> str:
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, got {type(task).__name__}")
    if not task.strip():
        raise ValueError("task must not be empty")
    return task


def _validated_stamp(stamp_s: float) -> float:
    if not _is_real(stamp_s) or not math.isfinite(stamp_s):
        raise ValueError(f"stamp_s must be a finite number of seconds, got {stamp_s!r}")
    return float(stamp_s)


def _usable_value(modality: Modality, answer: Answer) -> float | None:
    """The answer's value clipped to the modality's range, or None when it cannot be used."""
    if not answer.parsed or answer.value is None or answer.modality != modality:
        return None
    value = float(answer.value)
    if not math.isfinite(value):
        return None
    low, high = _VALUE_RANGE[modality]
    return min(max(value, low), high)


def score_frames(
    engine: ScoringEngine, items: Sequence[tuple[EpisodeTracker, np.ndarray, float]]
) -> list[RewardResult]:
    """Plan every (tracker, image, stamp) item, ask the engine ONCE for all queries, update each tracker.

    All images and stamps are checked first, so a bad one raises ValueError before any tracker changes.
    No engine call is made when every frame is held. An engine that raises, or returns the wrong number
    of answers, does not stop the batch: every query gets a failed Answer whose error starts with
    ``ENGINE_ERROR_PREFIX`` (counted as unparsed; the last good values are held).
    """
    frames = [(tracker, to_rgb_uint8(image), _validated_stamp(stamp)) for tracker, image, stamp in items]
    plans = [tracker._plan_rgb(rgb, stamp) for tracker, rgb, stamp in frames]
    queries = [query for plan in plans for query in plan.queries]
    answers: list[Answer] = []
    if queries:
        answers = ask_engine(engine, queries)
    results = []
    start = 0
    for (tracker, _, _), plan in zip(frames, plans, strict=True):
        stop = start + len(plan.queries)
        results.append(tracker.update(plan, answers[start:stop]))
        start = stop
    return results


def ask_engine(engine: ScoringEngine, queries: list[Query]) -> list[Answer]:
    """engine.score(queries), except that a raising engine or a wrong answer count gives every query a
    failed Answer whose error starts with ``ENGINE_ERROR_PREFIX``: the caller's frames are never lost."""
    try:
        answers = list(engine.score(queries))
    except Exception as exc:  # any engine failure must not lose the batch's frames
        reason = f"{ENGINE_ERROR_PREFIX}{type(exc).__name__}: {exc}"
        return [Answer(q.modality, None, parsed=False, error=reason) for q in queries]
    if len(answers) != len(queries):
        reason = f"{ENGINE_ERROR_PREFIX}a wrong answer count: {len(answers)} for {len(queries)} queries"
        return [Answer(q.modality, None, parsed=False, error=reason) for q in queries]
    return answers
