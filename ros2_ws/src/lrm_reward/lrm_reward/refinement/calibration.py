"""Does the judge agree with the operator? Compare verdicts with operator labels and suggest a threshold.

What it is for: an operator who stops episodes with OUTCOME_SUCCESS / OUTCOME_FAILURE labels them; the
recorder keeps the label in the episode sidecar and the judge copies it into each judgment
(`recorded_outcome`). With labels of both kinds, `calibrate` counts agreement at the configured
`success_threshold` and finds the completion threshold that separates the labels best (balanced
accuracy: the mean of the hit rates on labelled successes and on labelled failures, so a night of mostly
failures does not reward calling everything a failure). `write_calibration` stores the numbers in
`<dataset>/judgments/calibration.json` and a plot of every labelled episode's completion probability
with both thresholds in `calibration.png`. `lrm-judge` prints the one-line summary after each dataset.

What it is not: no judging and no threshold change; a suggestion from a handful of labels is printed as
one (the counts are in the line), the user decides.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lrm_reward.durable_files import write_json_atomic
from lrm_reward.refinement.judge import JUDGMENTS_DIR, passes

LABELS = ("success", "failure")
FEW_LABELS = 5  # fewer labelled episodes than this of either kind: the summary says the sample is small


@dataclass
class LabelledEpisode:
    episode_index: int
    label: str  # operator: success | failure
    completion_prob: float
    final_progress: float
    unsure: bool  # too few answers parsed: never a success, whatever the threshold


@dataclass
class Calibration:
    success_threshold: float
    progress_threshold: float | None
    progress_success_threshold: float | None
    episodes: list[LabelledEpisode]
    matrix: dict[str, int]  # tp fp fn tn of the verdicts at success_threshold (positive = success)
    balanced_accuracy: float | None  # at success_threshold; None without labels of both kinds
    suggested_threshold: float | None = None
    suggested_balanced_accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def successes(self) -> int:
        return sum(e.label == "success" for e in self.episodes)

    @property
    def failures(self) -> int:
        return sum(e.label == "failure" for e in self.episodes)

    def summary(self) -> str:
        m = self.matrix
        agree = m["tp"] + m["tn"]
        line = (
            f"operator labels on {len(self.episodes)} episodes ({self.successes} success, {self.failures} "
            f"failure): the judge agrees on {agree} (TP {m['tp']} FP {m['fp']} FN {m['fn']} TN {m['tn']}) "
            f"at success_threshold {self.success_threshold:.2f}"
        )
        if self.suggested_threshold is None:
            return line + "; " + "; ".join(self.notes)
        line += (
            f"; on these labels {self.suggested_threshold:.2f} separates best (balanced accuracy "
            f"{self.suggested_balanced_accuracy:.0%}, now {self.balanced_accuracy:.0%})"
        )
        return line + ("; " + "; ".join(self.notes) if self.notes else "")

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "successes": self.successes,
            "failures": self.failures,
            "summary": self.summary(),
        }


def calibrate(
    judgments: Iterable,
    success_threshold: float,
    progress_threshold: float | None = None,
    progress_success_threshold: float | None = None,
) -> Calibration | None:
    """Judgments (lrm_reward.refinement.judge.Judgment) -> Calibration; None when none is labelled.

    The progress thresholds are the judge's (JudgeConfig): they are applied as the judge applies them and
    kept as they are; only the completion threshold is searched.
    """
    gates = (progress_threshold, progress_success_threshold)
    episodes = [
        LabelledEpisode(
            episode_index=j.episode_index,
            label=j.recorded_outcome,
            completion_prob=float(j.completion_prob),
            final_progress=float(j.final_progress),
            unsure=j.verdict == "unsure",
        )
        for j in judgments
        if j.recorded_outcome in LABELS
    ]
    if not episodes:
        return None
    episodes.sort(key=lambda e: e.episode_index)
    matrix = _matrix(episodes, success_threshold, gates)
    cal = Calibration(
        success_threshold=success_threshold,
        progress_threshold=progress_threshold,
        progress_success_threshold=progress_success_threshold,
        episodes=episodes,
        matrix=matrix,
        balanced_accuracy=_balanced_accuracy(matrix),
    )
    if not cal.successes or not cal.failures:
        missing = "failure" if cal.successes else "success"
        cal.notes.append(f"no threshold suggested: no episode labelled {missing}")
        return cal
    best, best_score = success_threshold, cal.balanced_accuracy
    for t in _candidate_thresholds(episodes):
        score = _balanced_accuracy(_matrix(episodes, t, gates))
        closer = abs(t - success_threshold) < abs(best - success_threshold)
        if score > best_score + 1e-12 or (abs(score - best_score) <= 1e-12 and closer):
            best, best_score = t, score
    cal.suggested_threshold, cal.suggested_balanced_accuracy = best, best_score
    if min(cal.successes, cal.failures) < FEW_LABELS:
        cal.notes.append(f"few labels (under {FEW_LABELS} of one kind): take the suggestion as a hint")
    if progress_threshold is not None:
        cal.notes.append(f"progress_threshold {progress_threshold:.2f} kept as is")
    if progress_success_threshold is not None:
        cal.notes.append(f"progress_success_threshold {progress_success_threshold:.2f} kept as is")
    return cal


def calibration_paths(dataset_root: Path | str) -> tuple[Path, Path]:
    """(calibration.json, calibration.png) next to the dataset's judgments."""
    folder = Path(dataset_root) / JUDGMENTS_DIR
    return folder / "calibration.json", folder / "calibration.png"


