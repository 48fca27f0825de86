"""Synthetic robot streams for the refinement tests: cameras, joint states, actions and rewards at their
own rates, with values derived from the stamp so a test can check what the resampling picked."""

from __future__ import annotations

import numpy as np

STATE_NAMES = ("shoulder", "elbow", "wrist")
ACTION_NAMES = ("shoulder_cmd", "elbow_cmd", "wrist_cmd", "gripper_cmd")
IMAGE_SHAPE = (48, 64, 3)


def frame_for(stamp_s: float, camera: int = 0) -> np.ndarray:
    """A flat image whose brightness encodes the stamp (survives lossy video coding within a few levels)."""
    level = int(20 + (stamp_s * 40) % 200) + camera * 5
    return np.full(IMAGE_SHAPE, level, dtype=np.uint8)


def state_for(stamp_s: float) -> np.ndarray:
    return np.array([stamp_s, 2.0 * stamp_s, -stamp_s])


def action_for(stamp_s: float) -> np.ndarray:
    return np.array([stamp_s, 1.0, 2.0, 3.0])


def feed_episode(
    recorder,
    t_start: float,
    duration_s: float,
    cameras: tuple[str, ...] = ("front",),
    camera_hz: float = 15.0,
    state_hz: float = 50.0,
    action_hz: float = 20.0,
    reward_hz: float = 5.0,
    camera_stops_at: dict[str, float] | None = None,
    nan_state_every: int = 0,
    state_names: tuple[str, ...] | None = STATE_NAMES,
) -> dict[str, int]:
    """Push the streams of one episode, interleaved by stamp, into `recorder`. Returns counts sent."""
    events = []
    for i, cam in enumerate(cameras):
        stop = (camera_stops_at or {}).get(cam, duration_s)
        events += [(t, "cam", (cam, i)) for t in np.arange(0.0, stop, 1.0 / camera_hz)]
    events += [(t, "state", None) for t in np.arange(0.0, duration_s, 1.0 / state_hz)]
    events += [(t, "action", None) for t in np.arange(0.0, duration_s, 1.0 / action_hz)]
    events += [(t, "reward", None) for t in np.arange(0.0, duration_s, 1.0 / reward_hz)]
    events.sort(key=lambda e: e[0])
    counts = {"cam": 0, "state": 0, "nan_state": 0, "action": 0, "reward": 0}
    for rel, kind, extra in events:
        stamp = t_start + float(rel)
        if kind == "cam":
            recorder.add_image(extra[0], stamp, frame_for(rel, extra[1]))
        elif kind == "state":
            counts["state"] += 1
            values = state_for(rel)
            if nan_state_every and counts["state"] % nan_state_every == 0:
                values = values.copy()
                values[1] = np.nan
                counts["nan_state"] += 1
            recorder.add_state(stamp, values, names=state_names)
            continue
        elif kind == "action":
            recorder.add_action(stamp, action_for(rel), names=list(ACTION_NAMES))
        else:
            p = min(1.0, rel / duration_s)
            recorder.add_reward(stamp, p, float(p > 0.8), p)
        counts[kind] += 1
    return counts
