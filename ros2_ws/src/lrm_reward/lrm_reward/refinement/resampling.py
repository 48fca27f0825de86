"""Resampling an episode's streams onto the dataset's frame grid, by stamp (no I/O).

Frame k is at t0 + k/fps, t0 the first stamp at which every required stream has data; each stream gives
its latest sample at or before a frame's time. A required stream staler than max_gap_s there is a
dropout: "truncate" ends the episode before the first one, "hold" repeats the stale sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_ON_GRID_S = 1e-6  # a sample stamped within 1 us after a frame's time counts as at that time


@dataclass
class ResamplePlan:
    """Which sample of each stream goes into each dataset frame."""

    num_frames: int
    t0: float
    indices: dict[str, np.ndarray] = field(default_factory=dict)  # stream -> (num_frames,) sample index
    gaps: list[dict] = field(default_factory=list)  # {"stream", "at_s", "stale_s"} first dropout per stream
    truncated_from: int | None = None  # frames the grid had before truncation at a dropout
    missing: list[str] = field(default_factory=list)  # required streams with no sample at all


def plan_resampling(
    required: dict[str, np.ndarray],
    optional: dict[str, np.ndarray],
    fps: int,
    max_gap_s: float,
    on_gap: str = "truncate",
) -> ResamplePlan:
    """Pure resampling by stamp. Stamps must be sorted ascending (per stream).

    Optional streams (rewards) never start, end or truncate the episode; before their first sample
    the index is -1.
    """
    missing = [name for name, stamps in required.items() if len(stamps) == 0]
    if missing:
        return ResamplePlan(num_frames=0, t0=0.0, missing=missing)
    t0 = max(float(stamps[0]) for stamps in required.values())
    t_end = max(float(stamps[-1]) for stamps in required.values())
    period = 1.0 / fps
    # A stamp on the grid must not be lost to float rounding: seconds since the epoch in float64 resolve
    # only ~0.24 us, so (t_end - t0) / period for stamps k/fps apart can land just below an integer.
    n = int(np.floor((t_end - t0 + _ON_GRID_S) / period)) + 1
    grid = t0 + np.arange(n) * period
    plan = ResamplePlan(num_frames=n, t0=t0)
    first_bad = n
    for name, stamps in required.items():
        idx = np.searchsorted(stamps, grid + _ON_GRID_S, side="right") - 1
        stale = grid - stamps[np.clip(idx, 0, None)]
        bad = np.nonzero(stale > max_gap_s)[0]
        if bad.size:
            k = int(bad[0])
            plan.gaps.append({"stream": name, "at_s": float(grid[k] - t0), "stale_s": float(stale[k])})
            first_bad = min(first_bad, k)
        plan.indices[name] = idx
    for name, stamps in optional.items():
        plan.indices[name] = (
            np.searchsorted(stamps, grid + _ON_GRID_S, side="right") - 1 if len(stamps) else np.full(n, -1)
        )
    if plan.gaps and on_gap == "truncate":
        plan.truncated_from = n
        plan.num_frames = first_bad
        plan.indices = {k: v[:first_bad] for k, v in plan.indices.items()}
    return plan


def sorted_stamps(stamps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(arrival index in stamp order, sorted stamps): frames stay in the spool in arrival order."""
    arr = np.asarray(stamps, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    return order, arr[order]
