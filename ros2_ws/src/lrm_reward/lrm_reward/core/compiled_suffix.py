"""The fast path's suffix pass with static shapes, compiled or replayed as CUDA graphs (issue 8, b=1 latency).

What this is for: at batch 1 the 8B model's suffix pass (~390 tokens after a cached prefix) is bound by
kernel-launch and Python overhead, not compute (36 layers x attention + 7 LoRA-wrapped linears each). This
module runs the language-model part of that pass -- decoder layers, final norm and the LM head over the
last ``keep`` positions -- on fixed-shape tensors, so it can be

- ``"cuda-graphs"``: the eager loop captured once per (adapter, shape) with ``torch.cuda.CUDAGraph`` and
  replayed: no compile at all, the same kernels, one launch; all graphs share one memory pool;
- ``"compile+cuda-graphs"``: the same capture, of the loop over ``torch.compile``-d layers (inductor,
  default mode): fused kernels and one launch;
- ``"default"`` / ``"reduce-overhead"`` / ``"max-autotune-no-cudagraphs"``: plain ``torch.compile`` modes
  (``reduce-overhead`` = inductor + torch's own cudagraph trees, one graph per layer call).

Every compiled mode compiles ONE decoder layer (``layer_step``, "regional compilation"), called 36 times:
the graph is shared by all layers, so a compile is ~36x cheaper than compiling the loop (on a CPU, tracing
the 36-layer loop took 81 s at batch 1 and 240 s with a dynamic batch; one layer 6 s and 14 s).

Static shapes come from the caller (``fast_readout.py``) padding the batch to a power of two and the suffix
and cached-prefix lengths to multiples of a step (``padded_batch`` / ``padded_length``): one camera
resolution then gives one shape per (modality, batch bucket). Batch 1 compiles its own graph; batches of 2+
share one with a dynamic batch dimension (CUDA graphs are still captured per size). The vision tower and
the embedding lookup stay eager (their shapes follow the images); Qwen3-VL's DeepStack features are passed
as dense per-layer tensors (zeros off the image tokens), so no boolean indexing happens in the graph.

Adapters: PEFT's ``set_adapter`` changes which LoRA weights the wrapped linears use. Captured graphs are
keyed by adapter; compiled code gets Dynamo cache entries per adapter (their guards check the active
adapter), so switching selects existing entries and does not recompile. A compile for a shape key that
was compiled before is counted as ``unexpected_recompiles``; after three, the static path is turned off.

Failure policy: never crash the caller. A failing compile or capture logs a warning, counts a failure and
turns this static path off (``active``): that pass runs the decoder loop eagerly, later passes take the fast
path's one-call pass (no padding). The CUDA-graph modes without a CUDA device run the static path without
capture (the CPU check of padding, masks and DeepStack handling).

What it is not: no prompt handling, masks or positions (``fast_readout.py``), no adapter switching
(``engine.py``), no prefill of the cached prefix.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

COMPILE_MODES = (
    "off",
    "cuda-graphs",
    "compile+cuda-graphs",
    "default",
    "reduce-overhead",
    "max-autotune-no-cudagraphs",
)
TORCH_COMPILE_MODES = ("compile+cuda-graphs", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
CAPTURE_MODES = ("cuda-graphs", "compile+cuda-graphs")  # one manual CUDA graph per (adapter, shape)
# Dynamo keeps one cache entry per (adapter, batch class, length bucket); its default limit of 8 entries per
# function would silently fall back to eager after that.
RECOMPILE_LIMIT = 64
MAX_UNEXPECTED_RECOMPILES = 3

# Internal knob for tests and CPU checks: a torch.compile backend (a name such as "aot_eager", much faster
# to compile on a CPU, or a backend callable) used instead of inductor. None = inductor with the mode.
BACKEND_OVERRIDE: Any = None


def padded_batch(rows: int) -> int:
    """The batch size a pass of `rows` rows runs at: the next power of two (1, 2, 4, 8, ...)."""
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    return 1 << (rows - 1).bit_length()


def padded_length(length: int, step: int) -> int:
    """length rounded up to a multiple of step (0 stays 0: no cached prefix)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return -(-length // step) * step


@dataclass
class SuffixInputs:
    """One static-shape suffix pass. B = padded batch, L = padded query length, P = padded prefix length."""

    embeds: Any  # (B, L, hidden): suffix tokens then the answer-trie nodes, image features scattered in
    cos: Any  # (B, L, head_dim) rotary tables from the M-RoPE positions
    sin: Any
    mask: Any  # (B, 1, L, P + L) additive
    past: Any | None  # (layers, 2, B, kv_heads, P, head_dim) cached prefix keys/values, or None (P == 0)
    deepstack: Any | None  # (K, B, L, hidden): DeepStack features added after layer k (zeros off images)
    keep: int  # logits of the last `keep` positions are returned

    def shape_key(self) -> tuple:
        past = tuple(self.past.shape) if self.past is not None else None
        deep = tuple(self.deepstack.shape) if self.deepstack is not None else None
        return (
            tuple(self.embeds.shape),
            tuple(self.mask.shape),
            past,
            deep,
            self.keep,
            str(self.embeds.dtype),
        )


@dataclass
class CompileStats:
    """What the decoder did, for engine stats and the benchmark."""

    mode: str = "off"
    graphs: int = 0  # Dynamo graphs compiled or CUDA graphs captured
    compile_s: float = 0.0  # wall time of the passes that compiled or captured
    calls: int = 0  # passes through the decoder
    eager_calls: int = 0  # passes neither compiled nor captured (cuda-graphs without CUDA, after a failure)
    failures: int = 0  # compile / capture / static-path failures (the first turns the static path off)
    unexpected_recompiles: int = 0  # compiles for a shape key that was compiled before


class _LayerPast:
    """One layer's cached prefix as a transformers-cache stand-in: attention appends this pass's keys/values.

    Only ``update`` is used by a decoder layer here (the mask is built by the caller); the layer index it
    passes is ignored, so every layer runs the same code (one compiled graph serves all 36). The stored
    prefix tensors are never written.
    """

    def __init__(self, keys, values):
        self.keys = keys
        self.values = values

    def update(self, key_states, value_states, layer_idx=None, cache_kwargs=None):
        import torch

        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def layer_step(layer, hidden, cos, sin, mask, past_keys, past_values, deepstack):
    """One decoder layer over the suffix after its cached prefix, plus this layer's DeepStack features.

    The unit that torch.compile compiles ("regional compilation"): compiling the layer instead of the whole
    36-layer loop makes a compile about 36x cheaper, and the same graph serves every layer.
    """
    cache = _LayerPast(past_keys, past_values) if past_keys is not None else None
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=None,
        past_key_values=cache,
        position_embeddings=(cos, sin),
    )
    hidden = out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples
    return hidden if deepstack is None else hidden + deepstack


