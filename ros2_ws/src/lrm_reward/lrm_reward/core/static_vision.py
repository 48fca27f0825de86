"""The vision tower of the static suffix pass: images of one size, no host syncs, one CUDA graph per batch.

What this is for: on the 2026-12-04 H200 run (docs/benchmarks.md) the vision tower was the largest eager
part of a batch-1 query once the decoder ran as a CUDA graph (17.4 of 52 ms). transformers' tower cannot
be captured as it is: per call it reads the image grids to the host (``tolist``) to build position tables
with Python loops, and under sdpa it splits the patches per image with host-side lengths and runs one
attention call per image in each of its 27 blocks.

The suffix pass of a camera stream sees frames of one size, so here the tower runs over ``n`` images of one
grid ``(1, h, w)``:

- the learned position embeddings and the rotary tables are computed once per (tower, grid) by the tower's
  own methods and kept on the device;
- each block's attention is one batched sdpa call over ``(n, heads, h*w, head_dim)`` -- the same
  per-image attention, without the split;
- everything else is the tower's own modules (patch embedding, norms, qkv/proj, MLPs, mergers), so LoRA or
  PEFT wrappers on them still apply (graphs are kept per adapter for that reason).

With sdpa (transformers' default) the result is the same computation as transformers' tower: the tests
find it equal on the tiny model in float32 and bfloat16; on a GPU, padding the image count (below) changes
matrix sizes, so expect bf16 rounding differences, not bit equality. Towers loaded with another attention
implementation (eager, flash) are left to transformers.

With a capture mode (``"cuda-graphs"``, ``"compile+cuda-graphs"``) on a CUDA device the whole tower is
captured once per (tower, size class, grid) for n up to ``CAPTURE_MAX_IMAGES`` and replayed, n padded to the
next power of two as the decoder pads its batch; larger batches are compute-bound and run it eagerly (still
batched). Other modes, and a CPU, run it eagerly. Memory at 8B with 640x480 frames: each graph keeps its
outputs (~10 MB per image: merger + 3 DeepStack features in bf16) and its pixel buffer (~3.7 MB per image in
bf16); sizes 1+2+4+8 are ~200 MB per tower copy (the progress copy and the base tower: two), plus the
intermediates of the graphs' shared pool (a few hundred MB at 8 images).

The tower is the one the active adapter uses: PEFT's ``modules_to_save`` gives the progress adapter its own
copy of the vision tower (``loading.py``), so tables and graphs are keyed by the module itself.

Not handled (returns None, the caller runs transformers' tower): images of different sizes in one batch,
video grids (t > 1), towers without the Qwen3-VL layout or not on sdpa. Failure policy as
``compiled_suffix.py``: a failing pass logs a warning, counts it and turns this path off for good; never
raises to the caller, except CUDA out-of-memory in an eager pass or a replay (the engine then splits the
batch). Out of memory while capturing turns capture off instead: transformers' tower, which holds no
graphs, may still fit.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

from lrm_reward.core import compiled_suffix

log = logging.getLogger(__name__)

CAPTURE_MAX_IMAGES = 8  # beyond this the tower is compute-bound: graphs save little and cost memory
MAX_GRAPHS = 32  # graphs kept, the least recently used dropped (~110 MB each at 8B with 8 images)


def active_tower(visual):
    """The vision module the active adapter runs: a PEFT modules_to_save copy, or the tower itself."""
    copies = getattr(visual, "modules_to_save", None)
    if copies is None:
        return visual
    active = list(getattr(visual, "active_adapters", None) or [])
    if getattr(visual, "disable_adapters", False) or not active or active[0] not in copies:
        return visual.original_module
    return copies[active[0]]


def uniform_grid(grids: list[tuple[int, int, int]]) -> tuple[int, int, int] | None:
    """The one (1, h, w) grid all images share, or None (no images, several sizes, or video frames)."""
    if not grids or any(grid != grids[0] for grid in grids) or grids[0][0] != 1:
        return None
    return tuple(int(value) for value in grids[0])


class StaticVisionTower:
    """Image embeddings and DeepStack features for images of one grid; see the module docstring."""

    def __init__(self, visual, capture: bool, stats: Any = None):
        self.visual = visual
        self.capture = capture
        self.stats = stats  # compiled_suffix.CompileStats: graphs / compile_s include the tower's captures
        self.active = True
        self.disabled_reason: str | None = None
        self.failures = 0
        self.calls = 0
        # keyed by the tower module itself, not id(): a graph bakes in its weights' addresses, and a freed
        # tower's id may come back for a new one
        self._tables: dict[tuple, tuple] = {}  # (tower, grid, device) -> one image's (pos embeds, cos, sin)
        self._graphs: OrderedDict[tuple, tuple] = OrderedDict()  # (adapter, tower, size, grid, ...) -> graph
        self._tuned: dict[Any, bool] = {}  # tower -> has adapter (LoRA) layers of its own
        self._pool = None
        try:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
        except ImportError as exc:  # a transformers without Qwen3-VL's vision rotary: its own tower runs
            self.give_up(f"transformers has no Qwen3-VL vision rotary ({exc})")
            apply_rotary_pos_emb_vision = None
        self._rotate = apply_rotary_pos_emb_vision

    # --- public -----------------------------------------------------------------------------------------

    def __call__(self, pixel_values, grids: list[tuple[int, int, int]], adapter: str | None = None):
        """(embeds (n * tokens, out_hidden), DeepStack features per layer) or None when not applicable.

        adapter: the active adapter's name; graphs are kept per adapter too, because an adapter may put
        LoRA on the tower's own layers (the base tower is shared by the adapters without a copy).
        """
        grid = uniform_grid(grids)
        if not self.active or grid is None:
            return None
        try:
            tower = active_tower(self.visual)
            if not hasattr(tower, "blocks") or not hasattr(tower, "fast_pos_embed_interpolate"):
                return None
            if getattr(getattr(tower, "config", None), "_attn_implementation", None) != "sdpa":
                return None  # eager / flash towers keep their own attention kernels (and numerics)
            self.calls += 1
            n = len(grids)
            if self.capture and n <= CAPTURE_MAX_IMAGES:
                return self._replay(adapter, tower, pixel_values, n, grid)
            return self._forward(tower, pixel_values, n, grid)
        except _CaptureOutOfMemory as exc:
            self._capture_off(str(exc))
            return None
        except Exception as exc:  # an optimisation only: transformers' tower still answers
            import torch

            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self.give_up(f"{type(exc).__name__}: {exc}")
            return None

    def give_up(self, reason: str) -> None:
        """Turn the static tower off for good (a failure: logged, counted) and free its graphs."""
        self.failures += 1
        if self.active:
            log.warning("static vision tower turned off (transformers' tower runs instead): %s", reason)
        self.release(reason)

    def release(self, reason: str) -> None:
        """Off for good, graphs and tables freed, not counted as a failure (the static pass itself is off)."""
        self.active = False
        self.disabled_reason = reason
        self._drop_graphs()
        self._tables.clear()

    def _drop_graphs(self) -> None:
        self._graphs.clear()
        self._pool = None  # the pool's memory goes back once no graph holds it

    def _capture_off(self, reason: str) -> None:
        """Out of memory while capturing: drop the graphs, run eagerly from now on (counted, logged)."""
        import torch

        self.failures += 1
        self.capture = False
        self._drop_graphs()
        torch.cuda.empty_cache()
        log.warning("vision tower graphs off (the tower runs eagerly; the graphs need memory): %s", reason)

    # --- the tower ----------------------------------------------------------------------------------------

    def _tables_for(self, tower, grid: tuple[int, int, int], device):
        """One image's (position embeddings, cos, sin), from the tower's own methods; cached per grid."""
        import torch

        key = (tower, grid, str(device))
        found = self._tables.get(key)
        if found is None:
            grid_thw = torch.tensor([grid], dtype=torch.long, device=device)
            positions = tower.fast_pos_embed_interpolate(grid_thw)
            rotary = tower.rot_pos_emb(grid_thw).reshape(positions.shape[0], -1)
            emb = torch.cat((rotary, rotary), dim=-1)
            found = (positions, emb.cos(), emb.sin())
            self._tables[key] = found
        return found

    def _forward(self, tower, pixel_values, n: int, grid: tuple[int, int, int]):
        positions, cos, sin = self._tables_for(tower, grid, pixel_values.device)
        hidden = tower.patch_embed(pixel_values)  # casts to its weights' dtype
        hidden = hidden + positions.repeat(n, 1)
        cos, sin = cos.repeat(n, 1), sin.repeat(n, 1)
        features = []
        deepstack = list(getattr(tower, "deepstack_visual_indexes", None) or [])
        for index, block in enumerate(tower.blocks):
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), cos, sin, n)
            hidden = hidden + block.mlp(block.norm2(hidden))
            if index in deepstack:
                features.append(tower.deepstack_merger_list[deepstack.index(index)](hidden))
        return tower.merger(hidden), features

    def _attention(self, attn, hidden, cos, sin, n: int):
        """Qwen3-VL vision attention, each image attending to itself: one batched sdpa call."""
        import torch

        tokens = hidden.shape[0]
        q, k, v = attn.qkv(hidden).reshape(tokens, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = self._rotate(q, k, cos, sin)
        per_image = (n, tokens // n, attn.num_heads, -1)
        q, k, v = (t.reshape(per_image).transpose(1, 2) for t in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
        return attn.proj(out.transpose(1, 2).reshape(tokens, -1))

    # --- CUDA graphs --------------------------------------------------------------------------------------

    def _replay(self, adapter: str | None, tower, pixel_values, n: int, grid: tuple[int, int, int]):
        """Replay the graph for the next power of two of n images (as the decoder pads its batch): one graph
        per size class; the extra images' rows hold stale pixels and their outputs are dropped (attention
        stays within each image, so they cannot change the others). Without CUDA the same padded pass runs
        uncaptured (the CPU check of the padding)."""
        padded = compiled_suffix.padded_batch(n)
        rows = pixel_values.shape[0]
        # the adapters without a tower copy of their own share the base tower's graphs, unless an adapter
        # put LoRA on the tower's layers (then each adapter computes something else)
        per_adapter = adapter if self._has_tuner_layers(tower) else None
        key = (per_adapter, tower, padded, grid, tuple(pixel_values.shape[1:]), str(pixel_values.dtype))
        found = self._graphs.get(key)
        if found is None:
            while len(self._graphs) >= MAX_GRAPHS:  # a camera that keeps changing size: drop the least used
                self._graphs.popitem(last=False)
            found = self._capture(key, tower, pixel_values, n, padded, grid)
        else:
            self._graphs.move_to_end(key)
        graph, buffer, outputs = found
        buffer[:rows].copy_(pixel_values)
        if graph is None:
            outputs = self._forward(tower, buffer, padded, grid)
        else:
            graph.replay()
        embeds, features = outputs
        # the next replay overwrites the outputs: hand out copies of the real images' rows
        kept = embeds.shape[0] // padded * n
        return embeds[:kept].clone(), [feature[:kept].clone() for feature in features]

    def _has_tuner_layers(self, tower) -> bool:
        found = self._tuned.get(tower)
        if found is None:
            try:
                from peft.tuners.tuners_utils import BaseTunerLayer
            except ImportError:  # no peft: no adapter layers either
                found = False
            else:
                found = any(isinstance(module, BaseTunerLayer) for module in tower.modules())
            self._tuned[tower] = found
        return found

    def _capture(self, key: tuple, tower, pixel_values, n: int, padded: int, grid: tuple[int, int, int]):
        import torch

        start = time.perf_counter()
        per_image = pixel_values.shape[0] // n
        # in the patch embedding's dtype (bf16 on a GPU): it casts to it first thing, and copy_ rounds as
        # .to() does, so half the buffer gives the same result
        weight = getattr(getattr(tower.patch_embed, "proj", None), "weight", None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else pixel_values.dtype
        buffer = pixel_values[:per_image].to(dtype).repeat(padded, 1)  # real pixels in every slot: no NaN
        if pixel_values.device.type != "cuda":
            found = (None, buffer, None)
            self._graphs[key] = found
            return found
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()

        def run():  # the warm-up also builds the grid's tables, outside the capture (they read the host)
            return self._forward(tower, buffer, padded, grid)

        try:
            graph, outputs = compiled_suffix.capture_cuda_graph(pixel_values.device, self._pool, run, run)
        except torch.cuda.OutOfMemoryError as exc:
            raise _CaptureOutOfMemory(f"OutOfMemoryError while capturing {padded} image(s): {exc}") from exc
        elapsed = time.perf_counter() - start
        if self.stats is not None:
            self.stats.graphs += 1
            self.stats.compile_s += elapsed
        log.info(
            "vision tower: captured a CUDA graph for %d image(s) of grid %s in %.2f s", padded, grid, elapsed
        )
        found = (graph, buffer, outputs)
        self._graphs[key] = found
        return found


class _CaptureOutOfMemory(Exception):
    """CUDA ran out of memory while capturing (not while running): capture goes off, the engine goes on."""
