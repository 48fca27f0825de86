"""The logits fast path (prefix KV reuse + candidates in the prompt's pass) against the plain path.

Numerics on tiny models in float32 and bfloat16 (CPU), cache hits/misses/evictions, that the vision tower
encodes only the new frame on a hit, that a cached prefix is never reused for another initial frame, task or
adapter, and that a failing fast path falls back to the plain one.
"""

import numpy as np
import pytest
import torch

from lrm_reward.core import fast_readout, readouts, tiny_model
from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.fast_readout import FastLogitsReadout, mrope_positions, split_prompt
from lrm_reward.core.prefix_cache import PrefixCache
from lrm_reward.core.types import Modality, Query

P, C, K = Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION
TASKS = ("open the top drawer", "stack the green block on the red block and then push it to the back")
frame = tiny_model.synthetic_frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _adapters(tiny):
    return {name: str(path) for name, path in tiny.adapters.items()}


def _engine(tiny, **kwargs):
    return make_engine(EngineConfig(str(tiny.base), _adapters(tiny), **kwargs))


def _episode_queries(rng):
    """Three streams: two share a task, each has its own initial frame; mixed frame sizes and modalities."""
    initials = [frame(0.0, rng), frame(0.05, rng), frame(1.0, rng, (48, 64))]
    tasks = [TASKS[0], TASKS[0], TASKS[1]]
    queries = []
    for level, size in ((0.2, (64, 64)), (0.5, (48, 80)), (0.9, (64, 64))):
        for initial, task in zip(initials, tasks, strict=True):
            current = frame(level, rng, size)
            queries.append(Query(P, task, [initial, current]))
            queries.append(Query(K, task, [current]))
    queries.append(Query(C, TASKS[1], [frame(0.3, rng), frame(0.7, rng)]))
    queries.append(Query(P, TASKS[0], [frame(0.6, rng)]))  # progress without an initial frame
    return queries


def _argmax(answer):
    return max(answer.probabilities, key=answer.probabilities.get)


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "one-pass"])
@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-4), ("bfloat16", 0.02)])
def test_fast_path_matches_plain_path(tiny_lrm, dtype, tolerance, prefix_cache):
    queries = _episode_queries(np.random.default_rng(0))
    with _engine(tiny_lrm, dtype=dtype, fast_path=False) as plain:
        reference = plain.score(queries)
    with _engine(tiny_lrm, dtype=dtype, prefix_cache=prefix_cache, max_batch_size=4) as fast:
        first = fast.score(queries)  # fills the cache (batches mix hits, misses and prefix lengths)
        misses = fast.stats.prefix_cache_misses
        again = fast.score(queries)  # every prefix is a hit now
        alone = [fast.score([q])[0] for q in queries[:4]]  # batch of one
        stats = fast.stats
    assert all(a.parsed for a in reference)
    for answers in (first, again, alone):
        diffs = [abs(a.value - b.value) for a, b in zip(answers, reference, strict=False)]
        assert max(diffs) <= tolerance, (dtype, max(diffs))
        for a, b in zip(answers, reference, strict=False):
            assert _argmax(a) == _argmax(b)
    assert stats.fast_path_fallbacks == 0
    if prefix_cache:
        # progress: 3 initial frames + 1 without; completion: 2 tasks (text only); contrastive: 1
        assert misses == stats.prefix_cache_misses == 7
        assert stats.prefix_cache_hits > 0
    else:
        assert stats.prefix_cache_hits == stats.prefix_cache_misses == 0


