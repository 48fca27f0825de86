"""The static pass's suffix-token cache (core/suffix_tokens.py) against the whole processor (tiny model).

A hit gives the very tensors the processor gives (new pixels, the remembered text tensors); another grid or
other texts are other keys; the least recently used key is dropped past capacity; a processor whose image
processor alone gives other pixels turns the cache off (warning) and every call runs the whole processor.
"""

import numpy as np
import pytest
import torch

from lrm_reward.core import readouts, suffix_tokens, tiny_model
from lrm_reward.core.loading import find_processor

frame = tiny_model.synthetic_frame
SUFFIX = "<|vision_start|><|image_pad|><|vision_end|>How far along is the task?<|im_end|>\n"


@pytest.fixture(scope="module")
def processor(tiny_lrm):
    return find_processor(None, str(tiny_lrm.base), [], local_files_only=True)[0]


def _assert_same_inputs(found: dict, expected) -> None:
    assert set(found) == set(expected.keys())
    for name, value in expected.items():
        assert torch.equal(found[name], value), name


def test_a_hit_gives_what_the_processor_gives(processor):
    cache = suffix_tokens.SuffixTokenCache(processor, "cpu")
    rng = np.random.default_rng(0)
    for round_ in range(3):
        images = [frame(0.2 + 0.3 * round_, rng), frame(0.9, rng)]
        texts = [SUFFIX, SUFFIX]
        found = cache.encode(texts, images)
        _assert_same_inputs(found, readouts.encode_images(processor, texts, images, "cpu"))
    assert (cache.misses, cache.hits) == (1, 2)


def test_other_grids_and_texts_are_other_keys_and_capacity_holds(processor):
    cache = suffix_tokens.SuffixTokenCache(processor, "cpu", capacity=2)
    rng = np.random.default_rng(1)
    calls = [
        ([SUFFIX], [frame(0.5, rng, (48, 160))]),
        ([SUFFIX], [frame(0.5, rng, (160, 48))]),  # another grid
        ([SUFFIX + "Answer:"], [frame(0.5, rng, (160, 48))]),  # other text; drops the first key
        ([SUFFIX], [frame(0.1, rng, (48, 160))]),  # the first key again: a miss
    ]
    for texts, images in calls:
        _assert_same_inputs(
            cache.encode(texts, images), readouts.encode_images(processor, texts, images, "cpu")
        )
    assert (cache.misses, cache.hits) == (4, 0)
    texts, images = [SUFFIX + "Answer:"], [frame(0.7, rng, (160, 48))]
    _assert_same_inputs(cache.encode(texts, images), readouts.encode_images(processor, texts, images, "cpu"))
    assert cache.hits == 1
    with pytest.raises(ValueError):
        suffix_tokens.SuffixTokenCache(processor, "cpu", capacity=0)


class _OtherImageProcessor:
    """The processor, but its image processor alone gives brighter pixels than the processor's call."""

    def __init__(self, real):
        self.real = real

    def __call__(self, *args, **kwargs):
        return self.real(*args, **kwargs)

    def image_processor(self, **kwargs):
        out = self.real.image_processor(**kwargs)
        out["pixel_values"] = out["pixel_values"] + 1.0
        return out


def test_other_pixels_from_the_image_processor_turn_it_off(processor, caplog):
    cache = suffix_tokens.SuffixTokenCache(_OtherImageProcessor(processor), "cpu")
    rng = np.random.default_rng(2)
    images = [frame(0.4, rng)]
    expected = readouts.encode_images(processor, [SUFFIX], images, "cpu")
    for _ in range(2):
        _assert_same_inputs(cache.encode([SUFFIX], images), expected)
    assert not cache.active and cache.hits == 0
    assert "suffix tokens are not reused" in caplog.text


class _FailingImageProcessor(_OtherImageProcessor):
    def image_processor(self, **kwargs):
        raise RuntimeError("no such resize")


def test_a_failing_image_processor_turns_it_off_and_the_processor_encodes(processor, caplog):
    cache = suffix_tokens.SuffixTokenCache(_FailingImageProcessor(processor), "cpu")
    rng = np.random.default_rng(3)
    images = [frame(0.4, rng)]
    _assert_same_inputs(
        cache.encode([SUFFIX], images), readouts.encode_images(processor, [SUFFIX], images, "cpu")
    )
    assert not cache.active and "no such resize" in caplog.text


class _OutOfMemoryImageProcessor(_OtherImageProcessor):
    def image_processor(self, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")


def test_out_of_memory_reaches_the_engine_and_leaves_the_cache_on(processor):
    # the engine answers out-of-memory by splitting the batch; the cache is not what failed
    cache = suffix_tokens.SuffixTokenCache(_OutOfMemoryImageProcessor(processor), "cpu")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cache.encode([SUFFIX], [frame(0.4, np.random.default_rng(4))])
    assert cache.active
