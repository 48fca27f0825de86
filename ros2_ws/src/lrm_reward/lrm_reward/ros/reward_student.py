"""The reward node's ``between: student`` mode: a distilled student (lrm-distill) scores the frames between
reward-model queries.

``StudentMixin`` holds that side of ``RewardNode``: it loads the student named by ``student.path`` for the
current task (again at every task change: a student is made for one task), gives the first camera stream a
``StudentBetween`` (student/between.py), fills each held frame with the student's progress and completion
(the message says ``student: true``; the completion flag and contrastive stay the reward model's), anchors
the student on every frame the reward model answered, and reports the drift between the two in
/diagnostics (WARN when they disagree: distill a new student).

Bad input: no student at the path -> WARN and hold (as ``between: hold``); a student made for another task,
camera (``student.camera``) or frame size -> ERROR naming what it was made for, counted, and hold; a student
that fails on a frame -> counted, that frame held. The node stays up in every case. A due frame the model
never got (dropped: a newer one replaced it while the model was busy) is answered as held, without the
student.

Which stream: the student serves the first entry of ``image_topics`` (one camera, as lrm-distill makes it
from one camera); the other streams, and a ``paired`` stream, hold.
"""

from __future__ import annotations

from typing import Any

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from lrm_reward.core.types import Answer, Modality, RewardResult

STUDENT_PARAMETERS = ("student.path", "student.camera", "student.anchor", "student.progress_warn",
                      "student.completion_warn")  # fmt: skip


class StudentMixin:
    """Students for ``RewardNode``: uses its streams, task, parameters, logger and fault counter."""

    _student = None  # the loaded student.loading.Student, or None (hold)
    _student_status = "off"  # what /diagnostics says about the student when there is no drift report yet
    _student_stream = None  # the Stream the student serves

    def _student_wanted(self) -> bool:
        return self._param("between") == "student"

    def _load_student_for_task(self) -> None:
        """(Re)load the student for the current task and give it to the first stream; hold if none fits."""
        from lrm_reward.student.between import BetweenConfig, StudentBetween
        from lrm_reward.student.loading import StudentLoadError, StudentMismatchError, load_student

        for stream in self._streams + ([self._paired] if self._paired is not None else []):
            with stream.lock:
                stream.between = None
        self._student, self._student_stream = None, None
        if not self._student_wanted():
            self._student_status = "off (between is not 'student')"
            return
        if not self._task.strip():
            self._student_status = "waiting for a task"
            return
        path = self._param("student.path")
        camera = self._param("student.camera") or None
        try:
            student = load_student(path or None, self._task, camera)
        except StudentMismatchError as exc:
            self._student_status = f"refused: {exc}"
            self._fault("student_refused", f"{exc}; holding the last values between queries")
            return
        except StudentLoadError as exc:
            self._student_status = f"cannot load: {exc}"
            self._fault("student_load", f"{exc}; holding the last values between queries")
            return
        if student is None:
            self._student_status = f"no student at {path!r}: holding between queries"
            self._notice("student_missing", f"between: student, but {self._student_status}")
            return
        if self._paired is not None:
            self._student_status = "refused: a student scores one camera, not the joined frames of 'paired'"
            self._fault("student_refused", self._student_status)
            return
        cfg = BetweenConfig(
            anchor=self._param("student.anchor"),
            progress_warn=self._param("student.progress_warn"),
            completion_warn=self._param("student.completion_warn"),
        )
        self._student = student
        self._student_stream = self._streams[0]
        with self._student_stream.lock:
            self._student_stream.between = StudentBetween(student, cfg)
            self._student_stream.between_checked = False
        self._student_status = f"{student.describe()} serves {self._student_stream.name}"
        self.get_logger().info(f"between queries: {self._student_status}")

    def _student_reset(self, stream) -> None:
        """A new episode on this stream (caller holds stream.lock): the student forgets its first frame."""
        if stream.between is not None:
            stream.between.reset()

    def _student_first_frame(self, stream, rgb) -> None:
        """The episode's first frame, as the reward model's progress queries see it (caller holds the lock).
        Set here, in the callback, because the first held frames arrive before the model answers it."""
        between = stream.between
        if between is None or between.has_initial or not self._student_fits_frame(stream, rgb):
            return
        try:
            between.set_initial(rgb)
        except Exception as exc:
            self._fault("student", f"{type(exc).__name__}: {exc}")

    def _student_fill(self, stream, held: RewardResult, rgb, stamp_s: float) -> RewardResult:
        """The held result with the student's values, or as it was without a student (caller holds the
        stream's lock)."""
        between = stream.between
        if between is None or stream.tracker is None:
            return held
        if not self._student_fits_frame(stream, rgb):
            return held
        try:
            values = between.frame(rgb, key=stamp_s)
        except Exception as exc:  # a student failure costs this frame its student values, nothing more
            self._fault("student", f"{type(exc).__name__}: {exc}; that frame is held")
            return held
        return stream.tracker.with_student(held, values.progress, values.completion)

    def _student_anchor(self, stream, answers: list[Answer], rgb, stamp_s: float) -> None:
        """The reward model's own answers on a queried frame anchor the student (caller holds the lock)."""
        between = stream.between
        if between is None or not self._student_fits_frame(stream, rgb):
            return
        values: dict[Modality, Any] = {a.modality: a.value for a in answers if a.parsed}
        progress, completion = values.get(Modality.PROGRESS), values.get(Modality.COMPLETION)
        if progress is None and completion is None:
            return
        try:
            between.anchor(stamp_s, progress, completion, image=rgb)
        except Exception as exc:
            self._fault("student", f"{type(exc).__name__}: {exc}")

    def _student_fits_frame(self, stream, rgb) -> bool:
        """The first frame of the stream checks the student's frame size; a mismatch turns it off."""
        if getattr(stream, "between_checked", True):
            return stream.between is not None
        from lrm_reward.student.loading import StudentMismatchError, check_fits

        stream.between_checked = True
        try:
            check_fits(stream.between.student.config, self._task, None, tuple(rgb.shape[:2]))
        except StudentMismatchError as exc:
            stream.between = None
            self._student_status = f"refused: {exc}"
            self._fault("student_refused", f"{exc}; holding the last values between queries")
            return False
        return True

    def _student_diagnostic_status(self) -> DiagnosticStatus | None:
        """A status of its own for the student (None unless between is 'student')."""
        if not self._student_wanted():
            return None
        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: student"
        status.hardware_id = self._student_stream.name if self._student_stream is not None else ""
        stream = self._student_stream
        between = stream.between if stream is not None else None
        if between is None:
            refused = self._student_status.startswith(("refused", "cannot load"))
            status.level = DiagnosticStatus.ERROR if refused else DiagnosticStatus.WARN
            status.message = self._student_status
            status.values = [KeyValue(key="student", value=self._student_status)]
            return status
        with stream.lock:
            report = between.drift()
        status.level = DiagnosticStatus.WARN if report.level == "warn" else DiagnosticStatus.OK
        status.message = report.message
        values = {"student": self._student_status, **report.key_values()}
        status.values = [
            KeyValue(key=k, value=v if isinstance(v, str) else str(v)) for k, v in values.items()
        ]
        return status