def test_mrope_positions_match_the_model_and_shift_with_the_prefix(tiny_lrm):
    with _engine(tiny_lrm) as engine:
        processor = engine._loaded.processor
        inner = engine.model.get_base_model().model  # Qwen3VLModel
        rng = np.random.default_rng(1)
        query = Query(P, TASKS[1], [frame(0.0, rng, (48, 96)), frame(0.5, rng, (80, 48))])
        full = readouts.prompt_text(processor, query, 2000) + '{ "completion_progress": '
        inputs = processor(text=[full], images=query.images, return_tensors="pt")
        expected, _ = inner.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
        )
        ids = inputs["input_ids"][0].numpy()
        image_id = engine.model.get_base_model().config.image_token_id
        grids = inputs["image_grid_thw"].tolist()
        mine, _ = mrope_positions(ids, image_id, grids, 2, 0)
        assert np.array_equal(mine, expected[:, 0].numpy())

        # the suffix alone, shifted by the prefix's next position, continues the whole prompt exactly
        parts = split_prompt(full, query.images, 1)
        prefix_ids = processor(text=[parts.prefix_text], images=list(parts.prefix_images))["input_ids"][0]
        _, following = mrope_positions(np.asarray(prefix_ids), image_id, grids[:1], 2, 0)
        suffix_ids = processor(text=[parts.suffix_text], images=list(parts.suffix_images))["input_ids"][0]
        shifted, _ = mrope_positions(np.asarray(suffix_ids), image_id, grids[1:], 2, following)
        assert np.array_equal(shifted, mine[:, len(prefix_ids) :])


def test_prompt_is_cut_before_the_first_per_query_image(tiny_lrm):
    rng = np.random.default_rng(2)
    initial, current = frame(0.0, rng), frame(0.5, rng)
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    full = f"head {block} mid {block} tail"
    parts = split_prompt(full, [initial, current], 1)
    assert parts.prefix_text == f"head {block} mid "
    assert parts.suffix_text.startswith("<|vision_start|>") and parts.suffix_text.endswith(" tail")
    assert parts.prefix_images[0] is initial and parts.suffix_images[0] is current
    assert split_prompt(full, [initial, current], 0).prefix_text == "head "
    with pytest.raises(fast_readout.FastPathUnavailable):
        split_prompt("no images here", [current], 0)
    assert fast_readout.episode_images(P, 2) == 1
    assert fast_readout.episode_images(P, 1) == fast_readout.episode_images(C, 2) == 0
    assert fast_readout.episode_images(K, 1) == 0


def _encoded_grids(model):
    """Record the grids the vision tower is asked to encode."""
    seen = []

    def hook(module, args, kwargs):
        seen.extend(tuple(g) for g in kwargs["grid_thw"].tolist())

    visual = model.get_base_model().model.visual
    return seen, visual.register_forward_pre_hook(hook, with_kwargs=True)


def test_vision_tower_encodes_only_the_new_frame_on_a_hit(tiny_lrm):
    rng = np.random.default_rng(3)
    initial = frame(0.0, rng, (96, 128))  # its own grid size, so it is recognisable
    with _engine(tiny_lrm) as engine:
        seen, handle = _encoded_grids(engine.model)
        try:
            engine.score([Query(P, TASKS[0], [initial, frame(0.3, rng)])])  # miss
            initial_grid = seen[0]
            seen.clear()
            engine.score([Query(P, TASKS[0], [initial, frame(0.6, rng)]) for _ in range(3)])  # hits
        finally:
            handle.remove()
        # one lookup per distinct prefix in a batch: the three queries share one hit
        assert engine.stats.prefix_cache_hits == 1 and engine.stats.prefix_cache_misses == 1
    assert initial_grid not in seen
    assert len(seen) == 3  # one new frame per query, nothing else


