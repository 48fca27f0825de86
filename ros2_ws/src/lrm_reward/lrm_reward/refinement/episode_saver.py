"""Write one sealed episode into its LeRobotDataset, in the caller or in a separate saver process.

What it is for: EpisodeRecorder.stop() resamples an episode (cheap) and hands a SaveJob here; the slow
part (video encoding, parquet, episode stats) runs in `save_job`. A recorder inside a ROS node runs it in
a child process (`SaverProcess`, niced), so encoding never competes with the node's callbacks for the GIL,
and seldom for a CPU core. The job is sealed on disk first (`SaveJob.write`: `job.npz` with the resampled
vectors and per-frame image indices, then `job.json`, whose presence marks the spool as sealed): a
process killed after sealing leaves a spool the next recorder saves (`sealed_spools`), and every append
goes through the dataset journal, so a kill during the save is rolled back. Appends to one dataset are
serialised across processes by `.<name>.save.lock` beside it.

What it is not: no resampling (recorder.py decides what goes into each frame), no ROS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from lrm_reward.durable_files import write_json_atomic
from lrm_reward.refinement.dataset_journal import DatasetJournal
from lrm_reward.refinement.feature_topics import IMAGE_KEY_PREFIX
from lrm_reward.refinement.recorder_config import REPO_PREFIX, SIDECAR_DIR

log = logging.getLogger(__name__)

JOB_FILE = "job.json"
ARRAYS_FILE = "job.npz"
_LOW_DISK_BYTES = 16 * 1024 * 1024
_ENCODER_QUEUE = 32  # frames buffered per camera for the streaming encoder


@dataclass
class SaveJob:
    """Everything needed to append one resampled episode (frame k = row k of every array)."""

    spool_dir: Path
    dataset_root: Path
    fps: int
    features: dict
    sidecar: dict  # written to recording/episode_XXXXXX.json; episode_index is the expected index
    task: str
    cameras: dict[str, list[int]]  # camera -> [H, W, 3] of its raw spool file <spool_dir>/<file>
    camera_files: dict[str, str]
    camera_counts: dict[str, int]  # frames in each raw spool file
    robot_type: str | None = None
    use_videos: bool = True
    image_writer_threads: int = 0
    video: dict = field(default_factory=dict)  # RGBEncoderConfig kwargs (vcodec, crf, preset)
    streaming_encoding: bool = True  # encode while adding frames (no PNG round trip)
    # per-frame selections, not in job.json (job.npz): "image:<camera>" -> (n,) frame index into the spool,
    # "vector:<feature key>" -> (n, d) float32 values
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    images: dict[str, np.ndarray] | None = field(default=None, repr=False)  # in-memory frames (no spool)

    @property
    def num_frames(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    @property
    def episode_index(self) -> int:
        return int(self.sidecar["episode_index"])

    def write(self) -> None:
        """Seal the job into its spool folder: arrays first, then job.json (the seal) atomically."""
        np.savez(self.spool_dir / ARRAYS_FILE, **self.arrays)
        data = {k: v for k, v in asdict(self).items() if k not in ("arrays", "images")}
        write_json_atomic(self.spool_dir / JOB_FILE, data)

    @classmethod
    def read(cls, spool_dir: Path) -> SaveJob:
        data = json.loads((Path(spool_dir) / JOB_FILE).read_text())
        data["spool_dir"] = Path(data["spool_dir"])
        data["dataset_root"] = Path(data["dataset_root"])
        with np.load(Path(spool_dir) / ARRAYS_FILE) as npz:
            data["arrays"] = {k: npz[k] for k in npz.files}
        return cls(**data)


def sealed_spools(spool_base: Path) -> list[Path]:
    """Spool folders of episodes that were sealed but never saved (oldest first)."""
    if not spool_base.exists():
        return []
    return sorted(p for p in spool_base.iterdir() if (p / JOB_FILE).exists())


# ---------------------------------------------------------------------------------------------- saving
def save_job(job: SaveJob) -> dict:
    """Append the episode to its dataset. Returns {status, message, episode_index, num_frames, partial,
    sidecar}; status "saved", "storage_error" or "failed". Never raises for a failed save."""
    root = job.dataset_root
    base = {"episode_index": job.episode_index, "num_frames": 0, "partial": False, "sidecar": None}
    try:
        with _save_lock(root):
            recovered = DatasetJournal(root).recover()  # a save killed earlier: roll it back first
            if recovered:
                log.warning(recovered)
            index = _already_saved(job)  # e.g. by a saver left over from a killed recorder
            if index is not None:
                return _saved(job, index, "(found already saved)")
            index = _total_episodes(root)
            job.sidecar["episode_index"] = index
            _append(job)
    except OSError as exc:
        reason = _storage_reason(exc, root.parent)
        return {
            **base,
            "status": "storage_error",
            "message": f"saving episode {job.episode_index} failed ({reason}); it was rolled back, "
            "earlier episodes are intact",
        }
    except Exception as exc:  # report any failure to the caller instead of crashing it
        return {**base, "status": "failed", "message": f"saving episode {job.episode_index} failed: {exc}"}
    return _saved(job, index)


def _saved(job: SaveJob, index: int, note: str = "") -> dict:
    partial = bool(job.sidecar.get("partial"))
    msg = f"saved episode {index} ({job.num_frames} frames) to {job.dataset_root.name}"
    if index != job.episode_index:
        msg += f" (announced as episode {job.episode_index}: an earlier save failed)"
    if partial:
        msg += f"; PARTIAL: {', '.join(g['stream'] for g in job.sidecar['dropouts'])} dropped out"
    if note:
        msg += f" {note}"
    return {
        "status": "saved",
        "message": msg,
        "episode_index": index,
        "num_frames": job.num_frames,
        "partial": partial,
        "sidecar": str(job.dataset_root / SIDECAR_DIR / f"episode_{index:06d}.json"),
    }


def _frames(job: SaveJob):
    images = {}
    for cam, shape in job.cameras.items():
        if job.images is not None:
            images[cam] = job.images[cam]
        else:
            images[cam] = np.memmap(
                job.spool_dir / job.camera_files[cam],
                dtype=np.uint8,
                mode="r",
                shape=(job.camera_counts[cam], *shape),
            )
    vectors = {k.split(":", 1)[1]: v for k, v in job.arrays.items() if k.startswith("vector:")}
    selections = {cam: job.arrays[f"image:{cam}"] for cam in job.cameras}
    for k in range(job.num_frames):
        frame: dict = {"task": job.task}
        for cam, arr in images.items():
            frame[IMAGE_KEY_PREFIX + cam] = np.asarray(arr[selections[cam][k]])
        for key, values in vectors.items():
            frame[key] = values[k]
        yield frame


def _append(job: SaveJob) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = job.dataset_root
    repo_id = f"{REPO_PREFIX}/{root.name}"
    encoder = _video_encoder(job)
    streaming = bool(job.use_videos and job.streaming_encoding)
    journal = DatasetJournal(root)
    journal.begin(note=f"episode {job.episode_index}")
    ds = None
    try:
        common = {
            "video_backend": "pyav",
            "image_writer_threads": job.image_writer_threads,
            "rgb_encoder": encoder,
            "streaming_encoding": streaming,
            "encoder_queue_maxsize": _ENCODER_QUEUE,
        }
        if (root / "meta" / "info.json").exists():
            ds = LeRobotDataset.resume(repo_id, root=root, **common)
            _check_features(root, ds.meta.features, job.features)
        else:
            ds = LeRobotDataset.create(
                repo_id,
                fps=job.fps,
                features=job.features,
                root=root,
                robot_type=job.robot_type,
                use_videos=job.use_videos,
                **common,
            )
        if ds.meta.total_episodes != job.episode_index:
            raise RuntimeError(
                f"dataset {root.name} has {ds.meta.total_episodes} episodes, expected {job.episode_index}"
            )
        for frame in _frames(job):
            if streaming:
                _wait_for_encoder(ds)
            ds.add_frame(frame)
        ds.save_episode(parallel_encoding=False)
        ds.finalize()
        write_json_atomic(root / SIDECAR_DIR / f"episode_{job.episode_index:06d}.json", job.sidecar)
    except BaseException:
        _neutralize(ds)
        journal.recover()
        raise
    journal.commit()


def _wait_for_encoder(ds) -> None:
    """lerobot's streaming encoder drops a frame when its queue is full: feed it at its own pace."""
    queues = getattr(getattr(ds.writer, "_streaming_encoder", None), "_frame_queues", None) or {}
    while any(q.qsize() >= _ENCODER_QUEUE - 2 for q in queues.values()):
        time.sleep(0.005)


