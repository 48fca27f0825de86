"""A bounded LRU store of per-episode prompt-prefix KV caches, keyed by what the prefix contains.

What this is for: every progress query of an episode starts with the same tokens (chat header, task text
and the episode's initial frame), and so does every completion query (header and task). The logits fast
path (``fast_readout.py``) runs that prefix through the model once per (episode, adapter), keeps its
keys/values here, and afterwards prefills only the new frame and the answer prefix.

The key is content-addressed: a hash of the adapter name, the exact prefix text (template + task) and the
bytes, shape and dtype of every image in the prefix. Callers need no episode ids: a new episode (new initial
frame), another task text, another template or another adapter is another key, so a wrong cache can never
be reused. Bounded by entry count and by bytes; the least recently used entries go first.

What it is not: no model calls and no tensors of its own (it stores whatever entry object it is given, with
the byte size the caller states). Not thread-safe: the engine calls it under its lock.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def prefix_key(adapter: str | None, prefix_text: str, images: Sequence[np.ndarray]) -> str:
    """Content hash of everything that determines a prefix's KV cache (the model itself aside)."""
    digest = hashlib.sha256()
    # length-prefixed fields, so no two different field lists can hash the same byte stream
    for field in (str(adapter).encode(), prefix_text.encode()):
        digest.update(len(field).to_bytes(8, "little"))
        digest.update(field)
    digest.update(len(images).to_bytes(8, "little"))
    for image in images:
        array = np.ascontiguousarray(image)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


@dataclass
class PrefixCacheStats:
    """Counters for diagnostics and the benchmark."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0  # entries larger than the whole byte budget: used once, never stored
    entries: int = 0
    bytes: int = 0


class PrefixCache:
    """LRU map key -> entry, bounded by max_entries and max_bytes (sizes as stated by put())."""

    def __init__(self, max_entries: int, max_bytes: int):
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an int >= 1, got {max_entries!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Any | None:
        """The entry for key (now most recently used), or None; counts a hit or a miss."""
        found = self._entries.get(key)
        if found is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return found[0]

    def put(self, key: str, entry: Any, nbytes: int) -> bool:
        """Store entry (replacing one under the same key), evicting LRU entries to fit; False if too big."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes > self.max_bytes:
            self._stats.rejected += 1
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        while self._entries and (
            len(self._entries) >= self.max_entries or self._bytes + nbytes > self.max_bytes
        ):
            _, (_, evicted_bytes) = self._entries.popitem(last=False)
            self._bytes -= evicted_bytes
            self._stats.evictions += 1
        self._entries[key] = (entry, nbytes)
        self._bytes += nbytes
        return True

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            hits=self._stats.hits,
            misses=self._stats.misses,
            evictions=self._stats.evictions,
            rejected=self._stats.rejected,
            entries=len(self._entries),
            bytes=self._bytes,
        )
