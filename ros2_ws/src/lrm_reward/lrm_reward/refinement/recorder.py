"""Record robot episodes (cameras, joint states, actions, rewards) into a LeRobotDataset v3.

What it is for: the refinement node's callbacks hand every message to an EpisodeRecorder, which only
appends (images to a raw on-disk spool, vectors to lists). At stop() the episode is resampled to the
dataset fps by stamp, written with lerobot (video encoding happens here, between episodes) and
described in a sidecar JSON (recording/episode_XXXXXX.json: task, notes, policy version, start/end,
operator outcome, partial flag, counters, recorder version).

Data layout: one dataset per day (default name "rec_{date}") or per run (a fixed name) under
`data_root`; features `observation.images.<camera>`, `observation.state`, `action`, `reward.progress`,
`reward.completion`, `reward.fused` (NaN where the reward node sent none: the RewardSignal contract
uses NaN for "not asked").

Resampling: frame k is at t0 + k/fps, where t0 is the first stamp at which every required stream
(cameras, state, action) has data. Each stream contributes its latest sample at or before that time
(what a policy would have seen). A required stream whose latest sample is older than `max_gap_s` is a
dropout: with on_gap="truncate" (default) the episode ends before the first dropout, with "hold" the
stale sample is repeated; either way the episode is marked partial in its sidecar.

Bad input: non-finite joint states or actions are counted and dropped (the previous valid sample is
held by the resampling, so a long NaN burst becomes a dropout); an action or state with the wrong
number of values raises ValueError naming the expected layout; a frame of the wrong size or type raises
ValueError; an episode with no complete frame saves nothing (SaveStatus.EMPTY). Disk full while
spooling or saving stops the episode with SaveStatus.STORAGE_ERROR and rolls the dataset back
(dataset_journal.py), so earlier episodes stay loadable; so does a kill -9 (recovered on the next
start()).

What it is not: no ROS (lrm_reward.ros.refinement_node wraps it), no judging.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import enum
import errno
import json
import logging
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.durable_files import try_exclusive_lock, write_json_atomic
from lrm_reward.refinement.dataset_journal import DatasetJournal
from lrm_reward.refinement.episode_spool import CameraSpool, SpoolStorageError, VectorLog

log = logging.getLogger(__name__)

RECORDER_VERSION = "lrm-recorder/1"
SIDECAR_SCHEMA = "lrm.episode/1"
SIDECAR_DIR = "recording"
REPO_PREFIX = "lrm"  # local repo_id = "lrm/<dataset name>"; never pushed anywhere
STATE_KEY = "observation.state"
ACTION_KEY = "action"
IMAGE_KEY_PREFIX = "observation.images."
REWARD_KEYS = ("reward.progress", "reward.completion", "reward.fused")
_LOW_DISK_BYTES = 16 * 1024 * 1024
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EpisodeOutcome(enum.StrEnum):
    """Operator label given at stop (StopEpisode.OUTCOME_*)."""

    UNKNOWN = "unknown"
    SUCCESS = "success"
    FAILURE = "failure"
    DISCARD = "discard"


class SaveStatus(enum.StrEnum):
    SAVED = "saved"
    EMPTY = "empty"  # no complete frame: nothing written
    DISCARDED = "discarded"  # operator said discard, or the episode was aborted
    STORAGE_ERROR = "storage_error"  # disk full or not writable: nothing of this episode kept
    FAILED = "failed"  # anything else that prevented saving (e.g. the dataset has other features)
    NOT_RECORDING = "not_recording"


class RecorderBusyError(RuntimeError):
    """start() while an episode is recording, or another process records into the same dataset."""


@dataclass
class RecorderConfig:
    data_root: Path
    cameras: tuple[str, ...] = ("front",)  # camera names -> features observation.images.<name>
    fps: int = 30
    dataset_name: str = "rec_{date}"  # "{date}" -> YYYY-MM-DD (local): one dataset per day; fixed: per run
    state_names: tuple[str, ...] | None = None  # None: taken from the first joint state (or joint_<i>)
    action_names: tuple[str, ...] | None = None  # None: taken from the first action (or action_<i>)
    robot_type: str | None = None
    use_videos: bool = True  # False stores PNG images inside parquet (small tests, no codec)
    max_gap_s: float = 0.5  # a required stream silent for longer than this is a dropout
    on_gap: str = "truncate"  # "truncate" | "hold"
    spool_to_disk: bool = True  # False keeps raw frames in RAM
    image_writer_threads: int = 2  # PNG writer threads used while saving (lerobot)
    rewards: bool = True  # add the reward.* features
    video_codec: str = "libsvtav1"  # lerobot's default (AV1); or h264, hevc, *_nvenc, ... (lerobot list)
    video_crf: int | None = None  # None: lerobot's default quality for the codec
    video_preset: str | None = None  # None: lerobot's default for the codec

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)
        self.cameras = tuple(self.cameras)
        if not self.cameras:
            raise ValueError("RecorderConfig.cameras: at least one camera is required")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"RecorderConfig.cameras has duplicates: {self.cameras}")
        for cam in self.cameras:
            if not _NAME_RE.match(cam):
                raise ValueError(f"camera name {cam!r}: use letters, digits, '_', '-', '.'")
        if not (1 <= self.fps <= 1000):
            raise ValueError(f"RecorderConfig.fps must be in [1, 1000], got {self.fps}")
        if self.max_gap_s <= 0:
            raise ValueError("RecorderConfig.max_gap_s must be > 0")
        if self.on_gap not in ("truncate", "hold"):
            raise ValueError(f"RecorderConfig.on_gap must be 'truncate' or 'hold', got {self.on_gap!r}")
        probe = self.dataset_name.replace("{date}", "2000-01-01")
        if "/" in probe or not _NAME_RE.match(probe):
            raise ValueError(f"RecorderConfig.dataset_name {self.dataset_name!r} is not a plain folder name")
        for label, names in (("state_names", self.state_names), ("action_names", self.action_names)):
            if names is not None:
                names = tuple(names)
                if not names or len(set(names)) != len(names):
                    raise ValueError(f"RecorderConfig.{label} must be non-empty and unique")
                setattr(self, label, names)
        if self.image_writer_threads < 0:
            raise ValueError("RecorderConfig.image_writer_threads must be >= 0")

    def dataset_name_for(self, when: _dt.datetime) -> str:
        return self.dataset_name.replace("{date}", when.strftime("%Y-%m-%d"))


@dataclass
class StartResult:
    episode_index: int
    dataset: Path
    recovered: str | None = None  # what recovery did to an unfinished earlier append, if anything


@dataclass
class StopResult:
    status: SaveStatus
    message: str
    episode_index: int = -1
    num_frames: int = 0
    dataset: Path | None = None
    partial: bool = False
    sidecar: Path | None = None


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
    # Small epsilon so a stamp that is exactly on the grid is not lost to float rounding.
    n = int(np.floor((t_end - t0) / period + 1e-9)) + 1
    grid = t0 + np.arange(n) * period
    plan = ResamplePlan(num_frames=n, t0=t0)
    first_bad = n
    for name, stamps in required.items():
        idx = np.searchsorted(stamps, grid + 1e-9, side="right") - 1
        stale = grid - stamps[np.clip(idx, 0, None)]
        bad = np.nonzero(stale > max_gap_s)[0]
        if bad.size:
            k = int(bad[0])
            plan.gaps.append({"stream": name, "at_s": float(grid[k] - t0), "stale_s": float(stale[k])})
            first_bad = min(first_bad, k)
        plan.indices[name] = idx
    for name, stamps in optional.items():
        plan.indices[name] = (
            np.searchsorted(stamps, grid + 1e-9, side="right") - 1 if len(stamps) else np.full(n, -1)
        )
    if plan.gaps and on_gap == "truncate":
        plan.truncated_from = n
        plan.num_frames = first_bad
        plan.indices = {k: v[:first_bad] for k, v in plan.indices.items()}
    return plan


@dataclass
class _Episode:
    task: str
    notes: str
    policy_version: str
    dataset_name: str
    episode_index: int
    started_at: str
    started_monotonic: float
    spool_dir: Path
    cameras: dict[str, CameraSpool]
    state: VectorLog
    action: VectorLog
    reward: VectorLog
    counters: dict[str, int]
    storage_error: str | None = None


class EpisodeRecorder:
    """Records one episode at a time into the dataset of the day (or run). Thread-safe appends."""

    def __init__(self, cfg: RecorderConfig) -> None:
        self.cfg = cfg
        self.state_names: tuple[str, ...] | None = cfg.state_names
        self.action_names: tuple[str, ...] | None = cfg.action_names
        self._episode: _Episode | None = None
        self._lock = threading.Lock()
        self._saving = False
        self._lock_files: dict[str, object] = {}
        self._name_maps: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self.totals: dict[str, int] = {"episodes_saved": 0, "episodes_empty": 0, "storage_errors": 0}

    # ----------------------------------------------------------------- lifecycle
    @property
    def recording(self) -> bool:
        return self._episode is not None

    def dataset_root(self, name: str | None = None) -> Path:
        return self.cfg.data_root / (name or self.cfg.dataset_name_for(_dt.datetime.now()))

    def start(self, task: str, notes: str = "", policy_version: str = "") -> StartResult:
        """Begin a new episode. Raises ValueError (bad task), RecorderBusyError, OSError (storage)."""
        task = (task or "").strip()
        if not task:
            raise ValueError("task is empty")
        with self._lock:
            if self._episode is not None or self._saving:
                raise RecorderBusyError("an episode is already being recorded or saved: stop it first")
            name = self.cfg.dataset_name_for(_dt.datetime.now())
            root = self.cfg.data_root / name
            self.cfg.data_root.mkdir(parents=True, exist_ok=True)
            self._hold_dataset_lock(name)
            recovered = DatasetJournal(root).recover()
            if recovered:
                log.warning(recovered)
            spool_base = self.cfg.data_root / ".spool" / name
            shutil.rmtree(spool_base, ignore_errors=True)  # raw frames of an episode that never finished
            spool_dir = spool_base / f"ep_{time.time_ns()}"
            spool_dir.mkdir(parents=True)
            episode_index = _total_episodes(root)
            spool = spool_dir if self.cfg.spool_to_disk else None
            self._episode = _Episode(
                task=task,
                notes=notes or "",
                policy_version=policy_version or "",
                dataset_name=name,
                episode_index=episode_index,
                started_at=_now_iso(),
                started_monotonic=time.monotonic(),
                spool_dir=spool_dir,
                cameras={cam: CameraSpool(cam, spool) for cam in self.cfg.cameras},
                state=VectorLog("state"),
                action=VectorLog("action"),
                reward=VectorLog("reward"),
                counters={
                    "nan_states": 0,
                    "nan_actions": 0,
                    "bad_states": 0,
                    "bad_actions": 0,
                    "bad_images": 0,
                    "unknown_camera": 0,
                },
            )
            return StartResult(episode_index=episode_index, dataset=root, recovered=recovered)

    # ----------------------------------------------------------------- callbacks (cheap appends)
    def add_image(self, camera: str, stamp_s: float, rgb: np.ndarray) -> bool:
        """Append one RGB frame. False when not recording or after a storage error; ValueError when bad."""
        ep = self._episode
        if ep is None or ep.storage_error:
            return False
        spool = ep.cameras.get(camera)
        if spool is None:
            ep.counters["unknown_camera"] += 1
            raise ValueError(f"unknown camera {camera!r}; configured: {list(ep.cameras)}")
        try:
            spool.append(stamp_s, rgb)
        except SpoolStorageError as exc:
            ep.storage_error = f"disk error while recording camera {camera!r}: {exc.strerror}"
            log.error(ep.storage_error)
            return False
        except ValueError:
            ep.counters["bad_images"] += 1
            raise
        return True

    def add_state(self, stamp_s: float, values, names: list[str] | tuple[str, ...] | None = None) -> bool:
        """Append a joint state (positions). Non-finite -> counted and dropped (returns False)."""
        return self._add_vector("state", stamp_s, values, names)

    def add_action(self, stamp_s: float, values, names: list[str] | tuple[str, ...] | None = None) -> bool:
        """Append a commanded action. Non-finite -> counted and dropped (returns False)."""
        return self._add_vector("action", stamp_s, values, names)

    def add_reward(self, stamp_s: float, progress: float, completion: float, fused: float) -> bool:
        ep = self._episode
        if ep is None or not self.cfg.rewards:
            return False
        ep.reward.append(stamp_s, np.array([progress, completion, fused], dtype=np.float32))
        return True

    def _add_vector(self, kind: str, stamp_s: float, values, names) -> bool:
        ep = self._episode
        if ep is None:
            return False
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
        expected = self.state_names if kind == "state" else self.action_names
        if names is not None and len(names) and expected is not None and tuple(names) != expected:
            arr = self._reorder(kind, arr, tuple(names), expected)  # picks the recorded joints by name
        if expected is not None and arr.size != len(expected):
            ep.counters[f"bad_{kind}s"] += 1
            raise ValueError(
                f"{kind} has {arr.size} values, this recording expects {len(expected)}"
                f" ({', '.join(expected)})"
            )
        if expected is None:
            if names is not None and len(names) == arr.size and len(set(names)) == arr.size:
                fixed = tuple(str(n) for n in names)
            else:
                fixed = tuple(f"{kind}_{i}" for i in range(arr.size))
            if kind == "state":
                self.state_names = fixed
            else:
                self.action_names = fixed
        if not np.all(np.isfinite(arr)):
            ep.counters[f"nan_{kind}s"] += 1
            return False
        (ep.state if kind == "state" else ep.action).append(stamp_s, arr.astype(np.float32))
        return True

    def _reorder(self, kind: str, arr: np.ndarray, names: tuple[str, ...], expected: tuple[str, ...]):
        ep = self._episode
        assert ep is not None
        key = (kind, names)
        index = self._name_maps.get(key)
        if index is None:
            if len(names) != arr.size:
                ep.counters[f"bad_{kind}s"] += 1
                raise ValueError(f"{kind}: {len(names)} names but {arr.size} values")
            lookup = {n: i for i, n in enumerate(names)}
            missing = [n for n in expected if n not in lookup]
            if missing:
                ep.counters[f"bad_{kind}s"] += 1
                raise ValueError(f"{kind} lacks {missing}; this recording expects {', '.join(expected)}")
            index = np.array([lookup[n] for n in expected])
            self._name_maps[key] = index
        return arr[index]

    # ----------------------------------------------------------------- end of episode
    def stop(self, outcome: EpisodeOutcome | str = EpisodeOutcome.UNKNOWN, notes: str = "") -> StopResult:
        """End the episode: resample, encode and save it (slow: seconds), or discard it."""
        outcome = EpisodeOutcome(outcome)
        with self._lock:
            ep = self._episode
            if ep is None:
                return StopResult(SaveStatus.NOT_RECORDING, "no episode is being recorded")
            self._episode = None
            self._saving = True
        try:
            return self._finish(ep, outcome, notes)
        finally:
            for spool in ep.cameras.values():
                spool.abandon()
            shutil.rmtree(ep.spool_dir, ignore_errors=True)
            self._saving = False

    def abort(self) -> StopResult:
        """Drop the current episode without saving (shutdown)."""
        return self.stop(EpisodeOutcome.DISCARD, "aborted")

    def close(self) -> None:
        if self.recording:
            self.abort()
        for handle in self._lock_files.values():
            with contextlib.suppress(OSError):
                handle.close()  # type: ignore[attr-defined]
        self._lock_files.clear()

    def _finish(self, ep: _Episode, outcome: EpisodeOutcome, notes: str) -> StopResult:
        root = self.cfg.data_root / ep.dataset_name
        base = {"episode_index": ep.episode_index, "dataset": root}
        if outcome is EpisodeOutcome.DISCARD:
            return StopResult(SaveStatus.DISCARDED, "episode discarded, nothing saved", **base)
        if ep.storage_error:
            self.totals["storage_errors"] += 1
            return StopResult(SaveStatus.STORAGE_ERROR, f"{ep.storage_error}; episode not saved", **base)
        try:
            images = {cam: spool.finish() for cam, spool in ep.cameras.items()}
        except SpoolStorageError as exc:
            self.totals["storage_errors"] += 1
            return StopResult(SaveStatus.STORAGE_ERROR, f"{exc.strerror}; episode not saved", **base)

        cam_stamps = {cam: _sorted_stamps(ep.cameras[cam].stamps) for cam in ep.cameras}
        state_stamps, state_values = ep.state.arrays(len(self.state_names or ()))
        action_stamps, action_values = ep.action.arrays(len(self.action_names or ()))
        reward_stamps, reward_values = ep.reward.arrays(3)
        required = {f"camera:{c}": s for c, (_, s) in cam_stamps.items()}
        required["state"] = state_stamps
        required["action"] = action_stamps
        plan = plan_resampling(
            required, {"reward": reward_stamps}, self.cfg.fps, self.cfg.max_gap_s, self.cfg.on_gap
        )
        if plan.num_frames == 0:
            self.totals["episodes_empty"] += 1
            why = (
                f"no data from {', '.join(plan.missing)}"
                if plan.missing
                else f"a stream dropped out before the first complete frame ({plan.gaps[0]['stream']})"
            )
            return StopResult(SaveStatus.EMPTY, f"no complete frame recorded ({why}); nothing saved", **base)

        features = self._features({cam: images[cam].shape[1:] for cam in images})
        frames = _FrameSource(
            plan,
            images,
            cam_stamps,
            state_values,
            action_values,
            reward_values if self.cfg.rewards else None,
            ep.task,
        )
        sidecar = self._sidecar(ep, outcome, notes, plan, required)
        try:
            self._append(root, features, frames, sidecar)
        except OSError as exc:
            self.totals["storage_errors"] += 1
            reason = _storage_reason(exc, self.cfg.data_root)
            return StopResult(
                SaveStatus.STORAGE_ERROR,
                f"saving episode {ep.episode_index} failed ({reason}); it was rolled back, "
                "earlier episodes are intact",
                **base,
            )
        except Exception as exc:  # report any failure to the caller instead of crashing the node
            return StopResult(SaveStatus.FAILED, f"saving episode {ep.episode_index} failed: {exc}", **base)
        self.totals["episodes_saved"] += 1
        partial = bool(plan.gaps)
        msg = f"saved episode {ep.episode_index} ({plan.num_frames} frames) to {root.name}"
        if partial:
            msg += f"; PARTIAL: {', '.join(g['stream'] for g in plan.gaps)} dropped out"
        return StopResult(
            SaveStatus.SAVED,
            msg,
            num_frames=plan.num_frames,
            partial=partial,
            sidecar=root / SIDECAR_DIR / f"episode_{ep.episode_index:06d}.json",
            **base,
        )

    def _features(self, cam_shapes: dict[str, tuple[int, ...]]) -> dict[str, dict]:
        image_dtype = "video" if self.cfg.use_videos else "image"
        features: dict[str, dict] = {}
        for cam, shape in cam_shapes.items():
            features[IMAGE_KEY_PREFIX + cam] = {
                "dtype": image_dtype,
                "shape": tuple(int(s) for s in shape),
                "names": ["height", "width", "channels"],
            }
        features[STATE_KEY] = {
            "dtype": "float32",
            "shape": (len(self.state_names),),
            "names": list(self.state_names),
        }
        features[ACTION_KEY] = {
            "dtype": "float32",
            "shape": (len(self.action_names),),
            "names": list(self.action_names),
        }
        if self.cfg.rewards:
            for key in REWARD_KEYS:
                features[key] = {"dtype": "float32", "shape": (1,), "names": None}
        return features

    def _append(self, root: Path, features: dict, frames: _FrameSource, sidecar: dict) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        repo_id = f"{REPO_PREFIX}/{root.name}"
        encoder = self._video_encoder()
        journal = DatasetJournal(root)
        journal.begin(note=f"episode {sidecar['episode_index']}")
        ds = None
        try:
            if (root / "meta" / "info.json").exists():
                ds = LeRobotDataset.resume(
                    repo_id,
                    root=root,
                    video_backend="pyav",
                    image_writer_threads=self.cfg.image_writer_threads,
                    rgb_encoder=encoder,
                )
                _check_features(root, ds.meta.features, features)
            else:
                ds = LeRobotDataset.create(
                    repo_id,
                    fps=self.cfg.fps,
                    features=features,
                    root=root,
                    robot_type=self.cfg.robot_type,
                    use_videos=self.cfg.use_videos,
                    video_backend="pyav",
                    image_writer_threads=self.cfg.image_writer_threads,
                    rgb_encoder=encoder,
                )
            if ds.meta.total_episodes != sidecar["episode_index"]:
                raise RuntimeError(
                    f"dataset {root.name} has {ds.meta.total_episodes} episodes, expected "
                    f"{sidecar['episode_index']} (written by another process?)"
                )
            for frame in frames:
                ds.add_frame(frame)
            ds.save_episode(parallel_encoding=False)
            ds.finalize()
            write_json_atomic(root / SIDECAR_DIR / f"episode_{sidecar['episode_index']:06d}.json", sidecar)
        except BaseException:
            _neutralize(ds)
            journal.recover()
            raise
        journal.commit()

    def _video_encoder(self):
        if not self.cfg.use_videos:
            return None
        from lerobot.configs.video import RGBEncoderConfig

        kwargs: dict = {"vcodec": self.cfg.video_codec}
        if self.cfg.video_crf is not None:
            kwargs["crf"] = self.cfg.video_crf
        if self.cfg.video_preset is not None:
            kwargs["preset"] = self.cfg.video_preset
        return RGBEncoderConfig(**kwargs)

    def _sidecar(
        self, ep: _Episode, outcome: EpisodeOutcome, notes: str, plan: ResamplePlan, required
    ) -> dict:
        all_notes = "\n".join(n for n in (ep.notes, notes) if n)
        stamps_first = min(float(s[0]) for s in required.values())
        stamps_last = max(float(s[-1]) for s in required.values())
        return {
            "schema": SIDECAR_SCHEMA,
            "episode_index": ep.episode_index,
            "dataset": ep.dataset_name,
            "task": ep.task,
            "notes": all_notes,
            "policy_version": ep.policy_version,
            "outcome": outcome.value,
            "started_at": ep.started_at,
            "ended_at": _now_iso(),
            "stamp_first_s": stamps_first,
            "stamp_last_s": stamps_last,
            "dataset_t0_s": plan.t0,
            "fps": self.cfg.fps,
            "num_frames": plan.num_frames,
            "duration_s": plan.num_frames / self.cfg.fps,
            "partial": bool(plan.gaps),
            "dropouts": plan.gaps,
            "truncated_from_frames": plan.truncated_from,
            "on_gap": self.cfg.on_gap,
            "received": {
                **{f"camera:{c}": len(s.stamps) for c, s in ep.cameras.items()},
                "state": len(ep.state),
                "action": len(ep.action),
                "reward": len(ep.reward),
            },
            "dropped": dict(ep.counters),
            "nan_policy": "non-finite joint states/actions are dropped; the previous valid sample is held",
            "recorder_version": RECORDER_VERSION,
        }

    def _hold_dataset_lock(self, name: str) -> None:
        if name in self._lock_files:
            return
        handle = try_exclusive_lock(self.cfg.data_root / f".{name}.lock")  # held for our lifetime
        if handle is None:
            raise RecorderBusyError(
                f"another recorder is writing dataset {name!r} under {self.cfg.data_root}"
            )
        self._lock_files[name] = handle


class _FrameSource:
    """Yields lerobot frames lazily from the plan (images read from the memmap one at a time)."""

    def __init__(self, plan, images, cam_stamps, state_values, action_values, reward_values, task):
        self.plan = plan
        self.images = images
        self.cam_order = {cam: order for cam, (order, _) in cam_stamps.items()}
        self.state = state_values
        self.action = action_values
        self.reward = reward_values
        self.task = task

    def __iter__(self):
        idx = self.plan.indices
        nan3 = np.full(3, np.nan, np.float32)
        for k in range(self.plan.num_frames):
            frame: dict = {"task": self.task}
            for cam, arr in self.images.items():
                sample = self.cam_order[cam][idx[f"camera:{cam}"][k]]
                frame[IMAGE_KEY_PREFIX + cam] = np.asarray(arr[sample])
            frame[STATE_KEY] = self.state[idx["state"][k]]
            frame[ACTION_KEY] = self.action[idx["action"][k]]
            if self.reward is not None:  # None: the dataset has no reward.* features
                r = idx["reward"][k]
                values = self.reward[r] if r >= 0 else nan3
                for j, key in enumerate(REWARD_KEYS):
                    frame[key] = values[j : j + 1].astype(np.float32)
            yield frame


def _sorted_stamps(stamps: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(arrival index in stamp order, sorted stamps): frames stay in the spool in arrival order."""
    arr = np.asarray(stamps, dtype=np.float64)
    order = np.argsort(arr, kind="stable")
    return order, arr[order]


