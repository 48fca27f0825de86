"""The fast path of the logits readout: per-episode prefix KV reuse and one forward pass per batch.

What this is for: the same answers as ``readouts.score_answer_sets`` (the plain path, kept as the reference)
at a fraction of the cost, for dense rewards at camera rate:

- **prefix reuse** -- each prompt is cut before its first per-query image. Everything before the cut (chat
  header, task text, and for progress the episode's initial frame) is the same for every query of an
  episode; its keys/values are computed once per (prefix content, adapter) and kept in a ``PrefixCache``.
  A query then prefills only its suffix (the new frame, the question text and the JSON answer prefix), and
  the vision tower encodes only the new frame.
- **candidates in the same pass** -- the closed answer set's trie nodes ("0.", "1." for progress) are
  appended after the suffix and scored in the SAME forward pass with a 4-D mask (each node sees the whole
  prompt and its trie ancestors). The plain path spends a second, launch-bound forward on them (on an H100
  at the 8B shape: 47 ms for ~12 tokens, as much as the 799-token prompt).
- **batching across streams** -- rows with different prefixes (streams, tasks) are stacked: each row's
  cached prefix is left-padded to the longest one, the padding masked out; suffixes are left-padded too.

M-RoPE: Qwen3-VL numbers text tokens 0, 1, 2, ... on all three axes and gives an image block
(t, h, w) / merge positions start + (0, row, col), after which text resumes at start + max(h, w) / merge.
Positions are additive, so a suffix's positions are its own positions shifted by the prefix's next position;
``mrope_positions`` computes them (tests check it against the model's own ``get_rope_index``).

Static shapes (``EngineConfig.compile`` != "off"): the suffix pass is split into an eager part (processor,
vision tower, embeddings, masks, positions) and the language-model part, which ``compiled_suffix.py`` runs
compiled or as CUDA graphs. For that the batch is padded to a power of two (dummy rows that see only
themselves) and the suffix (+ trie nodes) and the cached prefix are left-padded to multiples of
``length_step`` tokens, so one camera resolution gives one shape per (modality, batch bucket). A failure in
that split path turns it off (logged, ``SuffixDecoder.stats.failures``) and the batch takes the one-call
path below.

What it is not: no adapter switching, batching policy or OOM handling (``engine.py``), no decoding.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lrm_reward.core import compiled_suffix, prompts, readouts, static_vision, suffix_tokens
from lrm_reward.core.prefix_cache import PrefixCache, prefix_key
from lrm_reward.core.types import Answer, Modality, Query

log = logging.getLogger(__name__)

VISION_START_TOKEN = "<|vision_start|>"


class FastPathUnavailable(RuntimeError):
    """This query cannot take the fast path (the caller answers it with the plain path)."""


def episode_images(modality: Modality, n_images: int) -> int:
    """How many leading images of a query are the same for the whole episode (and so go in the prefix)."""
    # progress [initial, current]: the initial frame is fixed per episode; every other image is per query
    return 1 if modality is Modality.PROGRESS and n_images == 2 else 0


@dataclass(frozen=True)
class PromptParts:
    """A prompt cut in two: the cacheable prefix and the per-query suffix (with the answer prefix)."""

    prefix_text: str
    suffix_text: str
    prefix_images: tuple[np.ndarray, ...]
    suffix_images: tuple[np.ndarray, ...]


def split_prompt(full_text: str, images: Sequence[np.ndarray], n_prefix_images: int) -> PromptParts:
    """Cut a templated prompt right before the vision block of image n_prefix_images."""
    cut = -1
    for _ in range(n_prefix_images + 1):
        cut = full_text.find(VISION_START_TOKEN, cut + 1)
        if cut < 0:
            raise FastPathUnavailable(f"prompt has fewer than {n_prefix_images + 1} image blocks")
    return PromptParts(
        full_text[:cut], full_text[cut:], tuple(images[:n_prefix_images]), tuple(images[n_prefix_images:])
    )


@dataclass
class PrefixEntry:
    """The cached keys/values of one prompt prefix for one adapter."""

    kv: Any  # tensor (layers, 2, kv_heads, length, head_dim) on the model's device
    length: int  # tokens
    next_position: int  # M-RoPE position of the first token after the prefix

    @property
    def nbytes(self) -> int:
        return int(self.kv.numel() * self.kv.element_size())


def mrope_positions(
    ids: np.ndarray, image_token_id: int, grids: Sequence[Sequence[int]], merge: int, start: int
) -> tuple[np.ndarray, int]:
    """M-RoPE positions (3, L) of a token row without padding, starting at start; and the next position.

    grids: (t, h, w) patch grid of each image block in the row, in order.
    """
    ids = np.asarray(ids)
    length = len(ids)
    positions = np.empty((3, length), dtype=np.int64)
    is_image = ids == image_token_id
    bounds = [0, *(np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1).tolist(), length]
    grid_iter = iter(grids)
    current = start
    for lo, hi in itertools.pairwise(bounds):
        if lo == hi:
            continue
        if not is_image[lo]:
            positions[:, lo:hi] = np.arange(current, current + hi - lo)
            current += hi - lo
            continue
        try:
            t, h, w = (int(v) for v in next(grid_iter))
        except StopIteration as exc:
            raise FastPathUnavailable("more image blocks than image grids") from exc
        gh, gw = h // merge, w // merge
        if t * gh * gw != hi - lo:
            raise FastPathUnavailable(f"image block of {hi - lo} tokens does not match grid {(t, h, w)}")
        positions[0, lo:hi] = current
        positions[1, lo:hi] = current + np.tile(np.repeat(np.arange(gh), gw), t)
        positions[2, lo:hi] = current + np.tile(np.arange(gw), gh * t)
        current += max(gh, gw)
    if next(grid_iter, None) is not None:
        raise FastPathUnavailable("more image grids than image blocks")
    return positions, current


def cache_layers(cache) -> list[tuple[Any, Any]]:
    """(keys, values) per layer of a transformers cache, (batch, kv_heads, length, head_dim) each."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


