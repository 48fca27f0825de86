"""Approximate-time pairing of frames from several cameras, latest set first.

The reward node can score several cameras as one fused view; their frames arrive separately with
slightly different stamps. ``ApproximateTimePairer`` buffers a few frames per stream and emits, as soon
as it exists, the newest set holding one frame per stream whose stamps lie within ``slop_s`` of each
other. Frames older than an emitted set, and frames pushed out of a full buffer, can never be paired
any more: they are dropped and counted per stream.

It stands in for message_filters' ApproximateTimeSynchronizer (no wheel of it here) but is simpler:
it prefers the newest complete set over the globally tightest one, which is what a live reward wants.
Not thread-safe, no ROS, no clock: stamps come from the caller.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class PairedFrames:
    """One frame per stream, stamps within the slop."""

    stamps: dict[str, float]  # stream -> stamp of its frame
    items: dict[str, Any]  # stream -> the object pushed with that stamp (an image, a message, ...)

    @property
    def stamp_s(self) -> float:
        """The newest stamp of the set: the moment all views had been seen."""
        return max(self.stamps.values())

    @property
    def spread_s(self) -> float:
        return max(self.stamps.values()) - min(self.stamps.values())


class ApproximateTimePairer:
    """Pairs frames from N named streams whose stamps are within ``slop_s`` seconds.

    ``push`` returns a ``PairedFrames`` when the new frame completes a set, else None. ``dropped`` counts,
    per stream, frames that were never part of an emitted set; ``paired`` counts emitted sets.
    """

    def __init__(self, streams: Sequence[str], slop_s: float, queue_size: int = 5) -> None:
        names = list(streams)
        if not names:
            raise ValueError("ApproximateTimePairer needs at least one stream")
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        if not (isinstance(slop_s, (int, float)) and math.isfinite(slop_s) and slop_s >= 0):
            raise ValueError(f"slop_s must be a finite number >= 0, got {slop_s!r}")
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.streams = tuple(names)
        self.slop_s = float(slop_s)
        self.queue_size = queue_size
        self.dropped = {name: 0 for name in self.streams}
        self.paired = 0
        # Per stream: stamps sorted ascending, with their items alongside.
        self._stamps: dict[str, list[float]] = {name: [] for name in self.streams}
        self._items: dict[str, list[Any]] = {name: [] for name in self.streams}

    def pending(self) -> dict[str, int]:
        """Frames buffered per stream, waiting for partners."""
        return {name: len(stamps) for name, stamps in self._stamps.items()}

    def reset(self) -> None:
        """Drop every buffered frame (counted), e.g. when the episode restarts."""
        for name in self.streams:
            self._drop_oldest(name, len(self._stamps[name]))

    def push(self, stream: str, stamp_s: float, item: Any) -> PairedFrames | None:
        """Add a frame; return the newest complete set if this frame made one."""
        if stream not in self._stamps:
            raise ValueError(f"unknown stream {stream!r}; expected one of {list(self.streams)}")
        if not (isinstance(stamp_s, (int, float)) and math.isfinite(stamp_s)):
            raise ValueError(f"stamp_s must be a finite number of seconds, got {stamp_s!r}")
        stamps = self._stamps[stream]
        at = bisect.bisect_right(stamps, stamp_s)
        stamps.insert(at, float(stamp_s))
        self._items[stream].insert(at, item)
        if len(stamps) > self.queue_size:
            self._drop_oldest(stream, len(stamps) - self.queue_size)
        return self._take_newest_set()

    def _take_newest_set(self) -> PairedFrames | None:
        if any(not stamps for stamps in self._stamps.values()):
            return None
        # Try each buffered stamp as the newest member of a set, newest first; every other stream must
        # then have a frame in [pivot - slop, pivot]. The first pivot that works gives the newest set.
        pivots = sorted({s for stamps in self._stamps.values() for s in stamps}, reverse=True)
        for pivot in pivots:
            chosen: dict[str, int] = {}
            for name, stamps in self._stamps.items():
                index = bisect.bisect_right(stamps, pivot) - 1
                if index < 0 or stamps[index] < pivot - self.slop_s:
                    break
                chosen[name] = index
            else:
                return self._emit(chosen)
        return None

    def _emit(self, chosen: dict[str, int]) -> PairedFrames:
        stamps: dict[str, float] = {}
        items: dict[str, Any] = {}
        for name, index in chosen.items():
            # Older frames of this stream can only pair with sets older than this one: drop them.
            self._drop_oldest(name, index)
            stamps[name] = self._stamps[name].pop(0)
            items[name] = self._items[name].pop(0)
        self.paired += 1
        return PairedFrames(stamps=stamps, items=items)

    def _drop_oldest(self, stream: str, count: int) -> None:
        if count <= 0:
            return
        del self._stamps[stream][:count]
        del self._items[stream][:count]
        self.dropped[stream] += count