def _video_encoder(job: SaveJob):
    if not job.use_videos:
        return None
    from lerobot.configs.video import RGBEncoderConfig

    return RGBEncoderConfig(**{k: v for k, v in job.video.items() if v is not None})


def _already_saved(job: SaveJob) -> int | None:
    """Index of the episode whose sidecar names this spool (the save committed, only the cleanup is
    missing), or None. Newest first: a duplicate can only be recent."""
    spool_id = job.sidecar.get("spool_id")
    for index in range(_total_episodes(job.dataset_root) - 1, -1, -1):
        side = job.dataset_root / SIDECAR_DIR / f"episode_{index:06d}.json"
        try:
            if json.loads(side.read_text()).get("spool_id") == spool_id:
                return index
        except (OSError, ValueError):
            continue
    return None


@contextlib.contextmanager
def _save_lock(root: Path):
    """One append at a time per dataset, across processes (a saver left over from a killed node included)."""
    path = root.parent / f".{root.name}.save.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def try_recover(root: Path) -> str | None:
    """Roll back an unfinished append now, unless a saver is busy with this dataset (then it will)."""
    path = root.parent / f".{root.name}.save.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        try:
            return DatasetJournal(root).recover()
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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
    writer = getattr(ds, "writer", None)
    streaming = getattr(writer, "_streaming_encoder", None)
    if streaming is not None:
        with contextlib.suppress(Exception):
            streaming.cancel_episode()
    with contextlib.suppress(Exception):
        ds.writer.close_writer()
    meta = getattr(ds, "meta", None)
    if meta is not None and getattr(meta, "_pq_writer", None) is not None:
        with contextlib.suppress(Exception):
            meta._pq_writer.close()  # its file is about to be deleted by the rollback
        meta._pq_writer = None
    if meta is not None:
        meta._metadata_buffer = []
    if writer is not None and getattr(writer, "image_writer", None) is not None:
        with contextlib.suppress(Exception):
            writer.image_writer.stop()
        writer.image_writer = None
    for obj in (ds, writer, meta):
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


