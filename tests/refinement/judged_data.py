"""Judged recordings for the refinement tests: a stand-in reward engine with a known answer and a
recorder helper that writes episodes whose camera brightness ramps to a chosen level."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrm_reward.core.types import Answer, Modality
from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig, SaveStatus

SHAPE = (48, 64, 3)


class BrightnessEngine:
    """A stand-in reward model with a known answer: progress = brightness of the current frame relative to
    the task's brightest level, completion = P(brightness > 150). Counts queries."""

    model_id = "brightness-test-engine"

    def __init__(self, parse: bool = True) -> None:
        self.parse = parse
        self.queries = 0

    def score(self, queries):
        self.queries += len(queries)
        out = []
        for q in queries:
            level = float(q.images[-1].mean())
            if not self.parse:
                out.append(Answer(q.modality, None, parsed=False, error="no JSON in output"))
            elif q.modality is Modality.PROGRESS:
                out.append(Answer(q.modality, min(1.0, level / 200.0), parsed=True))
            else:
                out.append(Answer(q.modality, 1.0 / (1.0 + np.exp(-(level - 150.0) / 10.0)), parsed=True))
        return out

    def close(self):
        pass


def record(root: Path, name: str, episodes: list[tuple]) -> Path:
    """episodes: (task, final brightness[, operator outcome]) -- brightness ramps from 20 to the final
    level over 2 s; the outcome (success | failure | unknown) is what the operator said at stop."""
    rec = EpisodeRecorder(
        RecorderConfig(data_root=root, cameras=("front",), fps=10, dataset_name=name, image_writer_threads=0)
    )
    for task, final, *outcome in episodes:
        rec.start(task)
        for k in range(40):
            t = k * 0.05
            level = int(20 + (final - 20) * min(1.0, t / 1.6))
            rec.add_image("front", t, np.full(SHAPE, level, np.uint8))
            rec.add_state(t, [t, 0.0])
            rec.add_action(t, [t, 0.0])
        assert rec.stop(*outcome).status is SaveStatus.SAVED
    rec.close()
    return root / name
