"""Cheap capture buffers for one episode: camera frames spooled raw to disk, small vectors kept in memory.

What it is for: the recorder's callbacks only append here (a list append and a queue put); a spool thread
writes raw image bytes to one file per camera, so nothing is encoded while the robot runs and a long
episode does not have to fit in RAM. At episode end the frames are read back through a memmap.

What it is not: no resampling, no dataset writing (recorder.py does that).
"""

from __future__ import annotations

import errno
import queue
import threading
from pathlib import Path

import numpy as np

_STOP = object()


class SpoolStorageError(OSError):
    """Writing the raw spool failed (most often ENOSPC: the disk is full)."""


class CameraSpool:
    """Frames of one camera, in arrival order, with their stamps.

    spool_dir None keeps the frames in memory (tests, short episodes); otherwise a thread appends raw
    HxWx3 uint8 bytes to `<spool_dir>/<name>.raw`.
    """

    def __init__(self, name: str, spool_dir: Path | None) -> None:
        self.name = name
        self.stamps: list[float] = []
        self.shape: tuple[int, int, int] | None = None
        self.rejected = 0  # frames with a shape/dtype that does not match the first frame
        self._frames: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._error: OSError | None = None
        self.file_name = f"{_safe_file_name(name)}.raw"  # inside the spool folder
        self._path = None if spool_dir is None else spool_dir / self.file_name
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        if self._path is not None:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._path, "wb")  # noqa: SIM115 - closed by the spool thread
            self._queue = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._drain, name=f"spool-{name}", daemon=True)
            self._thread.start()

    @property
    def error(self) -> OSError | None:
        return self._error

    def append(self, stamp_s: float, image: np.ndarray) -> None:
        """Keep one frame. Raises ValueError for a bad frame and SpoolStorageError once the disk failed.

        The spool keeps a reference: the caller must not modify the array afterwards.
        """
        if self._error is not None:
            raise SpoolStorageError(self._error.errno, f"camera {self.name!r}: {self._error.strerror}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            self.rejected += 1
            raise ValueError(
                f"camera {self.name!r}: expected an HxWx3 uint8 RGB frame, got {image.dtype} {image.shape}"
            )
        with self._lock:
            if self.shape is None:
                self.shape = tuple(image.shape)  # type: ignore[assignment]
            elif image.shape != self.shape:
                self.rejected += 1
                raise ValueError(
                    f"camera {self.name!r}: frame size changed from {self.shape} to {image.shape} mid-episode"
                )
            self.stamps.append(float(stamp_s))
            if self._queue is None:
                self._frames.append(image)
            else:
                self._queue.put(image)

    def _drain(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                break
            if self._error is not None:
                continue  # keep draining so finish() returns; the frames are lost anyway
            try:
                self._file.write(np.ascontiguousarray(item).data)
            except OSError as exc:
                self._error = exc
        try:
            self._file.close()
        except OSError as exc:
            self._error = self._error or exc

    def finish(self) -> np.ndarray:
        """Stop the spool thread and return all frames as an (N, H, W, 3) array (a memmap when spooled)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise SpoolStorageError(
                self._error.errno or errno.EIO, f"camera {self.name!r} spool failed: {self._error.strerror}"
            )
        if not self.stamps or self.shape is None:
            return np.zeros((0, 1, 1, 3), np.uint8)
        if self._path is None:
            return np.stack(self._frames)
        return np.memmap(self._path, dtype=np.uint8, mode="r", shape=(len(self.stamps), *self.shape))

    def abandon(self) -> None:
        """Stop the thread without reading back (discarded or failed episode)."""
        if self._thread is not None and self._queue is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        self._frames.clear()


class VectorLog:
    """Timestamped fixed-length float vectors (joint states, actions, rewards), kept in memory."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stamps: list[float] = []
        self.values: list[np.ndarray] = []
        self._lock = threading.Lock()

    def append(self, stamp_s: float, values: np.ndarray) -> None:
        with self._lock:
            self.stamps.append(float(stamp_s))
            self.values.append(values)

    def __len__(self) -> int:
        return len(self.stamps)

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(stamps (N,), values (N, dim)) sorted by stamp (stable for equal stamps)."""
        with self._lock:
            stamps = np.asarray(self.stamps, dtype=np.float64)
            values = np.asarray(self.values, dtype=np.float32).reshape(len(self.values), dim)
        order = np.argsort(stamps, kind="stable")
        return stamps[order], values[order]


def _safe_file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "camera"
