"""The prefix cache: content-addressed keys and a bounded LRU (no model needed)."""

import numpy as np
import pytest

from lrm_reward.core.prefix_cache import PrefixCache, prefix_key


def _frame(seed=0, shape=(48, 64, 3)):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def test_key_is_stable_for_equal_content():
    frame = _frame()
    assert prefix_key("progress", "task A", [frame]) == prefix_key("progress", "task A", [frame.copy()])
    # a non-contiguous view with the same pixels is the same content
    flipped = frame[:, ::-1]
    assert prefix_key("progress", "t", [flipped]) == prefix_key(
        "progress", "t", [np.ascontiguousarray(flipped)]
    )


def test_key_changes_with_anything_that_changes_the_prefix():
    frame = _frame()
    base = prefix_key("progress", "task A", [frame])
    one_pixel = frame.copy()
    one_pixel[10, 20, 1] ^= 1
    reshaped = frame.reshape(64, 48, 3)  # same bytes, another image
    as_int16 = frame.astype(np.int16)
    others = {
        "adapter": prefix_key("completion", "task A", [frame]),
        "no adapter": prefix_key(None, "task A", [frame]),
        "task": prefix_key("progress", "task B", [frame]),
        "one pixel": prefix_key("progress", "task A", [one_pixel]),
        "shape": prefix_key("progress", "task A", [reshaped]),
        "dtype": prefix_key("progress", "task A", [as_int16]),
        "no image": prefix_key("progress", "task A", []),
        "two images": prefix_key("progress", "task A", [frame, frame]),
    }
    assert base not in others.values()
    assert len(set(others.values())) == len(others)
    # field boundaries matter: moving text between adapter and prompt is another key
    assert prefix_key("ab", "c", []) != prefix_key("a", "bc", [])


def test_hits_misses_and_lru_eviction_by_count():
    cache = PrefixCache(max_entries=2, max_bytes=1000)
    assert cache.get("a") is None
    cache.put("a", "A", 10)
    cache.put("b", "B", 10)
    assert cache.get("a") == "A"  # a is now the most recently used
    cache.put("c", "C", 10)  # evicts b, the least recently used
    assert "b" not in cache and cache.get("a") == "A" and cache.get("c") == "C"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (3, 1, 1, 2, 20)


def test_eviction_by_bytes_and_too_big_entries():
    cache = PrefixCache(max_entries=10, max_bytes=100)
    cache.put("a", "A", 40)
    cache.put("b", "B", 40)
    cache.put("c", "C", 40)  # 120 > 100: a goes
    assert "a" not in cache and len(cache) == 2 and cache.nbytes == 80
    assert not cache.put("huge", "H", 101)  # larger than the whole budget: not stored, nothing evicted
    assert "huge" not in cache and len(cache) == 2
    assert cache.stats().rejected == 1


def test_replacing_a_key_keeps_the_byte_count_right():
    cache = PrefixCache(max_entries=4, max_bytes=100)
    cache.put("a", "A1", 30)
    cache.put("a", "A2", 50)
    assert cache.get("a") == "A2" and cache.nbytes == 50 and len(cache) == 1
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


@pytest.mark.parametrize("kwargs", [dict(max_entries=0, max_bytes=1), dict(max_entries=1, max_bytes=0)])
def test_bounds_are_validated(kwargs):
    with pytest.raises(ValueError):
        PrefixCache(**kwargs)
