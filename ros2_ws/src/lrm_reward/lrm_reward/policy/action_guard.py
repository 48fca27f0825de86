"""Safety between a policy and a robot: per-dimension limits, a maximum change per step, no NaN.

What it is for: every action a PolicyRunner returns passes through an ActionGuard. Out-of-range values
are clamped to [action_min, action_max]; a change larger than max_delta from the previous sent action
is clamped to max_delta (from the second action of an episode: the first has no reference); an action
with a NaN or inf is not sent. Each is counted. A limit given as one value applies to every dimension.

What it is not: aware of ROS, of observations or of time (staleness is the runner's business).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

ON_STALE = ("stop", "hold")


def _per_dim(values, dim: int, label: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(dim, float(arr[0]))
    if arr.size != dim:
        raise ValueError(f"{label} has {arr.size} values; give 1 (all dimensions) or {dim} (one per action)")
    return arr


@dataclass
class SafetyConfig:
    """Limits applied to every action; `()` or an infinite value means no limit."""

    action_min: tuple[float, ...] = ()
    action_max: tuple[float, ...] = ()
    max_delta: tuple[float, ...] = ()  # largest change of one dimension from one step to the next (> 0)
    max_observation_age_s: float = 0.5  # an input older than this is stale; <= 0: never stale
    on_stale: str = "stop"  # stop: send nothing | hold: repeat the last sent action

    def __post_init__(self) -> None:
        for label in ("action_min", "action_max", "max_delta"):
            values = tuple(float(v) for v in getattr(self, label))
            if any(math.isnan(v) for v in values):
                raise ValueError(f"SafetyConfig.{label} has NaN")
            setattr(self, label, values)
        if any(v <= 0 for v in self.max_delta):
            raise ValueError("SafetyConfig.max_delta must be > 0 (inf: no limit)")
        if self.on_stale not in ON_STALE:
            raise ValueError(f"SafetyConfig.on_stale must be one of {ON_STALE}, not {self.on_stale!r}")

    def check_dims(self, dim: int) -> None:
        """ValueError naming the parameter when a per-dimension list does not fit `dim` actions."""
        ActionGuard(self, dim)


@dataclass
class Guarded:
    action: np.ndarray | None  # what may be sent; None: nothing (non-finite)
    clamped_limit: bool = False
    clamped_delta: bool = False
    non_finite: bool = False


@dataclass
class ActionGuard:
    cfg: SafetyConfig
    dim: int
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.low = _per_dim(self.cfg.action_min or (-np.inf,), self.dim, "action_min")
        self.high = _per_dim(self.cfg.action_max or (np.inf,), self.dim, "action_max")
        self.delta = _per_dim(self.cfg.max_delta or (np.inf,), self.dim, "max_delta")
        if np.any(self.low > self.high):
            raise ValueError(f"action_min {self.low.tolist()} is above action_max {self.high.tolist()}")
        self.last: np.ndarray | None = None

    def reset(self) -> None:
        """A new episode: the next action has no previous one to be compared with."""
        self.last = None

    def apply(self, action: np.ndarray) -> Guarded:
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.size != self.dim:
            raise ValueError(f"the policy returned {action.size} values, the robot takes {self.dim}")
        if not np.all(np.isfinite(action)):
            self._count("non_finite_actions")
            return Guarded(None, non_finite=True)
        out = np.clip(action, self.low, self.high)
        clamped_limit = bool(np.any(out != action))
        clamped_delta = False
        if self.last is not None:
            stepped = np.clip(out, self.last - self.delta, self.last + self.delta)
            clamped_delta = bool(np.any(stepped != out))
            out = stepped
        if clamped_limit:
            self._count("clamped_to_limits")
        if clamped_delta:
            self._count("clamped_max_delta")
        self.last = out
        return Guarded(out, clamped_limit=clamped_limit, clamped_delta=clamped_delta)

    def _count(self, kind: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1
