"""Which recorded episodes a refinement trains on, and how: judged-success filter, progress weights, both.

What it is for: lrm-refine's first step. `select_episodes(cfg)` reads each judged dataset's judgments
(and, unless the selection is "filter", its per-frame progress: dense_weights.read_progress) and returns
the episodes to train on, each kept row saying whether its frames count at full weight or by progress,
and each left-out row why.

Modes (RefineConfig.selection):
- filter: judged successes (minus low-confidence ones with min_confidence), the recipe of arXiv
  2603.16065's real-robot self-improvement;
- weighting: every episode that has progress values, each frame weighted by RA-BC (dense_weights.py);
  failures are kept at a low weight instead of being thrown away; no judgment needed;
- both: judged successes at full weight, every other episode with progress values weighted.
In every mode a partial recording (unless include_partial) and an episode the operator labelled a
failure (unless respect_operator_labels is off) stay out; demonstration datasets are used whole, at
full weight.

What it is not: no weights (dense_weights.py), no training (refine.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from lrm_reward.refinement import dense_weights
from lrm_reward.refinement.judge import _read_sidecar, load_judgments

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """Episodes chosen per dataset, and why others were left out."""

    episodes: dict[str, list[int]]  # dataset root -> episode indices
    kept: list[dict]  # {"dataset", "episode_index", "source", "weight": full|progress, ...judgment summary}
    rejected: list[dict]
    mode: str | None = None  # filter | weighting | both (select_episodes sets it; None: not known)
    progress: dict = field(default_factory=dict)  # judged dataset root -> DatasetProgress (not filter)
    weighting: dict = field(default_factory=dict)  # set by refine(): mechanism, weight distribution

    @property
    def num_episodes(self) -> int:
        return sum(len(v) for v in self.episodes.values())


def select_episodes(cfg) -> Selection:
    """Raises NoProgressError when --selection weighting meets a dataset without any progress value."""
    episodes: dict[str, list[int]] = {}
    kept, rejected = [], []
    mode = cfg.selection
    progress: dict = {}
    for root in cfg.datasets:
        judgments = load_judgments(root)
        total = total_episodes(root)
        if mode != dense_weights.SELECTION_FILTER:
            progress[str(root)] = dense_weights.read_progress(root, judgments)
            if not progress[str(root)].has_progress:
                if mode == dense_weights.SELECTION_WEIGHTING:
                    raise dense_weights.NoProgressError(dense_weights.no_progress_message(root))
                log.warning("%s; only its judged successes are used", dense_weights.no_progress_message(root))
        for e in range(total):
            j = judgments.get(e)
            row = {"dataset": str(root), "episode_index": e, "source": "judged"}
            if j is None:
                has = str(root) in progress and progress[str(root)].episodes[e].has_progress
                how, reason = decide_episode(mode, "not judged", _hard_reason(cfg, root, e), has)
                if how is None:
                    rejected.append({**row, "reason": reason})
                else:
                    kept.append({**row, "weight": how, "weighted_because": reason})
                    episodes.setdefault(str(root), []).append(e)
                continue
            row.update(
                verdict=j.verdict,
                confidence=j.confidence,
                completion_prob=j.completion_prob,
                final_progress=j.final_progress,
                curve=j.progress_curve,
                curve_frames=j.curve_frame_indices,
                task=j.task,
            )
            reason = None
            if not j.success:
                reason = f"verdict {j.verdict}"
            elif j.confidence < cfg.min_confidence:
                reason = f"confidence {j.confidence:.2f} < {cfg.min_confidence:.2f}"
            hard = _hard_reason(cfg, root, e, j)
            has = str(root) in progress and progress[str(root)].episodes[e].has_progress
            how, reason = decide_episode(mode, reason or hard, hard, has)
            if how is None:
                rejected.append({**row, "reason": reason})
            else:
                if how == dense_weights.WEIGHT_PROGRESS:
                    row.update(weighted_because=reason)
                kept.append({**row, "weight": how})
                episodes.setdefault(str(root), []).append(e)
    for root in cfg.demos:
        total = total_episodes(root)
        if total:
            episodes.setdefault(str(root), []).extend(range(total))
            kept.extend(
                {"dataset": str(root), "episode_index": e, "source": "demo", "weight": "full"}
                for e in range(total)
            )
    return Selection(episodes=episodes, kept=kept, rejected=rejected, mode=mode, progress=progress)


def _hard_reason(cfg, root: Path, episode: int, j=None) -> str | None:
    """Why an episode stays out whatever the selection: a partial recording, an operator's "failure"."""
    side = {"partial": j.partial, "outcome": j.recorded_outcome} if j else _read_sidecar(root, episode)
    if side.get("partial") and not cfg.include_partial:
        return "partial recording"
    if cfg.respect_operator_labels and side.get("outcome") == "failure":
        return "operator labelled it a failure"
    return None


def decide_episode(
    mode: str, reason: str | None, hard_reason: str | None, has_progress: bool
) -> tuple[str | None, str | None]:
    """How a judged dataset's episode enters training: (WEIGHT_FULL | WEIGHT_PROGRESS | None, reason).

    reason: why the judged-success filter leaves it out (None: a judged success); hard_reason: a reason
    that leaves it out in every mode (partial recording, operator-labelled failure). The reason returned
    says why a kept episode is weighted, or why a left-out one is left out.
    """
    if mode == dense_weights.SELECTION_FILTER:
        return (None, reason) if reason else (dense_weights.WEIGHT_FULL, None)
    if hard_reason:
        return None, hard_reason
    if mode == dense_weights.SELECTION_BOTH and reason is None:
        return dense_weights.WEIGHT_FULL, None
    if has_progress:
        return dense_weights.WEIGHT_PROGRESS, reason
    return None, f"{reason}; no progress to weight by" if reason else "no progress to weight by"


def total_episodes(root: Path) -> int:
    info = Path(root) / "meta" / "info.json"
    if not info.exists():
        raise FileNotFoundError(f"no LeRobotDataset at {root} (meta/info.json missing)")
    return int(json.loads(info.read_text())["total_episodes"])