def test_another_initial_frame_task_or_adapter_never_reuses_a_cache(tiny_lrm):
    rng = np.random.default_rng(4)
    dark, bright, current = frame(0.0, rng), frame(1.0, rng), frame(0.5, rng)
    one_pixel = dark.copy()
    one_pixel[5, 5, 0] ^= 1
    cases = [
        Query(P, TASKS[0], [dark, current]),
        Query(P, TASKS[0], [bright, current]),  # another initial frame
        Query(P, TASKS[1], [dark, current]),  # another task
        Query(P, TASKS[0], [one_pixel, current]),  # one pixel off
    ]
    with _engine(tiny_lrm, fast_path=False) as plain:
        reference = [plain.score([q])[0].value for q in cases]
    # reusing the first prefix for the second or third query would give a different answer (float32: the
    # fast path matches the plain one to ~1e-7, so 2e-6 agreement tells them apart)
    assert abs(reference[1] - reference[0]) > 1e-4 and abs(reference[2] - reference[0]) > 1e-4
    with _engine(tiny_lrm) as engine:
        for expected_misses, (query, value) in enumerate(zip(cases, reference, strict=True), start=1):
            assert engine.score([query])[0].value == pytest.approx(value, abs=2e-6)
            assert engine.stats.prefix_cache_misses == expected_misses
            assert engine.stats.prefix_cache_hits == 0

        # adapters: the same completion prompt prefilled under another adapter is another cache entry
        loaded = engine._loaded
        readout = FastLogitsReadout(
            loaded.model, loaded.processor, loaded.device, 2000, PrefixCache(8, 1 << 30)
        )
        query = Query(K, TASKS[0], [current])
        values = {}
        for adapter in ("completion", "contrastive", "completion"):
            loaded.model.set_adapter(adapter)
            values.setdefault(adapter, []).append(readout.score([query], engine._tries[K], adapter)[0].value)
            plain_value = readouts.score_answer_sets(
                loaded.model, loaded.processor, [query], engine._tries[K], loaded.device, 2000
            )[0].value
            assert values[adapter][-1] == pytest.approx(plain_value, abs=2e-6)
        engine._active_adapter = "completion"
        assert abs(values["completion"][0] - values["contrastive"][0]) > 1e-4  # the adapters differ
        stats = readout.cache.stats()
        assert (stats.misses, stats.hits) == (2, 1)


def test_cached_prefixes_are_not_changed_by_queries(tiny_lrm):
    rng = np.random.default_rng(5)
    initial = frame(0.0, rng)
    with _engine(tiny_lrm) as engine:
        engine.score([Query(P, TASKS[0], [initial, frame(0.2, rng)])])
        cache = engine.prefix_cache
        ((entry, _),) = cache._entries.values()
        before = entry.kv.clone()
        engine.score([Query(P, TASKS[0], [initial, frame(level, rng)]) for level in (0.4, 0.8)])
        engine.score([Query(P, TASKS[0], [initial, frame(0.9, rng)])])
        assert torch.equal(entry.kv, before)


def test_lru_eviction_keeps_answers_right(tiny_lrm):
    rng = np.random.default_rng(6)
    initials = [frame(level, rng) for level in (0.0, 0.05, 0.1)]
    queries = [Query(P, TASKS[0], [initial, frame(0.5, rng)]) for initial in initials]
    with _engine(tiny_lrm, fast_path=False) as plain:
        reference = [plain.score([q])[0].value for q in queries]
    with _engine(tiny_lrm, prefix_cache_entries=2) as engine:
        for _ in range(2):
            for query, value in zip(queries, reference, strict=True):
                assert engine.score([query])[0].value == pytest.approx(value, abs=1e-5)
        assert len(engine.prefix_cache) == 2
        assert engine.stats.prefix_cache_evictions == 4  # round robin over 3 episodes with room for 2
        assert engine.stats.prefix_cache_hits == 0


def test_a_failing_fast_path_falls_back_then_turns_off(tiny_lrm, monkeypatch):
    queries = _episode_queries(np.random.default_rng(7))[:4]
    with _engine(tiny_lrm, fast_path=False) as plain:
        reference = [a.value for a in plain.score(queries)]

    def broken(self, *args, **kwargs):
        raise RuntimeError("injected fast-path failure")

    with _engine(tiny_lrm) as engine:
        monkeypatch.setattr(FastLogitsReadout, "_suffix_pass", broken)
        for _ in range(3):
            answers = engine.score(queries)
            assert [a.value for a in answers] == pytest.approx(reference, abs=1e-5)
            assert engine.stats.errors == 0
        assert engine.stats.fast_path_fallbacks >= 3
        assert engine._fast is None  # turned off after three failures in a row
        assert [a.value for a in engine.score(queries)] == pytest.approx(reference, abs=1e-5)
