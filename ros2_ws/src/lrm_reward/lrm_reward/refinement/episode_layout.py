"""What one recorded episode looks like on disk: the dataset's features and the episode's sidecar JSON.

The recorder (recorder.py) decides what goes into an episode; this module only names it. Features follow
LeRobotDataset v3 (`observation.images.<camera>`, `observation.state`, `action`, optionally
`observation.environment_state` and the `reward.*` columns); the sidecar (`recording/episode_XXXXXX.json`,
schema `lrm.episode/1`) holds what the dataset has no column for: task, notes, policy version, operator
outcome, timing, dropouts and the counters of dropped input. The judge and the selection read it back.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

from lrm_reward.refinement.feature_topics import ACTION_KEY, ENV_STATE_KEY, IMAGE_KEY_PREFIX, STATE_KEY
from lrm_reward.refinement.recorder_config import (
    RECORDER_VERSION,
    REWARD_KEYS,
    SIDECAR_SCHEMA,
    EpisodeOutcome,
)
from lrm_reward.refinement.resampling import ResamplePlan


def now_iso() -> str:
    """Local wall time with its UTC offset, to the millisecond (the sidecar's started_at / ended_at)."""
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


def dataset_features(
    cam_shapes: dict[str, Sequence[int]],
    state_names: Sequence[str],
    action_names: Sequence[str],
    environment_state_names: Sequence[str] | None,
    *,
    rewards: bool,
    use_videos: bool,
) -> dict[str, dict]:
    """LeRobot feature specs of a recording; environment_state_names None: no environment-state column."""

    def vector(names: Sequence[str]) -> dict:
        return {"dtype": "float32", "shape": (len(names),), "names": list(names)}

    image_dtype = "video" if use_videos else "image"
    features: dict[str, dict] = {
        IMAGE_KEY_PREFIX + cam: {
            "dtype": image_dtype,
            "shape": tuple(int(s) for s in shape),
            "names": ["height", "width", "channels"],
        }
        for cam, shape in cam_shapes.items()
    }
    features[STATE_KEY] = vector(state_names)
    features[ACTION_KEY] = vector(action_names)
    if environment_state_names is not None:
        features[ENV_STATE_KEY] = vector(environment_state_names)
    if rewards:
        for key in REWARD_KEYS:
            features[key] = {"dtype": "float32", "shape": (1,), "names": None}
    return features


def episode_sidecar(
    ep,
    outcome: EpisodeOutcome,
    notes: str,
    plan: ResamplePlan,
    required: dict,
    *,
    fps: int,
    on_gap: str,
    environment_state: bool,
    transport: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """The sidecar of a sealed episode (ep: the recorder's episode; required: stream -> sorted stamps)."""
    all_notes = "\n".join(n for n in (ep.notes, notes) if n)
    received = {f"camera:{c}": len(s.stamps) for c, s in ep.cameras.items()}
    received.update(state=len(ep.state), action=len(ep.action), reward=len(ep.reward))
    if environment_state:
        received["environment_state"] = len(ep.environment_state)
    return {
        "schema": SIDECAR_SCHEMA,
        "episode_index": ep.episode_index,
        "dataset": ep.dataset_name,
        "task": ep.task,
        "notes": all_notes,
        "policy_version": ep.policy_version,
        "outcome": outcome.value,
        "started_at": ep.started_at,
        "ended_at": now_iso(),
        "stamp_first_s": min(float(s[0]) for s in required.values()),
        "stamp_last_s": max(float(s[-1]) for s in required.values()),
        "dataset_t0_s": plan.t0,
        "fps": fps,
        "num_frames": plan.num_frames,
        "duration_s": plan.num_frames / fps,
        "partial": bool(plan.gaps),
        "dropouts": plan.gaps,
        "truncated_from_frames": plan.truncated_from,
        "on_gap": on_gap,
        "received": received,
        "dropped": dict(ep.counters),
        **({"transport": transport} if transport is not None else {}),
        **({"provenance": provenance} if provenance is not None else {}),
        "nan_policy": "non-finite joint states/actions are dropped; the previous valid sample is held",
        "recorder_version": RECORDER_VERSION,
        "spool_id": ep.spool_dir.name,
    }
