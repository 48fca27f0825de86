"""Record robot episodes (cameras, joint states, actions, rewards) into a LeRobotDataset v3.

What it is for: the refinement node's callbacks hand every message to an EpisodeRecorder, which only
appends (images to a raw on-disk spool, vectors to lists). At stop() the episode is resampled to the
dataset fps by stamp (cheap) into a SaveJob; episode_saver.py writes it with lerobot (video encoding)
and a sidecar JSON (recording/episode_XXXXXX.json: task, notes, policy version, start/end, operator
outcome, partial flag, counters, recorder version). With `saver="inline"` (default) that happens in
stop(); with `saver="process"` (the ROS node) a niced child process does it, so encoding takes neither
the GIL nor the CPU from the callbacks, and stop(wait=False) returns once the episode is sealed on disk:
the next episode may record while the previous one is saved.

Data layout: one dataset per day (default name "rec_{date}") or per run (a fixed name) under
`data_root`; features `observation.images.<camera>`, `observation.state`, `action`, optionally
`observation.environment_state` (environment_state_names, e.g. object poses from a simulator),
`reward.progress`, `reward.completion`, `reward.fused` (NaN where the reward node sent none: the
RewardSignal contract uses NaN for "not asked").

Resampling: frame k is at t0 + k/fps, where t0 is the first stamp at which every required stream
(cameras, state, action, environment state when configured) has data. Each stream contributes its latest
sample at or before that time (what a policy would have seen). A required stream whose latest sample is
older than `max_gap_s` is a dropout: with on_gap="truncate" (default) the episode ends before the first
dropout, with "hold" the stale sample is repeated; either way the episode is marked partial.

Bad input: non-finite joint states, actions or environment states are counted and dropped (the previous
valid sample is held by the resampling, so a long NaN burst becomes a dropout); a vector with the wrong
number of values raises ValueError naming the expected layout; a frame of the wrong size or type raises
ValueError; an episode with no complete frame saves nothing (SaveStatus.EMPTY). Disk full while
spooling or saving stops the episode with SaveStatus.STORAGE_ERROR and rolls the dataset back
(dataset_journal.py), so earlier episodes stay loadable; so does a kill -9 (recovered on the next
start(); an episode already sealed for the saver process is saved then, not lost).

What it is not: no ROS (lrm_reward.ros.refinement_node wraps it), no judging.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrm_reward.durable_files import try_exclusive_lock
from lrm_reward.refinement.dataset_journal import DatasetJournal
from lrm_reward.refinement.episode_layout import dataset_features, episode_sidecar, now_iso
from lrm_reward.refinement.episode_saver import (
    SaveJob,
    SaverProcess,
    _total_episodes,
    save_job,
    sealed_spools,
    try_recover,
)
from lrm_reward.refinement.episode_spool import CameraSpool, SpoolStorageError, VectorLog
from lrm_reward.refinement.feature_topics import (  # topic -> feature: one definition, shared with the policy
    ACTION_KEY,
    ENV_STATE_KEY,
    STATE_KEY,
)
from lrm_reward.refinement.recorder_config import (
    REWARD_KEYS,
    EpisodeOutcome,
    RecorderBusyError,
    RecorderConfig,
    SaveStatus,
    StartResult,
    StopResult,
)
from lrm_reward.refinement.resampling import plan_resampling, sorted_stamps

log = logging.getLogger(__name__)


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
    environment_state: VectorLog
    counters: dict[str, int]
    storage_error: str | None = None


class EpisodeRecorder:
    """Records one episode at a time into the dataset of the day (or run). Thread-safe appends."""

    def __init__(self, cfg: RecorderConfig) -> None:
        self.cfg = cfg
        self.state_names: tuple[str, ...] | None = cfg.state_names
        self.action_names: tuple[str, ...] | None = cfg.action_names
        self.environment_state_names: tuple[str, ...] | None = cfg.environment_state_names
        self._episode: _Episode | None = None
        self._lock = threading.RLock()  # RLock: a save may finish (callback) inside stop()/start()
        self._saving = False
        self._lock_files: dict[str, object] = {}
        self._name_maps: dict[tuple[str, tuple[str, ...]], np.ndarray] = {}
        self.totals: dict[str, int] = {
            "episodes_saved": 0,
            "episodes_empty": 0,
            "storage_errors": 0,
            "save_failures": 0,
        }
        self.last_save: StopResult | None = None  # the latest finished save (for a node's diagnostics)
        self.on_saved = None  # optional callable(StopResult), called when a background save finishes
        self._pending: dict[str, list[Future]] = {}  # dataset name -> saves in flight
        self._submitted: set[str] = set()  # spool folders handed to the saver process
        self._next_index: dict[str, int] = {}
        self._saver = SaverProcess(cfg.saver_nice) if cfg.saver == "process" else None

    @property
    def saves_pending(self) -> int:
        with self._lock:
            return sum(1 for futures in self._pending.values() for f in futures if not f.done())

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
            spool_base = self.cfg.data_root / ".spool" / name
            busy = any(not f.done() for f in self._pending.get(name, []))
            if self._saver is None:
                recovered = DatasetJournal(root).recover()
                shutil.rmtree(spool_base, ignore_errors=True)  # raw frames of an episode never finished
            else:
                recovered = None if busy else try_recover(root)
                recovered = self._resume_sealed(name, spool_base, recovered)
                busy = any(not f.done() for f in self._pending.get(name, []))
            if recovered:
                log.warning(recovered)
            spool_dir = spool_base / f"ep_{time.time_ns()}"
            spool_dir.mkdir(parents=True)
            # with saves in flight, info.json does not count them yet
            episode_index = self._next_index[name] if busy else _total_episodes(root)
            spool = spool_dir if self.cfg.spool_to_disk else None
            self._episode = _Episode(
                task=task,
                notes=notes or "",
                policy_version=policy_version or "",
                dataset_name=name,
                episode_index=episode_index,
                started_at=now_iso(),
                started_monotonic=time.monotonic(),
                spool_dir=spool_dir,
                cameras={cam: CameraSpool(cam, spool) for cam in self.cfg.cameras},
                state=VectorLog("state"),
                action=VectorLog("action"),
                reward=VectorLog("reward"),
                environment_state=VectorLog("environment_state"),
                counters={
                    "nan_states": 0,
                    "nan_actions": 0,
                    "nan_environment_states": 0,
                    "bad_states": 0,
                    "bad_actions": 0,
                    "bad_environment_states": 0,
                    "bad_images": 0,
                    "unknown_camera": 0,
                },
            )
            return StartResult(episode_index=episode_index, dataset=root, recovered=recovered)

    def _resume_sealed(self, name: str, spool_base: Path, recovered: str | None) -> str | None:
        """Process saver: queue episodes sealed by an earlier (killed) recorder, drop unsealed spools."""
        notes = [recovered] if recovered else []
        if spool_base.exists():
            for folder in spool_base.iterdir():
                sealed = (folder / "job.json").exists()
                if not sealed and str(folder) not in self._submitted:
                    shutil.rmtree(folder, ignore_errors=True)  # an episode that was never stopped
        for folder in sealed_spools(spool_base):
            if str(folder) in self._submitted:
                continue
            try:
                job = SaveJob.read(folder)
            except (OSError, ValueError, KeyError, TypeError):
                shutil.rmtree(folder, ignore_errors=True)
                notes.append(f"removed an unreadable sealed episode spool {folder.name}")
                continue
            index = self._next_index.get(name, _total_episodes(job.dataset_root))
            self._submit(name, folder, next_index=index + 1)
            notes.append(f"saving episode sealed before a restart ({job.num_frames} frames)")
        return "; ".join(notes) or None

    def _submit(self, name: str, spool_dir: Path, next_index: int) -> Future:
        """Hand a sealed spool to the saver process; `next_index`: what the next episode will be."""
        assert self._saver is not None
        self._submitted.add(str(spool_dir))
        future = self._saver.submit(spool_dir)
        self._pending.setdefault(name, []).append(future)
        self._next_index[name] = next_index
        future.add_done_callback(lambda f: self._save_done(name, spool_dir, f))
        return future

    def _save_done(self, name: str, spool_dir: Path, future: Future) -> None:
        result = self._stop_result(future.result(), self.cfg.data_root / name)
        with self._lock:
            self._pending[name] = [f for f in self._pending.get(name, []) if not f.done()]
            # saved or failed for good: the spool is gone; the saver died: the next start() retries it
            self._submitted.discard(str(spool_dir))
            self._count(result)
            self.last_save = result
        if self.on_saved is not None:
            self.on_saved(result)

    # ----------------------------------------------------------------- callbacks (cheap appends)
    def add_image(self, camera: str, stamp_s: float, rgb: np.ndarray) -> bool:
        """Append one RGB frame. False when not recording or after a storage error; ValueError when bad."""
        ep = self._episode
        if ep is None or ep.storage_error:
            return False
        spool = ep.cameras.get(camera)
        if spool is None:
            with self._lock:  # cameras may be recorded from several threads
                ep.counters["unknown_camera"] += 1
            raise ValueError(f"unknown camera {camera!r}; configured: {list(ep.cameras)}")
        try:
            spool.append(stamp_s, rgb)
        except SpoolStorageError as exc:
            ep.storage_error = f"disk error while recording camera {camera!r}: {exc.strerror}"
            log.error(ep.storage_error)
            return False
        except ValueError:
            with self._lock:
                ep.counters["bad_images"] += 1
            raise
        return True

    def add_state(self, stamp_s: float, values, names: list[str] | tuple[str, ...] | None = None) -> bool:
        """Append a joint state (positions). Non-finite -> counted and dropped (returns False)."""
        return self._add_vector("state", stamp_s, values, names)

    def add_action(self, stamp_s: float, values, names: list[str] | tuple[str, ...] | None = None) -> bool:
        """Append a commanded action. Non-finite -> counted and dropped (returns False)."""
        return self._add_vector("action", stamp_s, values, names)

    def add_environment_state(
        self, stamp_s: float, values, names: list[str] | tuple[str, ...] | None = None
    ) -> bool:
        """Append an environment state (observation.environment_state, e.g. object poses); like add_state.

        False when the recorder has no environment_state_names configured (the feature is off), when not
        recording, or for non-finite values (counted); ValueError for a wrong size or unknown names.
        """
        if not self.cfg.environment_state:
            return False
        return self._add_vector("environment_state", stamp_s, values, names)

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
        expected = self._expected_names(kind)
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
            setattr(self, f"{kind}_names", fixed)
        if not np.all(np.isfinite(arr)):
            ep.counters[f"nan_{kind}s"] += 1
            return False
        getattr(ep, kind).append(stamp_s, arr.astype(np.float32))
        return True

    def _expected_names(self, kind: str) -> tuple[str, ...] | None:
        if kind == "state":
            return self.state_names
        if kind == "action":
            return self.action_names
        return self.environment_state_names

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
    def stop(
        self,
        outcome: EpisodeOutcome | str = EpisodeOutcome.UNKNOWN,
        notes: str = "",
        wait: bool = True,
        transport: dict | None = None,
        provenance: dict | None = None,
    ) -> StopResult:
        """End the episode: resample it and save it (encoding: seconds), or discard it.

        `transport`: what the caller knows about delivery (per stream: messages received, lost, lag), kept
        as is in the sidecar's "transport". `provenance`: where the episode came from when it was not recorded
        live (the bag importer: bag path, topics, time range), kept as is in the sidecar's "provenance".

        With the process saver and wait=False, returns as soon as the episode is sealed on disk
        (SaveStatus.SAVING, num_frames final); the save's result arrives in `last_save` / `on_saved`.
        """
        outcome = EpisodeOutcome(outcome)
        with self._lock:
            ep = self._episode
            if ep is None:
                return StopResult(SaveStatus.NOT_RECORDING, "no episode is being recorded")
            self._episode = None
            self._saving = True
        handed_over = False
        try:
            job_or_result = self._seal(ep, outcome, notes, transport, provenance)
            if isinstance(job_or_result, StopResult):
                self._count(job_or_result)
                return job_or_result
            job = job_or_result
            root = job.dataset_root
            if self._saver is None:
                result = self._stop_result(save_job(job), root)
                self._count(result)
                self.last_save = result
                return result
            try:
                job.write()
            except OSError as exc:
                result = StopResult(
                    SaveStatus.STORAGE_ERROR,
                    f"sealing episode {ep.episode_index} failed ({exc.strerror}); episode not saved",
                    episode_index=ep.episode_index,
                    dataset=root,
                )
                self._count(result)
                return result
            with self._lock:
                future = self._submit(ep.dataset_name, ep.spool_dir, next_index=ep.episode_index + 1)
            handed_over = True
            if wait:
                return self._stop_result(future.result(), root)
            return StopResult(
                SaveStatus.SAVING,
                f"episode {ep.episode_index} ({job.num_frames} frames) sealed; saving in the background",
                episode_index=ep.episode_index,
                num_frames=job.num_frames,
                dataset=root,
                partial=bool(job.sidecar["partial"]),
            )
        finally:
            for spool in ep.cameras.values():
                spool.abandon()
            if not handed_over:
                shutil.rmtree(ep.spool_dir, ignore_errors=True)
            self._saving = False

    def abort(self) -> StopResult:
        """Drop the current episode without saving (shutdown)."""
        return self.stop(EpisodeOutcome.DISCARD, "aborted")

    def close(self, save_timeout_s: float | None = None) -> None:
        """Abort a recording episode, let queued saves finish (up to save_timeout_s), release locks."""
        if self.recording:
            self.abort()
        if self._saver is not None:
            self._saver.close(save_timeout_s)
        for handle in self._lock_files.values():
            with contextlib.suppress(OSError):
                handle.close()  # type: ignore[attr-defined]
        self._lock_files.clear()

    def _count(self, result: StopResult) -> None:
        key = {
            SaveStatus.SAVED: "episodes_saved",
            SaveStatus.EMPTY: "episodes_empty",
            SaveStatus.STORAGE_ERROR: "storage_errors",
            SaveStatus.FAILED: "save_failures",
        }.get(result.status)
        if key:
            self.totals[key] += 1

    @staticmethod
    def _stop_result(result: dict, root: Path) -> StopResult:
        return StopResult(
            SaveStatus(result["status"]),
            result["message"],
            episode_index=int(result["episode_index"]),
            num_frames=int(result["num_frames"]),
            dataset=root,
            partial=bool(result["partial"]),
            sidecar=Path(result["sidecar"]) if result.get("sidecar") else None,
        )

    def _seal(
        self,
        ep: _Episode,
        outcome: EpisodeOutcome,
        notes: str,
        transport: dict | None = None,
        provenance: dict | None = None,
    ) -> SaveJob | StopResult:
        """Resample the episode into a SaveJob, or say why there is nothing to save."""
        root = self.cfg.data_root / ep.dataset_name
        base = {"episode_index": ep.episode_index, "dataset": root}
        if outcome is EpisodeOutcome.DISCARD:
            return StopResult(SaveStatus.DISCARDED, "episode discarded, nothing saved", **base)
        if ep.storage_error:
            return StopResult(SaveStatus.STORAGE_ERROR, f"{ep.storage_error}; episode not saved", **base)
        try:
            images = {cam: spool.finish() for cam, spool in ep.cameras.items()}
        except SpoolStorageError as exc:
            return StopResult(SaveStatus.STORAGE_ERROR, f"{exc.strerror}; episode not saved", **base)

        cam_stamps = {cam: sorted_stamps(ep.cameras[cam].stamps) for cam in ep.cameras}
        vectors = {
            STATE_KEY: ep.state.arrays(len(self.state_names or ())),
            ACTION_KEY: ep.action.arrays(len(self.action_names or ())),
        }
        if self.cfg.environment_state:
            vectors[ENV_STATE_KEY] = ep.environment_state.arrays(len(self.environment_state_names or ()))
        stream_names = {STATE_KEY: "state", ACTION_KEY: "action", ENV_STATE_KEY: "environment_state"}
        required = {f"camera:{c}": s for c, (_, s) in cam_stamps.items()}
        required.update({stream_names[key]: stamps for key, (stamps, _) in vectors.items()})
        reward_stamps, reward_values = ep.reward.arrays(3)
        plan = plan_resampling(
            required, {"reward": reward_stamps}, self.cfg.fps, self.cfg.max_gap_s, self.cfg.on_gap
        )
        if plan.num_frames == 0:
            why = (
                f"no data from {', '.join(plan.missing)}"
                if plan.missing
                else f"a stream dropped out before the first complete frame ({plan.gaps[0]['stream']})"
            )
            return StopResult(SaveStatus.EMPTY, f"no complete frame recorded ({why}); nothing saved", **base)

        arrays: dict[str, np.ndarray] = {}
        for cam, (order, _) in cam_stamps.items():
            arrays[f"image:{cam}"] = order[plan.indices[f"camera:{cam}"]]
        for key, (_, values) in vectors.items():
            arrays[f"vector:{key}"] = values[plan.indices[stream_names[key]]]
        if self.cfg.rewards:
            r = plan.indices["reward"]
            picked = np.full((plan.num_frames, 3), np.nan, np.float32)
            picked[r >= 0] = reward_values[r[r >= 0]]
            for j, key in enumerate(REWARD_KEYS):
                arrays[f"vector:{key}"] = picked[:, j : j + 1]
        spooled = self.cfg.spool_to_disk
        return SaveJob(
            spool_dir=ep.spool_dir,
            dataset_root=root,
            fps=self.cfg.fps,
            features=dataset_features(
                {cam: images[cam].shape[1:] for cam in images},
                self.state_names or (),
                self.action_names or (),
                self.environment_state_names if self.cfg.environment_state else None,
                rewards=self.cfg.rewards,
                use_videos=self.cfg.use_videos,
            ),
            sidecar=episode_sidecar(
                ep,
                outcome,
                notes,
                plan,
                required,
                fps=self.cfg.fps,
                on_gap=self.cfg.on_gap,
                environment_state=self.cfg.environment_state,
                transport=transport,
                provenance=provenance,
            ),
            task=ep.task,
            cameras={cam: [int(v) for v in images[cam].shape[1:]] for cam in images},
            camera_files={cam: ep.cameras[cam].file_name for cam in images},
            camera_counts={cam: int(images[cam].shape[0]) for cam in images},
            robot_type=self.cfg.robot_type,
            use_videos=self.cfg.use_videos,
            image_writer_threads=self.cfg.image_writer_threads,
            video={
                "vcodec": self.cfg.video_codec,
                "crf": self.cfg.video_crf,
                "preset": self.cfg.video_preset,
            },
            streaming_encoding=self.cfg.streaming_encoding,
            arrays=arrays,
            images=None if spooled and self._saver is not None else images,
        )

    def _hold_dataset_lock(self, name: str) -> None:
        if name in self._lock_files:
            return
        handle = try_exclusive_lock(self.cfg.data_root / f".{name}.lock")  # held for our lifetime
        if handle is None:
            raise RecorderBusyError(
                f"another recorder is writing dataset {name!r} under {self.cfg.data_root}"
            )
        self._lock_files[name] = handle
