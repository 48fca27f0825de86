"""Latest-wins hand-off between frame callbacks and one worker thread.

One slot per stream: a callback puts a frame there and never waits; if the worker has not taken the
previous frame yet, that frame is replaced and handed back to the caller so it can be counted (and
answered some other way). The worker takes everything pending at once, so frames from several
streams go to the model in one batch. Not a queue: nothing older than the newest frame per stream is kept.
"""

from __future__ import annotations

import threading
import time


class LatestFrameSlots[T]:
    def __init__(self) -> None:
        self._slots: dict[str, T] = {}
        self._cond = threading.Condition()
        self._closed = False

    def put(self, stream: str, item: T) -> T | None:
        """Store item as the stream's pending frame; return the frame it replaced, if any."""
        with self._cond:
            replaced = self._slots.get(stream)
            self._slots[stream] = item
            self._cond.notify()
            return replaced

    def take_all(
        self, timeout_s: float | None = None, gather_s: float = 0.0, expected: int = 1
    ) -> dict[str, T]:
        """Wait until a frame is pending (or timeout, or close) and take every pending frame.

        With gather_s > 0, once the first frame is there wait up to gather_s more for frames of the other
        streams (until `expected` slots are full), so streams whose frames are due together share one batch.
        """
        with self._cond:
            if not self._slots and not self._closed:
                self._cond.wait(timeout_s)
            if self._slots and gather_s > 0:
                deadline = time.monotonic() + gather_s
                while len(self._slots) < expected and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            taken, self._slots = self._slots, {}
            return taken

    def take(self, stream: str) -> T | None:
        """Take one stream's pending frame, if any, without waiting."""
        with self._cond:
            return self._slots.pop(stream, None)

    def drain(self) -> dict[str, T]:
        """Take every pending frame without waiting (on shutdown, to answer them)."""
        with self._cond:
            taken, self._slots = self._slots, {}
            return taken

    def close(self) -> None:
        """Wake the worker for good: take_all no longer waits."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._slots)