def write_calibration(dataset_root: Path | str, cal: Calibration) -> tuple[Path, Path]:
    json_path, png_path = calibration_paths(dataset_root)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, cal.to_json())
    _plot(png_path, cal)
    return json_path, png_path


def load_calibration(dataset_root: Path | str) -> dict | None:
    json_path, _ = calibration_paths(dataset_root)
    try:
        return json.loads(json_path.read_text())
    except (OSError, ValueError):
        return None


def _predicted(e: LabelledEpisode, threshold: float, gates: tuple[float | None, float | None]) -> bool:
    """The judge's verdict on the stored numbers; gates = (progress_threshold, progress_success_threshold)."""
    return not e.unsure and passes(e.completion_prob, e.final_progress, threshold, *gates)


def _matrix(episodes, threshold: float, gates: tuple[float | None, float | None]) -> dict[str, int]:
    m = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for e in episodes:
        said = _predicted(e, threshold, gates)
        m[("t" if said == (e.label == "success") else "f") + ("p" if said else "n")] += 1
    return m


def _balanced_accuracy(m: dict[str, int]) -> float | None:
    pos, neg = m["tp"] + m["fn"], m["tn"] + m["fp"]
    if not pos or not neg:
        return None
    return 0.5 * (m["tp"] / pos + m["tn"] / neg)


def _candidate_thresholds(episodes) -> list[float]:
    """Midpoints between neighbouring completion probabilities: every distinct split of the episodes."""
    probs = sorted({e.completion_prob for e in episodes if e.completion_prob == e.completion_prob})
    mids = [(a + b) / 2 for a, b in itertools.pairwise(probs)]
    return [t for t in mids if 0.0 < t < 1.0]


def _plot(path: Path, cal: Calibration) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 2.6))
    for row, label, color in ((1, "success", "tab:green"), (0, "failure", "tab:red")):
        xs = [e.completion_prob for e in cal.episodes if e.label == label]
        ys = [row + 0.12 * ((i % 5) - 2) / 2 for i in range(len(xs))]  # spread equal values apart
        ax.scatter(xs, ys, color=color, s=22, label=f"operator: {label} ({len(xs)})")
    ax.axvline(
        cal.success_threshold,
        color="black",
        ls="--",
        lw=1,
        label=f"success_threshold {cal.success_threshold:.2f}",
    )
    if cal.suggested_threshold is not None:
        label = f"best on these labels {cal.suggested_threshold:.2f}"
        ax.axvline(cal.suggested_threshold, color="tab:blue", lw=1.5, label=label)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.6, 1.6)
    ax.set_yticks([0, 1], ["failure", "success"])
    ax.set_xlabel("judge: mean completion probability of the last frames")
    ax.set_title("Judge vs. operator labels", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
