"""The student between reward-model queries: a value for every frame, the teacher's queries as anchors,
and how far the two drift apart.

What it is for: the reward node's ``between: student`` mode, one ``StudentBetween`` per camera stream.
Every frame gets ``frame(image, key)`` (the student's progress and completion; the node marks them as the
student's); when the teacher's answer for a queried frame arrives, ``anchor(key, progress, completion)``
records it. On queried frames the node publishes the teacher's own values: the teacher stays the
reference, the student only fills the gaps.

Anchoring: ``anchor="raw"`` (default) publishes the student as is between queries. With
``anchor="offset"`` the student's progress is shifted by the residual at the latest anchor (teacher -
student on that frame), so the curve continues from the teacher's value; completion stays the student's
own probability. Raw is the default because it measured better (benchmarks/bench_student.py): the offset
carries each answer's noise into the next k frames, while the student has learned the teacher's average.
Offset pays where the student is biased on a scene (drift says so).

Drift: over the last ``window`` anchors, the mean |student - teacher| progress and the fraction of anchors
on which they disagree about completion (one at or above the threshold, the other below). Either above
its limit, with at least ``min_anchors`` anchors, is a WARN for /diagnostics (the student no longer
matches this scene: distill a new one).

What it is not: no ROS, no scheduling (the node's scheduler decides which frames are queried), no model
loading (``loading.py``). The teacher's answer may arrive after later frames were already served: that is
why frames are remembered by key (the node's frame stamp).
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass

import numpy as np

from lrm_reward.student.loading import Student

DRIFT_OK, DRIFT_WARN, DRIFT_NO_DATA = "ok", "warn", "no_data"
SOURCE_STUDENT = "student"


@dataclass
class BetweenConfig:
    anchor: str = "raw"  # "raw": the student's own values | "offset": continue from the latest teacher anchor
    window: int = 20  # drift over this many latest anchors
    min_anchors: int = 3  # fewer anchors than this never WARN
    progress_warn: float = 0.2  # mean |student - teacher| progress above this -> WARN
    completion_warn: float = 0.34  # fraction of anchors disagreeing on completion above this -> WARN
    completion_threshold: float | None = None  # None: the student's own (config.json)
    remember: int = 256  # frames remembered for anchors that arrive late

    def __post_init__(self) -> None:
        if self.anchor not in ("offset", "raw"):
            raise ValueError(f"BetweenConfig.anchor must be 'offset' or 'raw', got {self.anchor!r}")
        if self.window < 1 or self.min_anchors < 1 or self.remember < 1:
            raise ValueError("BetweenConfig.window, min_anchors and remember must be >= 1")
        if not 0.0 < self.progress_warn <= 1.0 or not 0.0 < self.completion_warn <= 1.0:
            raise ValueError("BetweenConfig.progress_warn and completion_warn must be in (0, 1]")
        if self.completion_threshold is not None and not 0.0 < self.completion_threshold < 1.0:
            raise ValueError("BetweenConfig.completion_threshold must be in (0, 1)")


@dataclass(frozen=True)
class BetweenValues:
    """What to publish for a frame that the teacher was not asked about."""

    progress: float  # [0, 1], anchored as configured
    completion: float  # [0, 1]
    raw_progress: float  # the student's own progress, before anchoring
    source: str = SOURCE_STUDENT


@dataclass(frozen=True)
class DriftReport:
    level: str  # DRIFT_OK | DRIFT_WARN | DRIFT_NO_DATA
    message: str
    anchors: int  # anchors in the window
    progress_mad: float  # mean |student - teacher| progress over the window (NaN: none)
    completion_disagreement: float  # fraction of the window's completion anchors that disagree (NaN: none)
    frames: int  # frames the student scored since reset()
    mean_ms: float  # mean time of one student frame (the last `window` frames)
    anchors_missed: int  # teacher answers for frames no longer (or never) remembered

    def key_values(self) -> dict[str, str]:
        """The report as /diagnostics key-value strings (the node copies them into its DiagnosticStatus)."""
        return {
            "student drift": self.level,
            "student anchors": str(self.anchors),
            "student progress MAD": f"{self.progress_mad:.3f}",
            "student completion disagreement": f"{self.completion_disagreement:.3f}",
            "student frames": str(self.frames),
            "student mean ms": f"{self.mean_ms:.2f}",
            "student anchors missed": str(self.anchors_missed),
        }


class StudentBetween:
    """One camera stream's student between queries. Not thread-safe: call from the node's worker."""

    def __init__(self, student: Student, cfg: BetweenConfig | None = None) -> None:
        self.student = student
        self.cfg = cfg or BetweenConfig()
        self.threshold = (
            self.cfg.completion_threshold
            if self.cfg.completion_threshold is not None
            else student.completion_threshold
        )
        self.reset()

    def reset(self) -> None:
        """A new episode or task: forget the first frame, the anchors and the drift window."""
        self._initial = None
        self._offset = 0.0
        self._seen: collections.OrderedDict = collections.OrderedDict()  # key -> (progress, completion)
        self._progress_err: collections.deque = collections.deque(maxlen=self.cfg.window)
        self._completion_dis: collections.deque = collections.deque(maxlen=self.cfg.window)
        self._anchors = 0
        self._missed = 0
        self._frames = 0
        self._times: collections.deque = collections.deque(maxlen=self.cfg.window)

    @property
    def has_initial(self) -> bool:
        return self._initial is not None

    def set_initial(self, image) -> None:
        """The episode's first frame, as the teacher sees it in its progress queries. Without a call, the
        first frame given to frame() after reset() is used."""
        if self.student.arch.use_initial_frame:
            self._initial = self.student.embed(image)
        else:
            self._initial = ()

    def frame(self, image, key=None) -> BetweenValues:
        """The student's values for this frame; remembered under `key` for a later anchor()."""
        start = time.perf_counter()
        if self._initial is None:
            self.set_initial(image)
        initial = self._initial if self.student.arch.use_initial_frame else None
        values = self.student.predict_one(image, initial)
        self._times.append(time.perf_counter() - start)
        self._frames += 1
        if key is not None:
            self._seen[key] = (values.progress, values.completion)
            while len(self._seen) > self.cfg.remember:
                self._seen.popitem(last=False)
        progress = values.progress
        if self.cfg.anchor == "offset":
            progress = float(np.clip(progress + self._offset, 0.0, 1.0))
        return BetweenValues(progress=progress, completion=values.completion, raw_progress=values.progress)

    def anchor(self, key, progress: float | None, completion: float | None, image=None) -> bool:
        """The teacher's answer for the frame remembered under `key` (NaN / None: not asked). When the frame
        is not remembered, `image` (if given) is scored now. False when the anchor could not be used."""
        if key in self._seen:
            student_p, student_c = self._seen[key]
        elif image is not None:
            if self._initial is None:
                self.set_initial(image)
            initial = self._initial if self.student.arch.use_initial_frame else None
            values = self.student.predict_one(image, initial)
            student_p, student_c = values.progress, values.completion
        else:
            self._missed += 1
            return False
        used = False
        if _finite(progress):
            self._progress_err.append(abs(student_p - float(progress)))
            self._offset = float(progress) - student_p
            used = True
        if _finite(completion):
            teacher_done = float(completion) >= self.threshold
            self._completion_dis.append(float((student_c >= self.threshold) != teacher_done))
            used = True
        self._anchors += int(used)
        return used

    def drift(self) -> DriftReport:
        n = max(len(self._progress_err), len(self._completion_dis))
        mad = float(np.mean(self._progress_err)) if self._progress_err else math.nan
        dis = float(np.mean(self._completion_dis)) if self._completion_dis else math.nan
        mean_ms = float(np.mean(self._times) * 1e3) if self._times else math.nan
        common = dict(
            anchors=n,
            progress_mad=mad,
            completion_disagreement=dis,
            frames=self._frames,
            mean_ms=mean_ms,
            anchors_missed=self._missed,
        )
        if n < self.cfg.min_anchors:
            return DriftReport(DRIFT_NO_DATA, f"{n} anchors so far (need {self.cfg.min_anchors})", **common)
        problems = []
        if _finite(mad) and mad > self.cfg.progress_warn:
            problems.append(
                f"progress differs from the teacher by {mad:.2f} on average (> {self.cfg.progress_warn})"
            )
        if _finite(dis) and dis > self.cfg.completion_warn:
            problems.append(
                f"completion disagrees with the teacher on {dis:.0%} of queries "
                f"(> {self.cfg.completion_warn:.0%})"
            )
        if problems:
            return DriftReport(
                DRIFT_WARN, f"student drifts: {'; '.join(problems)} over the last {n} queries", **common
            )
        summary = f"student agrees: progress within {mad:.2f}" if _finite(mad) else "student agrees"
        if _finite(dis):
            summary += f", completion disagreement {dis:.0%}"
        return DriftReport(DRIFT_OK, f"{summary} over the last {n} queries", **common)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))
