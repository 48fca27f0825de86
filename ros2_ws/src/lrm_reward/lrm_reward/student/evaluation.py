"""How close a student is to its teacher on held-out episodes: the numbers lrm-distill writes into the
student's config.json and the benchmark prints.

- progress MAD: mean |student - teacher| over every frame the teacher was asked about progress;
- completion agreement: share of the teacher's completion answers on which the student lands on the same
  side of the threshold (and the mean |difference| of the probabilities);
- VOC (value-order correlation, GVL): Spearman of the student's progress with time within each episode the
  teacher judged a success, averaged; the teacher's own VOC over its curve on the same episodes is given
  alongside for reference.

What it is not: no data loading (``dataset.py``), no model code (``loading.Student`` predicts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lrm_reward.adaptation.metrics import spearman
from lrm_reward.student.model import COMPLETION, PROGRESS


@dataclass
class EpisodePrediction:
    key: str
    success: bool  # the teacher's verdict
    frame_indices: np.ndarray  # ascending
    progress: np.ndarray  # the student's, per frame index
    completion: np.ndarray
    teacher_progress: dict[int, float]
    teacher_completion: dict[int, float]


def predict_held_out(student, held_out) -> list[EpisodePrediction]:
    """The student's values on every read frame of each held-out episode (dataset.HeldOutEpisode)."""
    out = []
    for ep in held_out:
        first = ep.frames[ep.frame_indices.index(0)][None] if student.arch.use_initial_frame else None
        values = np.concatenate(
            [student.predict_resized(ep.frames[s : s + 128], first) for s in range(0, len(ep.frames), 128)]
        )
        out.append(
            EpisodePrediction(
                key=ep.labels.key,
                success=ep.labels.success,
                frame_indices=np.asarray(ep.frame_indices),
                progress=values[:, PROGRESS],
                completion=values[:, COMPLETION],
                teacher_progress=ep.labels.progress,
                teacher_completion=ep.labels.completion,
            )
        )
    return out


def held_out_metrics(predictions: list[EpisodePrediction], threshold: float = 0.5) -> dict:
    """The validation numbers (NaN where there is nothing to measure)."""
    p_err, c_err, c_agree, voc, teacher_voc = [], [], [], [], []
    for ep in predictions:
        position = {int(i): k for k, i in enumerate(ep.frame_indices)}
        for i, t in ep.teacher_progress.items():
            if i in position:
                p_err.append(abs(float(ep.progress[position[i]]) - t))
        for i, t in ep.teacher_completion.items():
            if i in position:
                s = float(ep.completion[position[i]])
                c_err.append(abs(s - t))
                c_agree.append(float((s >= threshold) == (t >= threshold)))
        if ep.success and len(ep.frame_indices) >= 2:
            voc.append(spearman(ep.progress, ep.frame_indices))
            if len(ep.teacher_progress) >= 2:
                frames = sorted(ep.teacher_progress)
                teacher_voc.append(spearman([ep.teacher_progress[i] for i in frames], frames))
    return {
        "episodes": len(predictions),
        "successful_episodes": sum(ep.success for ep in predictions),
        "progress_labels": len(p_err),
        "progress_mad": _mean(p_err),
        "completion_labels": len(c_err),
        "completion_agreement": _mean(c_agree),
        "completion_mad": _mean(c_err),
        "voc": _mean(voc),
        "teacher_voc": _mean(teacher_voc),
        "completion_threshold": threshold,
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan
