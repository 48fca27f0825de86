"""The static suffix pass's vision tower (core/static_vision.py) against transformers' tower (tiny model).

Same image embeddings and DeepStack features for one and several images of one size, for the progress
adapter's own copy of the tower and for the base tower the other adapters use; images of several sizes are
left to transformers; a failure turns it off and the fast path still answers the same. (The CUDA-graph
capture of the tower needs a CUDA device: the CPU runs the same padded pass uncaptured -- 3 images run
as 4, 9 images, beyond the capture limit, unpadded.)
"""

import numpy as np
import pytest
import torch
from tiny_engines import tiny_engine

from lrm_reward.core import compiled_suffix, static_vision, tiny_model
from lrm_reward.core.fast_readout import _image_features
from lrm_reward.core.types import Modality, Query

P, K = Modality.PROGRESS, Modality.COMPLETION
frame = tiny_model.synthetic_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pixels(engine, images):
    """Processor outputs for `images` (one image part each) and their grids, as the fast path encodes them."""
    fast = engine._fast
    texts = ["<|vision_start|><|image_pad|><|vision_end|>"] * len(images)
    inputs = fast._encode(texts, images)
    return inputs, fast._grids(inputs, [1] * len(images))


@pytest.mark.parametrize("adapter", ["progress", "completion"])
@pytest.mark.parametrize("count", [1, 3, 9])
def test_same_features_as_transformers_tower(tiny_lrm, adapter, count):
    rng = np.random.default_rng(count)
    images = [frame(level, rng) for level in np.linspace(0.1, 0.9, count)]
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        engine._loaded.model.set_adapter(adapter)
        fast = engine._fast
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        with torch.inference_mode():
            expected, expected_features = _image_features(
                fast._inner, inputs["pixel_values"], inputs["image_grid_thw"]
            )
            found = fast.vision(inputs["pixel_values"], flat)
            assert found is not None and fast.vision.active, fast.vision.disabled_reason
            embeds, features = found
            padded = {key[2] for key in fast.vision._graphs}
    assert padded == ({compiled_suffix.padded_batch(count)} if count <= 8 else set())
    assert embeds.shape == expected.shape
    assert torch.allclose(embeds, expected, atol=1e-5, rtol=1e-4), (embeds - expected).abs().max()
    assert len(features) == len(expected_features) > 0
    for mine, theirs in zip(features, expected_features, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4), (mine - theirs).abs().max()


def test_progress_uses_its_own_tower_copy(tiny_lrm):
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        visual = engine._fast._inner.visual
        engine._loaded.model.set_adapter("progress")
        progress = static_vision.active_tower(visual)
        engine._loaded.model.set_adapter("completion")
        completion = static_vision.active_tower(visual)
    assert progress is not completion
    assert progress is visual.modules_to_save["progress"] and completion is visual.original_module


def test_graphs_are_kept_per_adapter_and_other_attention_is_left_to_transformers(tiny_lrm):
    rng = np.random.default_rng(5)
    images = [frame(0.3, rng), frame(0.6, rng)]
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        vision = engine._fast.vision
        with torch.inference_mode():
            for adapter in ("contrastive", "completion"):  # both run the base tower
                engine._loaded.model.set_adapter(adapter)
                assert vision(inputs["pixel_values"], flat, adapter) is not None
        assert sorted(key[0] for key in vision._graphs) == ["completion", "contrastive"]
        assert len({key[1] for key in vision._graphs}) == 1
    with tiny_engine(tiny_lrm, compile="cuda-graphs", attn_implementation="eager") as engine:
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        with torch.inference_mode():
            assert engine._fast.vision(inputs["pixel_values"], flat, "progress") is None
        assert engine._fast.vision.active and engine._fast.vision.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_captured_tower_replays_new_pixels_for_both_towers(tiny_lrm):
    rng = np.random.default_rng(6)
    with tiny_engine(tiny_lrm, compile="cuda-graphs", device="cuda", dtype="float32") as engine:
        fast = engine._fast
        for count in (4, 3, 4):  # 3 after 4: the padded slot holds stale pixels
            for adapter in ("progress", "completion", "progress"):
                engine._loaded.model.set_adapter(adapter)
                images = [frame(float(level), rng) for level in rng.random(count)]
                inputs, grids = _pixels(engine, images)
                flat = [grid for row in grids for grid in row]
                with torch.inference_mode():
                    expected, _ = _image_features(
                        fast._inner, inputs["pixel_values"], inputs["image_grid_thw"]
                    )
                    embeds, _ = fast.vision(inputs["pixel_values"], flat, adapter)
                assert torch.allclose(embeds, expected, atol=1e-4, rtol=1e-3)
        assert fast.vision.active and len(fast.vision._graphs) == 2  # (progress, base) x size class 4


def test_images_of_several_sizes_are_left_to_transformers(tiny_lrm):
    rng = np.random.default_rng(0)
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        inputs, grids = _pixels(engine, [frame(0.2, rng, (48, 160)), frame(0.7, rng, (160, 48))])
        flat = [grid for row in grids for grid in row]
        assert flat[0] != flat[1]
        assert engine._fast.vision(inputs["pixel_values"], flat) is None
        assert engine._fast.vision.active and engine._fast.vision.calls == 0
    assert static_vision.uniform_grid([]) is None
    assert static_vision.uniform_grid([(2, 4, 4)]) is None  # video frames
    assert static_vision.uniform_grid([(1, 4, 6), (1, 4, 6)]) == (1, 4, 6)


def _stream_queries(rng, rows):
    initial = frame(0.0, rng)
    queries = []
    for level in np.linspace(0.2, 0.9, rows):
        current = frame(float(level), rng)
        queries += [Query(P, "open the drawer", [initial, current]), Query(K, "open the drawer", [current])]
    return queries


def test_static_pass_answers_as_the_one_call_fast_path_with_static_inputs(tiny_lrm):
    queries = _stream_queries(np.random.default_rng(3), 3)
    with tiny_engine(tiny_lrm, max_batch_size=3) as eager:
        reference = eager.score(queries)
    with tiny_engine(tiny_lrm, max_batch_size=3, compile="cuda-graphs") as static:
        answers = static.score(queries)
        again = static.score(queries)  # the suffixes' text tensors are reused (core/suffix_tokens.py)
        vision, tokens = static._fast.vision, static._fast.suffix_tokens
        assert vision.active and vision.calls >= 4  # progress and completion batches went through it
        assert tokens.active and tokens.hits >= 2
    for found in (answers, again):
        diff = max(abs(a.value - b.value) for a, b in zip(found, reference, strict=True))
        assert diff <= 1e-4, diff


def test_a_failing_static_tower_turns_off_and_transformers_answers(tiny_lrm, monkeypatch, caplog):
    queries = _stream_queries(np.random.default_rng(4), 2)
    with tiny_engine(tiny_lrm, max_batch_size=2) as eager:
        reference = eager.score(queries)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(static_vision.StaticVisionTower, "_forward", broken)
    with tiny_engine(tiny_lrm, max_batch_size=2, compile="cuda-graphs") as static:
        answers = static.score(queries)
        vision = static._fast.vision
        assert not vision.active and vision.failures == 1 and "boom" in vision.disabled_reason
        assert static.stats.compile_failures == 0  # the decoder's static pass stayed on
    assert "static vision tower turned off" in caplog.text
    diff = max(abs(a.value - b.value) for a, b in zip(answers, reference, strict=True))
    assert diff <= 1e-4, diff
