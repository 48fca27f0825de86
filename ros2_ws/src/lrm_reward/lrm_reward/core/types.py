"""Plain data exchanged between the reward core and its callers (nodes, judge, benchmarks).

Not for model logic: these are value types only, so every layer can import them cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class Modality(str, enum.Enum):
    """The three LRM adapters (arXiv 2603.16065); each answers one kind of question."""

    PROGRESS = "progress"  # 0.0-1.0 against the initial frame
    CONTRASTIVE = "contrastive"  # is image B (current) closer to done than image A (previous query)?
    COMPLETION = "completion"  # yes/no


class Readout(str, enum.Enum):
    """How an answer is read from the model."""

    LOGITS = "logits"  # one forward pass over prompt + answer prefix, scored over the closed answer set
    GENERATE = "generate"  # greedy decoding of the JSON answer, as the authors serve it


@dataclass
class Query:
    """One question to the reward model.

    images are HxWx3 uint8 RGB arrays in prompt order:
    progress [initial, current] (or [current] without an initial frame), contrastive [A=previous, B=current],
    completion [current].
    """

    modality: Modality
    task: str
    images: list[np.ndarray]
    chain_of_thought: bool = False  # contrastive only: step-by-step analysis before the JSON (generate)


@dataclass
class Answer:
    """The model's answer to one Query. Never raised: failures come back with parsed=False and error set.

    value: progress in [0, 1]; contrastive in [-1, 1] (+1 = B more complete; logits readout gives the
    expectation 2*P(B)-1); completion is P(yes) in [0, 1] (generate gives 0.0 or 1.0).
    """

    modality: Modality
    value: float | None
    parsed: bool
    confidence: float | None = None  # probability of the most likely allowed answer (logits readout)
    probabilities: dict[str, float] | None = None  # allowed answer text -> probability (logits readout)
    raw_text: str = ""  # generated text (generate readout), kept for logs and the annotated image
    latency_s: float = 0.0  # wall time of the batch this answer came from
    error: str | None = None  # why value is None / parsed is False


@dataclass
class RewardResult:
    """The fused reward for one incoming frame (queried or held)."""

    stamp_s: float  # stamp of the frame this reward applies to
    scored_stamp_s: float  # stamp of the frame the model actually scored (== stamp_s unless held)
    episode_id: int
    frame_index: int  # frames seen in this episode, 0-based
    progress: float = float("nan")
    contrastive: float = float("nan")
    completion_prob: float = float("nan")
    completed: bool = False  # debounced completion flag
    reward: float = 0.0  # fused reward
    held: bool = False  # True when the values are repeated (or zeroed) between queries
    queried: bool = False  # True when the model was asked on this frame
    student: bool = False  # True when progress / completion_prob / reward are the distilled student's
    unparsed: int = 0  # answers on this frame that did not parse
    latency_s: float = 0.0  # model latency of the query behind these values
    reasoning: str = ""  # last chain-of-thought text, when on
    answers: list[Answer] = field(default_factory=list)
