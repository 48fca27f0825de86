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


def test_adapters_share_the_base_towers_graphs_unless_they_adapt_it(tiny_lrm):
    from peft import LoraConfig, inject_adapter_in_model

    rng = np.random.default_rng(5)
    images = [frame(0.3, rng), frame(0.6, rng)]
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        vision = engine._fast.vision
        with torch.inference_mode():
            for adapter in ("contrastive", "completion", "progress"):
                engine._loaded.model.set_adapter(adapter)
                assert vision(inputs["pixel_values"], flat, adapter) is not None
        # contrastive and completion run the same base tower (their LoRA is on the language model only):
        # one graph per tower, whatever the adapter
        assert [key[0] for key in vision._graphs] == [None, None]
        assert len({key[1] for key in vision._graphs}) == 2  # the base tower and progress's copy
    # a tower with adapter layers of its own computes something else per adapter: keyed per adapter
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapted = inject_adapter_in_model(
        LoraConfig(r=2, target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(4, 4))
    )
    assert not vision._has_tuner_layers(plain) and vision._has_tuner_layers(adapted)
    with tiny_engine(tiny_lrm, compile="cuda-graphs", attn_implementation="eager") as engine:
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        with torch.inference_mode():
            assert engine._fast.vision(inputs["pixel_values"], flat, "progress") is None
        assert engine._fast.vision.active and engine._fast.vision.calls == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA device")
def test_captured_tower_replays_new_pixels_for_both_towers(tiny_lrm, monkeypatch):
    # float32 without TF32: padded and unpadded convolutions may pick other cuDNN algorithms
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
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


def test_a_failing_tower_lookup_turns_off_the_tower_only(tiny_lrm, monkeypatch):
    queries = _stream_queries(np.random.default_rng(7), 2)

    def broken(visual):
        raise AttributeError("modules_to_save changed shape")

    monkeypatch.setattr(static_vision, "active_tower", broken)
    with tiny_engine(tiny_lrm, max_batch_size=2, compile="cuda-graphs") as static:
        static.score(queries)
        vision, decoder = static._fast.vision, static._fast.decoder
        assert not vision.active and "modules_to_save" in vision.disabled_reason
        assert decoder.active and static.stats.compile_failures == 0


def test_out_of_memory_while_capturing_turns_capture_off_not_the_tower(tiny_lrm, monkeypatch, caplog):
    rng = np.random.default_rng(8)
    images = [frame(0.3, rng), frame(0.6, rng)]

    def out_of_memory(*args, **kwargs):
        raise static_vision._CaptureOutOfMemory("OutOfMemoryError while capturing 2 image(s): test")

    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        inputs, grids = _pixels(engine, images)
        flat = [grid for row in grids for grid in row]
        vision = engine._fast.vision
        monkeypatch.setattr(vision, "_capture", out_of_memory)
        with torch.inference_mode():
            expected, _ = _image_features(
                engine._fast._inner, inputs["pixel_values"], inputs["image_grid_thw"]
            )
            assert vision(inputs["pixel_values"], flat) is None  # transformers' tower answers this call
            assert vision.active and not vision.capture and vision.failures == 1
            embeds, _ = vision(inputs["pixel_values"], flat)  # then the tower runs eagerly, batched
    assert "vision tower graphs off" in caplog.text and not vision._graphs
    assert torch.allclose(embeds, expected, atol=1e-5, rtol=1e-4)


def test_graphs_are_dropped_least_recently_used_first(tiny_lrm, monkeypatch):
    monkeypatch.setattr(static_vision, "MAX_GRAPHS", 2)
    rng = np.random.default_rng(9)
    with tiny_engine(tiny_lrm, compile="cuda-graphs") as engine:
        vision = engine._fast.vision
        batches = {count: _pixels(engine, [frame(0.5, rng)] * count) for count in (1, 2, 3)}

        def run(count):
            inputs, grids = batches[count]
            with torch.inference_mode():
                assert vision(inputs["pixel_values"], [grid for row in grids for grid in row]) is not None

        for count in (1, 2, 1, 3):  # size classes 1, 2, 1 (a hit), 4: class 2 is the least recently used
            run(count)
        assert [key[2] for key in vision._graphs] == [1, 4]


def test_the_tower_lets_go_of_its_graphs_when_the_static_pass_is_off(tiny_lrm):
    queries = _stream_queries(np.random.default_rng(10), 2)
    with tiny_engine(tiny_lrm, max_batch_size=2, compile="cuda-graphs") as static:
        static.score(queries)
        vision = static._fast.vision
        assert vision._graphs and vision._tables
        static._fast.decoder.give_up("test")
        static.score(queries)
        assert (
            not vision.active
            and vision.failures == 0
            and "static suffix pass is off" in vision.disabled_reason
        )
        assert not vision._graphs and not vision._tables


class _FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


def test_a_failed_capture_gives_the_caller_its_stream_back(monkeypatch):
    """torch.cuda.graph leaves the capture stream current when ending the capture raises; the shared
    capture routine puts the caller's back (torch.cuda faked: the order of calls is what is checked)."""
    import contextlib

    caller = _FakeStream("caller")
    state = {"current": caller, "captured_on": None}

    @contextlib.contextmanager
    def use_stream(stream):
        previous, state["current"] = state["current"], stream
        yield
        state["current"] = previous

    class failing_graph:  # stands in for torch.cuda.graph (a class used as a context manager)
        def __init__(self, graph, pool=None, stream=None):
            self.stream = stream

        def __enter__(self):
            state["current"] = state["captured_on"] = self.stream

        def __exit__(self, *exc):
            raise RuntimeError("operation not permitted when stream is capturing")  # no stream restored

    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side"))
    monkeypatch.setattr(torch.cuda, "stream", use_stream)
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: state.update(current=stream))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    warmed = []
    with pytest.raises(RuntimeError, match="capturing"):
        compiled_suffix.capture_cuda_graph(
            "cuda:0", None, warm_up=lambda: warmed.append(state["current"].name), record=lambda: None
        )
    assert warmed == ["side"] and state["captured_on"].name == "side"
    assert state["current"] is caller
