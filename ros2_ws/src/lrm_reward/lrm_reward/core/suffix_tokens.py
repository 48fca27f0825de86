"""The static suffix pass's processor call without its text half: tokenised suffixes kept per image grid.

What this is for: a camera stream's suffix text (the new frame's vision block, the question, the JSON
answer prefix) is the same for every query of a modality, and its image-pad count follows the frame's
grid; so for a batch of the same texts and grids the processor's text work (expanding the image pads,
tokenising, padding: ~5 ms per call of one 640x480 frame on the 2-core build machine, a quarter of the
call) gives the same tensors every time. Here the image processor runs per call (its pixels are new) and
the text tensors come from the first call with the same (texts, grids), which ran the whole processor.

Exactness: a miss runs the processor exactly as ``readouts.encode_images`` does and keeps its text tensors;
its pixels are compared with the image processor's own, and when they differ (a processor whose image
settings differ between the two calls) or anything here raises, the cache turns itself off with a warning
and every call runs the whole processor. Used by both suffix passes of an engine with a static pass (the
one-call pass is its fallback).

What it is not: no prefix texts (they are encoded once per cached prefix anyway), no images of different
sizes across calls beyond ``capacity`` keys (least recently used are dropped).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from lrm_reward.core import readouts

log = logging.getLogger(__name__)

PIXEL_KEYS = ("pixel_values", "image_grid_thw")


class SuffixTokenCache:
    """``encode(texts, images)``: the same inputs as ``readouts.encode_images``, text tensors reused."""

    def __init__(self, processor, device, capacity: int = 64):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.processor = processor
        self.device = device
        self.capacity = capacity
        self.active = True
        self.hits = 0
        self.misses = 0
        self._texts: OrderedDict[tuple, dict] = OrderedDict()

    def encode(self, texts: list[str], images: list) -> dict:
        if self.active and images:
            try:
                return self._encode(texts, images)
            except Exception as exc:  # an optimisation only: the whole processor still encodes
                import torch

                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise  # the engine splits the batch; the cache is not at fault
                self._turn_off(f"{type(exc).__name__}: {exc}")
        return readouts.encode_images(self.processor, texts, images, self.device)

    def _turn_off(self, reason: str) -> None:
        self.active = False
        self._texts.clear()
        log.warning("suffix tokens are not reused (the whole processor runs per call): %s", reason)

    def _encode(self, texts: list[str], images: list) -> dict:
        pixels = self.processor.image_processor(images=images, return_tensors="pt", device=str(self.device))
        # the key from the grid where the image processor left it: no wait for the GPU's resize
        grids = tuple(tuple(grid) for grid in pixels["image_grid_thw"].tolist())
        pixels = {key: pixels[key].to(self.device) for key in PIXEL_KEYS}
        key = (tuple(texts), grids)
        text = self._texts.get(key)
        if text is not None:
            self.hits += 1
            self._texts.move_to_end(key)
            return {**text, **pixels}
        self.misses += 1
        inputs = readouts.encode_images(self.processor, texts, images, self.device)
        if not all(_same(pixels[name], inputs[name]) for name in PIXEL_KEYS):
            self._turn_off("the image processor alone gives other pixels than the processor")
            return inputs
        self._texts[key] = {name: value for name, value in inputs.items() if name not in PIXEL_KEYS}
        if len(self._texts) > self.capacity:
            self._texts.popitem(last=False)
        return inputs


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