def _check_features(root: Path, existing: dict, wanted: dict) -> None:
    for key, ft in wanted.items():
        have = existing.get(key)
        same = (
            have is not None
            and have["dtype"] == ft["dtype"]
            and tuple(have["shape"]) == tuple(ft["shape"])
            and (have.get("names") or None) == (ft.get("names") or None)
        )
        if not same:
            stored = have and {k: have[k] for k in ("dtype", "shape", "names")}
            raise ValueError(
                f"dataset {root.name} stores {key} as {stored}"
                f" but this recording has {ft}: record into a new dataset (another dataset_name)"
            )


def _neutralize(ds) -> None:
    """After a failed save, make sure the half-open lerobot writer cannot write again (its __del__
    finalizes), so nothing lands on disk after the rollback."""
    if ds is None:
        return
    with contextlib.suppress(Exception):
        ds.writer.close_writer()
    meta = getattr(ds, "meta", None)
    if meta is not None and getattr(meta, "_pq_writer", None) is not None:
        with contextlib.suppress(Exception):
            meta._pq_writer.close()  # its file is about to be deleted by the rollback
        meta._pq_writer = None
    if meta is not None:
        meta._metadata_buffer = []
    writer = getattr(ds, "writer", None)
    if writer is not None and getattr(writer, "image_writer", None) is not None:
        with contextlib.suppress(Exception):
            writer.image_writer.stop()
        writer.image_writer = None
    for obj in (ds, getattr(ds, "writer", None), getattr(ds, "meta", None)):
        if obj is not None:
            obj._is_finalized = True
            obj._finalized = True


def _storage_reason(exc: OSError, where: Path) -> str:
    """lerobot's image writer swallows ENOSPC and fails later on a truncated PNG: look at the free space
    too, so the operator reads "disk full" and not a PIL error."""
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    if exc.errno == errno.ENOSPC or 0 <= free < _LOW_DISK_BYTES:
        return f"disk full: {max(free, 0)} bytes free on {where}; {exc}"
    return exc.strerror or str(exc)


def _total_episodes(root: Path) -> int:
    info = root / "meta" / "info.json"
    if not info.exists():
        return 0
    return int(json.loads(info.read_text())["total_episodes"])


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")