# ---------------------------------------------------------------------------------------------- process
class SaverProcess:
    """A long-lived child process that saves sealed jobs one at a time, in submission order.

    `submit(spool_dir)` returns a Future of save_job's dict. The child is started at construction (it
    imports lerobot while the first episode records) and restarted on the next submit if it died; jobs
    in flight when it dies fail with status "failed" (their spools stay sealed for the next recorder).
    If this process is killed, the child finishes the job in hand and exits.
    """

    def __init__(self, nice: int = 5) -> None:
        self.nice = nice
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._next_id = 0
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._closing = False
        self._start()

    @property
    def busy(self) -> int:
        """Jobs submitted and not finished."""
        with self._lock:
            return len(self._pending)

    def _start(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        argv = [
            sys.executable,
            "-m",
            "lrm_reward.refinement.episode_saver",
            str(to_child_r),
            str(from_child_w),
        ]
        argv += [str(self.nice)]
        self._proc = subprocess.Popen(
            argv, pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._conn = Connection(from_child_r, writable=False)
        threading.Thread(target=self._read_results, args=(self._conn, self._proc), daemon=True).start()

    def submit(self, spool_dir: Path) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closing:
                raise RuntimeError("the saver process is closed")
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            job_id = self._next_id
            self._next_id += 1
            self._pending[job_id] = future
            try:
                self._send.send((job_id, str(spool_dir)))
            except OSError as exc:
                del self._pending[job_id]
                future.set_result(_died(f"the saver process is gone ({exc})"))
        return future

    def _read_results(self, conn: Connection, proc: subprocess.Popen) -> None:
        while True:
            try:
                job_id, result = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(job_id, None)
            if future is not None:
                future.set_result(result)
        proc.wait()
        with self._lock:
            lost = [f for f in self._pending.values()]
            self._pending.clear()
        for future in lost:
            future.set_result(_died(f"the saver process exited with code {proc.returncode}"))

    def close(self, timeout: float | None = None) -> bool:
        """Let the child finish the queued jobs, then stop it. False if it had to be killed."""
        with self._lock:
            self._closing = True
            proc = self._proc
        with contextlib.suppress(OSError):
            self._send.close()  # EOF: the child exits after its queue
        if proc is None:
            return True
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return False


def _died(message: str) -> dict:
    return {
        "status": "failed",
        "message": f"{message}; the episode stays sealed in the spool and is saved by the next start",
        "episode_index": -1,
        "num_frames": 0,
        "partial": False,
        "sidecar": None,
    }


def _child_main(read_fd: int, write_fd: int, nice: int) -> int:
    """The saver process: jobs in (job id, spool folder), results out, until EOF."""
    with contextlib.suppress(OSError):
        os.nice(nice)
    logging.basicConfig(level=logging.INFO, format="[episode_saver] %(message)s")
    jobs = Connection(read_fd, writable=False)
    results = Connection(write_fd, readable=False)
    import lerobot.datasets.lerobot_dataset  # noqa: F401 - import now, while the first episode records

    while True:
        try:
            job_id, spool = jobs.recv()
        except (EOFError, OSError):
            return 0
        started = time.monotonic()
        try:
            job = SaveJob.read(Path(spool))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            result = {**_died(""), "message": f"unreadable sealed spool {spool} removed: {exc}"}
        else:
            result = save_job(job)
        # saved, or failed for good (disk full, other features): the episode is done with either way
        shutil.rmtree(spool, ignore_errors=True)
        result["save_s"] = time.monotonic() - started
        log.info(f"{result['message']} in {result['save_s']:.1f} s")
        try:
            results.send((job_id, result))
        except OSError:
            return 0  # the recorder is gone; the dataset is complete either way


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))