class FastLogitsReadout:
    """Scores closed answer sets with prefix reuse (cache given) or in one pass without reuse (cache None)."""

    def __init__(
        self,
        model,
        processor,
        device,
        max_task_chars: int,
        cache: PrefixCache | None,
        decoder: compiled_suffix.SuffixDecoder | None = None,
        length_step: int = 64,
    ):
        self.model = model
        self.processor = processor
        self.device = device
        self.max_task_chars = max_task_chars
        self.cache = cache
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        self.image_token_id = int(config.image_token_id)
        self.merge = int(config.vision_config.spatial_merge_size)
        self.dtype = next(model.parameters()).dtype
        self._split_checked: dict[tuple[Modality, int], bool] = {}
        self.prefix_forwards = 0  # how many prefix passes ran (misses, batched)
        self.decoder = decoder  # static-shape suffix pass (compiled / CUDA graphs); None = one model call
        self.length_step = length_step
        self._inner = base.model  # Qwen3VLModel: vision tower, embeddings, language model
        self.vision = None  # the static pass's vision tower (images of one size, capturable)
        self.suffix_tokens = None  # the static pass's processor: text tensors reused per (texts, grids)
        if decoder is not None:
            self.suffix_tokens = suffix_tokens.SuffixTokenCache(processor, device)
            if hasattr(self._inner, "visual"):
                capture = decoder.mode in compiled_suffix.CAPTURE_MODES
                self.vision = static_vision.StaticVisionTower(self._inner.visual, capture, decoder.stats)
        pad = getattr(processor.tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    # --- public -----------------------------------------------------------------------------------------

    def score(self, queries: list[Query], trie: readouts.CandidateTrie, adapter: str | None) -> list[Answer]:
        """Answers for validated same-modality, same-adapter queries (the adapter already active)."""
        import torch

        start = time.perf_counter()
        parts = [self._parts(query) for query in queries]
        with torch.inference_mode():
            entries = self._prefix_entries(parts, adapter)
            first, nodes = self._suffix_pass(parts, entries, trie, adapter)
            return readouts.answers_from_logits(first, nodes, trie, queries, start)

    # --- prompt split -----------------------------------------------------------------------------------

    def _parts(self, query: Query) -> PromptParts:
        spec = prompts.PROMPT_SPECS[query.modality]
        full = readouts.prompt_text(self.processor, query, self.max_task_chars) + spec.answer_prefix
        if self.cache is None:  # one pass without reuse: the whole prompt is the "suffix"
            return PromptParts("", full, (), tuple(query.images))
        parts = split_prompt(full, query.images, episode_images(query.modality, len(query.images)))
        key = (query.modality, len(query.images))
        if key not in self._split_checked:
            # The cut sits before a special token, so tokenizing the halves must give the same tokens as
            # tokenizing the whole; checked once per template in case a tokenizer merges across it.
            tokenize = self.processor.tokenizer
            whole = tokenize(full)["input_ids"]
            halves = tokenize(parts.prefix_text)["input_ids"] + tokenize(parts.suffix_text)["input_ids"]
            self._split_checked[key] = whole == halves
            if whole != halves:
                log.warning("prompt %s does not tokenize the same when cut: no prefix reuse for it", key)
        if not self._split_checked[key]:
            raise FastPathUnavailable(f"{key}: prompt does not tokenize the same when cut")
        return parts

    # --- prefixes ---------------------------------------------------------------------------------------

    def _prefix_entries(self, parts: list[PromptParts], adapter: str | None) -> list[PrefixEntry | None]:
        """One entry per row (None when there is no prefix); misses are computed in one batched pass."""
        if self.cache is None:
            return [None] * len(parts)
        hashed: dict[tuple, str] = {}  # within one call, the same frame objects hash once
        keys = []
        for part in parts:
            ident = (part.prefix_text, *(id(image) for image in part.prefix_images))
            if ident not in hashed:
                hashed[ident] = prefix_key(adapter, part.prefix_text, part.prefix_images)
            keys.append(hashed[ident])
        found: dict[str, PrefixEntry] = {}
        missing: dict[str, PromptParts] = {}
        for key, part in zip(keys, parts, strict=True):
            if key in found or key in missing:
                continue
            entry = self.cache.get(key)
            if entry is None:
                missing[key] = part
            else:
                found[key] = entry
        if missing:
            computed = self._prefix_pass(list(missing.values()))
            for key, entry in zip(missing, computed, strict=True):
                self.cache.put(key, entry, entry.nbytes)  # a too-big entry is still used for this batch
                found[key] = entry
        return [found[key] for key in keys]

    def _prefix_pass(self, parts: list[PromptParts]) -> list[PrefixEntry]:
        import torch

        self.prefix_forwards += 1
        texts = [part.prefix_text for part in parts]
        images = [image for part in parts for image in part.prefix_images]
        inputs = self._encode(texts, images)
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        grids = self._grids(inputs, [len(part.prefix_images) for part in parts])
        batch, width = ids.shape
        positions = torch.zeros((3, batch, width), dtype=torch.long)
        next_positions = []
        lengths = mask.sum(dim=1).tolist()
        ids_host = ids.cpu().numpy()
        for row in range(batch):
            real = ids_host[row, width - lengths[row] :]
            row_positions, following = mrope_positions(real, self.image_token_id, grids[row], self.merge, 0)
            positions[:, row, width - lengths[row] :] = torch.from_numpy(row_positions)
            next_positions.append(following)
        kwargs = {
            k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")
        }
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions.to(ids.device),
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        layers = cache_layers(out.past_key_values)
        entries = []
        for row in range(batch):
            pad = width - lengths[row]
            kv = torch.stack([torch.stack((k[row, :, pad:], v[row, :, pad:])) for k, v in layers])
            entries.append(PrefixEntry(kv.contiguous(), lengths[row], next_positions[row]))
        return entries

    # --- suffix + candidates ----------------------------------------------------------------------------

    def _suffix_pass(self, parts: list[PromptParts], entries: list[PrefixEntry | None], trie, adapter=None):
        """One forward over [each row's suffix, then the trie nodes] after the rows' cached prefixes.

        Returns logits after the answer prefix (B, V) and after each trie node (B, N, V) or None.
        """
        import torch

        if self.decoder is not None and self.decoder.active:
            try:
                return self._static_suffix_pass(parts, entries, trie, adapter)
            except (torch.cuda.OutOfMemoryError, FastPathUnavailable):
                raise
            except Exception as exc:  # the split path is an optimisation: the one-call pass still answers
                self.decoder.give_up(f"static suffix pass failed: {type(exc).__name__}: {exc}")
        static_off = self.decoder is not None and not self.decoder.active
        if static_off and self.vision is not None and self.vision.active:
            # only the static pass runs the static tower: its graphs would hold memory for nothing
            self.vision.release(f"the static suffix pass is off ({self.decoder.disabled_reason})")

        inputs, grids = self._encode_suffixes(parts)
        ids, suffix_mask = inputs["input_ids"], inputs["attention_mask"]
        device = ids.device
        batch, width = ids.shape
        n_nodes = len(trie.node_tokens)
        prefix_lengths = [entry.length if entry is not None else 0 for entry in entries]
        past_width = max(prefix_lengths)
        queries_len = width + n_nodes

        # positions: each row's suffix continues its prefix; node i sits depth(i) after the answer prefix
        positions = self._positions(ids, suffix_mask, entries, grids, trie, batch, width, queries_len)
        mask = self._mask(prefix_lengths, past_width, suffix_mask, trie, device)

        past = None
        if past_width > 0:
            past = self._stacked_cache(entries, past_width)
        node_ids = torch.tensor(trie.node_tokens, dtype=ids.dtype, device=device).expand(batch, n_nodes)
        input_ids = torch.cat([ids, node_ids], dim=1)
        kwargs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
        if "mm_token_type_ids" in inputs:
            kwargs["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], inputs["mm_token_type_ids"].new_zeros(batch, n_nodes)], dim=1
            )
        with readouts.tree_mask_attention(self.model):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions.to(device),
                past_key_values=past,
                use_cache=past is not None,
                logits_to_keep=n_nodes + 1,
                **kwargs,
            )
        logits = out.logits  # (B, 1 + N, V): after the answer prefix, then after each node
        return logits[:, 0, :], (logits[:, 1:, :] if n_nodes else None)

    def _encode_suffixes(self, parts: list[PromptParts]):
        """Tokenise each row's suffix (new frame + question + answer prefix): (inputs, grids per row)."""
        texts = [part.suffix_text for part in parts]
        images = [image for part in parts for image in part.suffix_images]
        if self.suffix_tokens is not None:
            # on a hit the text tensors are the cache's own, the same objects every call: read, never
            # write them in place
            inputs = self.suffix_tokens.encode(texts, images)
        else:
            inputs = self._encode(texts, images)
        return inputs, self._grids(inputs, [len(part.suffix_images) for part in parts])

    def _positions(self, ids, suffix_mask, entries, grids, trie, batch: int, end: int, total: int):
        """M-RoPE positions (3, batch, total): each row's real suffix ends at column ``end`` and continues
        its cached prefix; answer-trie node i follows at ``end + i``, depth(i) after the answer prefix."""
        import torch

        width = ids.shape[1]
        positions = torch.zeros((3, batch, total), dtype=torch.long)
        lengths = suffix_mask.sum(dim=1).tolist()
        ids_host = ids.cpu().numpy()
        depth = torch.tensor(trie.node_depth, dtype=torch.long)
        for row, entry in enumerate(entries):
            real = ids_host[row, width - lengths[row] :]
            start = entry.next_position if entry is not None else 0
            row_positions, following = mrope_positions(
                real, self.image_token_id, grids[row], self.merge, start
            )
            positions[:, row, end - lengths[row] : end] = torch.from_numpy(row_positions)
            positions[:, row, end:] = following + depth
        return positions

    def _mask(self, prefix_lengths: list[int], past_width: int, suffix_mask, trie, device):
        """Additive 4-D mask (B, 1, S + N, P + S + N) over [padded prefixes | padded suffixes | nodes]."""
        import torch

        batch, width = suffix_mask.shape
        n_nodes = len(trie.node_tokens)
        total = width + n_nodes
        visible = torch.zeros((batch, total, past_width + total), dtype=torch.bool, device=device)
        real_suffix = suffix_mask.bool()  # (B, S)
        real_prefix = torch.zeros((batch, past_width), dtype=torch.bool, device=device)
        for row, length in enumerate(prefix_lengths):
            if length:
                real_prefix[row, past_width - length :] = True
        # every real query token sees its row's real prefix ...
        visible[:, :, :past_width] = real_prefix.unsqueeze(1)
        # ... the real suffix tokens up to itself (causal) ...
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        visible[:, :width, past_width : past_width + width] = causal.unsqueeze(0) & real_suffix.unsqueeze(1)
        # ... and nodes see the whole real suffix plus their trie ancestors and themselves
        visible[:, width:, past_width : past_width + width] = real_suffix.unsqueeze(1)
        if n_nodes:
            tree = torch.tensor(trie.node_visible, dtype=torch.bool, device=device)
            visible[:, width:, past_width + width :] = tree
        # padding query rows see only themselves (no fully masked row: sdpa would give NaN); unused
        pad_rows = ~real_suffix
        if bool(pad_rows.any()):
            visible[:, :width][pad_rows] = False
            eye = torch.eye(width, dtype=torch.bool, device=device)
            diag = torch.zeros((batch, width, past_width + total), dtype=torch.bool, device=device)
            diag[:, :, past_width : past_width + width] = eye
            visible[:, :width] |= diag & pad_rows.unsqueeze(-1)
        blocked = torch.finfo(self.dtype).min
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=device).masked_fill(~visible, blocked)
        return mask.unsqueeze(1)

    def _static_suffix_pass(self, parts: list[PromptParts], entries: list[PrefixEntry | None], trie, adapter):
        """The suffix pass at padded shapes: eager vision + embeddings, then ``self.decoder`` (static part).

        Same inputs and outputs as the one-call pass. Rows are padded to ``padded_batch`` with dummy rows
        (no prefix, all padding), the suffix + nodes to a multiple of ``length_step`` and the prefix too.
        """
        import torch

        inputs, grids = self._encode_suffixes(parts)
        ids, suffix_mask = inputs["input_ids"], inputs["attention_mask"]
        device = ids.device
        rows, width = ids.shape
        n_nodes = len(trie.node_tokens)
        step = self.length_step
        batch = compiled_suffix.padded_batch(rows)
        total = compiled_suffix.padded_length(width + n_nodes, step)
        padded_width = total - n_nodes  # suffix columns after padding; the nodes follow
        prefix_lengths = [entry.length if entry is not None else 0 for entry in entries]
        prefix_lengths += [0] * (batch - rows)
        past_width = compiled_suffix.padded_length(max(prefix_lengths), step)

        # token ids: [left padding | each row's (left-padded) suffix | trie nodes]; dummy rows all padding
        all_ids = torch.full((batch, total), self.pad_id, dtype=ids.dtype, device=device)
        all_ids[:rows, padded_width - width : padded_width] = ids
        if n_nodes:
            all_ids[:, padded_width:] = torch.tensor(trie.node_tokens, dtype=ids.dtype, device=device)
        real_suffix = torch.zeros((batch, padded_width), dtype=suffix_mask.dtype, device=device)
        real_suffix[:rows, padded_width - width :] = suffix_mask

        positions = self._positions(ids, suffix_mask, entries, grids, trie, batch, padded_width, total)
        mask = self._mask(prefix_lengths, past_width, real_suffix, trie, device)

        flat_grids = [grid for row in grids for grid in row]
        embeds, deepstack = self._embeddings(all_ids, inputs, flat_grids, adapter)
        text = self.decoder.text
        cos, sin = text.rotary_emb(embeds, positions.to(device))
        past = self._stacked_past(entries, batch, past_width) if past_width > 0 else None
        static = compiled_suffix.SuffixInputs(embeds, cos, sin, mask, past, deepstack, n_nodes + 1)
        with readouts.tree_mask_attention(self.model):
            logits = self.decoder(adapter, static)[:rows]  # (rows, 1 + N, V)
        return logits[:, 0, :], (logits[:, 1:, :] if n_nodes else None)

    def _embeddings(self, ids, inputs, grids: list[tuple[int, int, int]], adapter: str | None = None):
        """Token embeddings with the image features scattered in, and dense DeepStack features (or None).

        grids: the (t, h, w) of every image in order; images of one size go through the static tower.
        """
        embeds = self._inner.get_input_embeddings()(ids)
        if "pixel_values" not in inputs:
            return embeds, None
        found = self.vision(inputs["pixel_values"], grids, adapter) if self.vision is not None else None
        if found is None:
            found = _image_features(self._inner, inputs["pixel_values"], inputs["image_grid_thw"])
        image_embeds, features = found
        # the ids' image blocks were checked against these grids (mrope_positions), so counting from the
        # grids needs no device-to-host sync between the vision tower and the decoder
        tokens = sum(t * h * w for t, h, w in grids) // (self.merge * self.merge)
        if tokens != image_embeds.shape[0]:
            raise FastPathUnavailable(f"{tokens} image tokens for {image_embeds.shape[0]} image features")
        image_mask = (ids == self.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
        if not features:
            return embeds, None
        dense = embeds.new_zeros((len(features), *embeds.shape))
        for index, feature in enumerate(features):
            dense[index] = dense[index].masked_scatter(image_mask, feature.to(embeds.dtype))
        return embeds, dense

    def _stacked_past(self, entries: list[PrefixEntry | None], batch: int, past_width: int):
        """(layers, 2, batch, kv_heads, past_width, head_dim): prefixes right-aligned, zeros elsewhere."""
        sample = next(entry.kv for entry in entries if entry is not None)
        layers, _, kv_heads, _, head_dim = sample.shape
        stacked = sample.new_zeros((layers, 2, batch, kv_heads, past_width, head_dim))
        for row, entry in enumerate(entries):
            if entry is not None:
                stacked[:, :, row, :, past_width - entry.length :] = entry.kv
        return stacked

    def _stacked_cache(self, entries: list[PrefixEntry | None], past_width: int):
        """A fresh transformers DynamicCache with each row's prefix left-padded to past_width.

        The stored entries are never handed to the model: the forward appends to copies, so a cached prefix
        cannot be changed by a query.
        """
        from transformers import DynamicCache

        sample = next(entry.kv for entry in entries if entry is not None)
        layers, _, kv_heads, _, head_dim = sample.shape
        stacked = sample.new_zeros((layers, 2, len(entries), kv_heads, past_width, head_dim))
        for row, entry in enumerate(entries):
            if entry is not None:
                stacked[:, :, row, :, past_width - entry.length :] = entry.kv
        cache = DynamicCache()
        for layer in range(layers):
            cache.update(stacked[layer, 0], stacked[layer, 1], layer)
        return cache

    # --- inputs -----------------------------------------------------------------------------------------

    def _encode(self, texts: list[str], images: list[np.ndarray]):
        """Left-padded processor outputs on the model's device (images resized/normalised there too)."""
        return readouts.encode_images(self.processor, texts, images, self.device)

    def _grids(self, inputs, counts: list[int]) -> list[list[tuple[int, int, int]]]:
        """The (t, h, w) grids of each row's images, from the processor's flat image_grid_thw."""
        flat = inputs["image_grid_thw"].tolist() if "image_grid_thw" in inputs else []
        if len(flat) != sum(counts):
            raise FastPathUnavailable(f"processor gave {len(flat)} image grids for {sum(counts)} images")
        grids, offset = [], 0
        for count in counts:
            grids.append([tuple(g) for g in flat[offset : offset + count]])
            offset += count
        return grids


def _image_features(inner, pixel_values, grid_thw):
    """(image embeddings (n_tokens, hidden), DeepStack features per layer) from a Qwen3-VL vision tower.

    transformers 5 returns an output object (pooler_output split per image, deepstack_features); 4.x a tuple.
    """
    import torch

    try:
        out = inner.get_image_features(pixel_values, grid_thw, return_dict=True)
    except TypeError:  # versions whose get_image_features takes no return_dict
        out = inner.get_image_features(pixel_values, grid_thw)
    if hasattr(out, "pooler_output"):
        embeds, features = out.pooler_output, getattr(out, "deepstack_features", None)
    else:
        embeds, features = out[0], (out[1] if len(out) > 1 else None)
    if isinstance(embeds, (list, tuple)):
        embeds = torch.cat(list(embeds), dim=0)
    return embeds, list(features or [])