def _language_parts(model):
    """(text decoder, LM head) of a (PEFT-wrapped) Qwen3-VL conditional-generation model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = base.model
    text = getattr(inner, "language_model", None)
    if text is None or not hasattr(text, "layers"):
        raise TypeError(f"{type(base).__name__} has no language_model with decoder layers")
    return text, base.lm_head


class SuffixDecoder:
    """Runs decoder layers + norm + LM head over a static-shape suffix, compiled or graphed per `mode`."""

    def __init__(self, model, mode: str, dynamic_batch: bool = True):
        if mode not in COMPILE_MODES or mode == "off":
            raise ValueError(f"mode must be one of {COMPILE_MODES[1:]}, got {mode!r}")
        import torch

        self.model = model
        self.mode = mode
        self.text, self.lm_head = _language_parts(model)
        self.stats = CompileStats(mode=mode)
        self.active = True  # False once the static path failed: the fast path then makes one model call
        self.disabled_reason: str | None = None
        self.dynamic_batch = dynamic_batch
        self._compiled_keys: set[tuple] = set()
        self._graphs: dict[tuple, tuple[Any, tuple, Any]] = {}  # (adapter, shape) -> graph, inputs, output
        self._buffers: dict[tuple, tuple] = {}  # shape -> static input tensors, shared by the adapters
        self._pool = None
        self._step = layer_step
        if mode in TORCH_COMPILE_MODES:
            config = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # newer / older name of the same limit
                if hasattr(config, name):
                    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            if BACKEND_OVERRIDE is not None:
                self._step = torch.compile(layer_step, backend=BACKEND_OVERRIDE, dynamic=None)
            else:
                inductor_mode = "default" if mode == "compile+cuda-graphs" else mode
                self._step = torch.compile(layer_step, mode=inductor_mode, dynamic=None)

    # --- public -----------------------------------------------------------------------------------------

    def __call__(self, adapter: str | None, inputs: SuffixInputs):
        """Logits (B, keep, vocab) of the pass; compiled / replayed when possible, eager otherwise."""
        self.stats.calls += 1
        if self.active:
            try:
                if self.mode in CAPTURE_MODES and inputs.embeds.device.type == "cuda":
                    return self._replay(adapter, inputs)
                if self.mode in CAPTURE_MODES:
                    if self.stats.calls == 1:
                        log.info("%s needs a CUDA device: the static suffix pass runs uncaptured", self.mode)
                    if self.mode == "cuda-graphs":
                        self.stats.eager_calls += 1
                return self._run(adapter, inputs)
            except Exception as exc:  # torch.compile / capture raise many types; never let them reach callers
                import torch

                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                self.give_up(f"{type(exc).__name__}: {exc}")
        self.stats.eager_calls += 1
        return self._decode(inputs, layer_step)

    def give_up(self, reason: str) -> None:
        """Turn the static path off for good (logged, counted): the fast path's one-call pass takes over."""
        self.stats.failures += 1
        if self.active:
            log.warning("static suffix pass (%s) turned off: %s", self.mode, reason)
        self.active = False
        self.disabled_reason = reason
        self._graphs.clear()
        self._buffers.clear()

    # --- the loop that is compiled per layer and/or captured --------------------------------------------

    def _decode(self, inputs: SuffixInputs, step, tensors: tuple | None = None):
        """The layers, then norm + LM head on the kept positions; tensors: stand-ins for inputs' tensors."""
        embeds, cos, sin, mask, past, deepstack = tensors if tensors is not None else _tensors(inputs)
        mark = None
        if step is not layer_step and self.dynamic_batch and embeds.shape[0] > 1:
            # batches of 2+ share one graph per (adapter, lengths), batch 1 keeps its own static one; every
            # per-layer input has the batch first
            import torch

            def mark(tensor):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)

        hidden = embeds
        layers_with_features = deepstack.shape[0] if deepstack is not None else 0
        for index, layer in enumerate(self.text.layers):
            keys, values = (past[index, 0], past[index, 1]) if past is not None else (None, None)
            features = deepstack[index] if index < layers_with_features else None
            if mark is not None:
                for tensor in (hidden, cos, sin, mask, keys, values, features):
                    if tensor is not None:
                        mark(tensor)
            hidden = step(layer, hidden, cos, sin, mask, keys, values, features)
        # the norm is per position, so only the kept positions need it
        return self.lm_head(self.text.norm(hidden[:, -inputs.keep :]))

    def _counted(self, key: tuple, run):
        """run(), counting the Dynamo graphs it compiled (and flagging a recompile of a known key)."""
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        start = time.perf_counter()
        out = run()
        compiled = counters["stats"]["unique_graphs"] - before
        if compiled:
            elapsed = time.perf_counter() - start
            self.stats.graphs += compiled
            self.stats.compile_s += elapsed
            log.info(
                "suffix pass %s: compiled %d graph(s) for %s in %.1f s", self.mode, compiled, key, elapsed
            )
            if key in self._compiled_keys:
                self.stats.unexpected_recompiles += 1
                log.warning("suffix pass recompiled for an already compiled shape %s", key)
                if self.stats.unexpected_recompiles >= MAX_UNEXPECTED_RECOMPILES:
                    self.give_up(f"{self.stats.unexpected_recompiles} unexpected recompiles")
        self._compiled_keys.add(key)
        return out

    # --- without manual capture (torch.compile modes; capture modes on a CPU) ---------------------------

    def _run(self, adapter: str | None, inputs: SuffixInputs):
        import torch

        if self.mode == "reduce-overhead":
            # a new iteration for cudagraph trees: the last pass's graph outputs are consumed, reuse them
            torch.compiler.cudagraph_mark_step_begin()
        # the LM head runs eagerly after the last layer: its output is a fresh tensor, not a graph buffer
        return self._counted((adapter, inputs.shape_key()), lambda: self._decode(inputs, self._step))

    # --- manual CUDA graphs -----------------------------------------------------------------------------

    def _replay(self, adapter: str | None, inputs: SuffixInputs):
        shape = inputs.shape_key()
        found = self._graphs.get((adapter, shape))
        if found is None:
            found = self._capture((adapter, shape), shape, inputs)
        graph, static, output = found
        for buffer, value in zip(static, _tensors(inputs), strict=True):
            if buffer is not None:
                buffer.copy_(value)
        graph.replay()
        return output.clone()  # the next replay (any graph: they share one pool) overwrites it

    def _capture(self, key: tuple, shape: tuple, inputs: SuffixInputs):
        import torch

        start = time.perf_counter()
        graphs_before, compile_before = self.stats.graphs, self.stats.compile_s
        static = self._buffers.get(shape)
        if static is None:
            static = tuple(None if t is None else t.clone() for t in _tensors(inputs))
            self._buffers[shape] = static
        else:
            for buffer, value in zip(static, _tensors(inputs), strict=True):
                if buffer is not None:
                    buffer.copy_(value)
        # a compiled step compiles in the warm-up, never during the capture
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, output = capture_cuda_graph(
            inputs.embeds.device,
            self._pool,
            warm_up=lambda: self._counted(key, lambda: self._decode(inputs, self._step, static)),
            record=lambda: self._decode(inputs, self._step, static),
        )
        elapsed = time.perf_counter() - start
        compiled = self.stats.graphs - graphs_before
        self.stats.graphs += 1
        self.stats.compile_s = compile_before + elapsed  # the warm-up's compile included
        log.info(
            "suffix pass %s: captured a CUDA graph for %s in %.2f s (%d graphs compiled)",
            self.mode,
            key,
            elapsed,
            compiled,
        )
        found = (graph, static, output)
        self._graphs[key] = found
        return found


def capture_cuda_graph(device, pool, warm_up, record):
    """(graph, what record() returned): record() captured as a CUDA graph whose memory comes from pool.

    warm_up() runs first on a side stream (compiles, lazy inits, cuBLAS workspaces), as torch documents.
    Streams, capture and synchronize all on device (cuda:N), whatever this thread's current device is.
    Shared by the suffix decoder and the static vision tower (static_vision.py).
    """
    import torch

    with torch.cuda.device(device):
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            warm_up()
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # the capture stream named: torch's class-level default stream belongs to the first device used
            with torch.cuda.graph(graph, pool=pool, stream=side):
                output = record()
        finally:
            # torch.cuda.graph does not restore the stream when ending the capture raises (a sync or other
            # forbidden call in record()): everything after would run on the capture stream
            torch.cuda.set_stream(caller)
        torch.cuda.synchronize(device)
    return graph, output


def _tensors(inputs: SuffixInputs) -> tuple:
    return (inputs.embeds, inputs.cos, inputs.sin, inputs.mask, inputs.past, inputs.deepstack)
