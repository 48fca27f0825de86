"""The reward engine: the released Large Reward Model (arXiv 2603.16065) behind one ``score(queries)`` call.

What this is for: turning ``Query`` objects (task text + frames, one modality each) into ``Answer`` objects.
It validates queries, groups them by adapter and readout, runs as few batched forward passes as it can
(``max_batch_size`` per pass), halves a batch that runs out of CUDA memory, and never raises on bad input
or bad model output: failures come back as ``Answer(parsed=False, error=...)``.
Backends sit behind a small registry; ``make_engine(cfg)`` builds one ("local" = in-process transformers,
"vllm" = vLLM servers over HTTP, ``vllm_client.py``).

The logits readout takes the fast path (``fast_readout.py``) unless ``fast_path=False``: per-episode prompt
prefixes (chat header, task, initial frame) are prefilled once per adapter and kept in a bounded LRU
``PrefixCache`` (``prefix_cache=True``), and the answer set is scored in the same forward pass as the
prompt. The plain path (``readouts.score_answer_sets``) stays as the numerical reference and the fallback.

What it is not: no episode state, interval-hold or fusion (``tracking.py``), no ROS, no lerobot.
torch / transformers / peft are imported lazily; the config alone is ``engine_config.py``.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lrm_reward.core import prompts
from lrm_reward.core.cuda_device import on_device, release_memory
from lrm_reward.core.engine_config import EngineConfig, adapter_modality
from lrm_reward.core.types import Answer, Modality, Query, Readout

if TYPE_CHECKING:
    from lrm_reward.core.loading import LoadedModel

log = logging.getLogger(__name__)

MAX_IMAGE_ASPECT = 200  # the Qwen-VL resize refuses more extreme aspect ratios


@dataclass
class EngineStats:
    """Running counts, for node diagnostics."""

    queries: int = 0
    forward_batches: int = 0
    unparsed: int = 0
    errors: int = 0
    oom_retries: int = 0
    # prefix lookups, one per distinct episode prefix in a batch: a miss computes it (new episode x adapter,
    # or after eviction), a hit reuses it for every query of the batch that shares it
    prefix_cache_hits: int = 0
    prefix_cache_misses: int = 0
    prefix_cache_evictions: int = 0
    fast_path_fallbacks: int = 0  # logits batches answered by the plain path after the fast path failed
    # static suffix pass (EngineConfig.compile != "off"), from compiled_suffix.CompileStats
    compiled_graphs: int = 0  # Dynamo graphs compiled or CUDA graphs captured
    compile_s: float = 0.0  # time spent compiling / capturing (warm-up included)
    compile_failures: int = 0  # failures that turned the static pass off (the one-call pass then runs)
    compile_eager_passes: int = 0  # suffix passes run eagerly by the static path (after a failure, no CUDA)
    compile_unexpected_recompiles: int = 0  # compiles for a shape already compiled (should stay 0)
    compile_warmup_s: float = 0.0  # wall time of the warm-up at engine start


class RewardEngine(abc.ABC):
    """Answers reward queries. score() keeps the order of its input and never raises on bad input/output."""

    model_id: str

    @abc.abstractmethod
    def score(self, queries: list[Query]) -> list[Answer]: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> RewardEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class QueryError(ValueError):
    """A query that cannot be sent to the model (bad images, task text or modality)."""


def check_query(query: Query, max_task_chars: int = 2000, max_image_side: int = 8192) -> Modality:
    """Validate one query; return its modality. Raises QueryError with a clear message."""
    try:
        modality = Modality(query.modality)
    except (ValueError, AttributeError) as exc:
        raise QueryError(f"unknown modality {getattr(query, 'modality', None)!r}") from exc
    images = getattr(query, "images", None)
    if not isinstance(images, (list, tuple)):
        raise QueryError(f"images must be a list of HxWx3 uint8 arrays, got {type(images).__name__}")
    try:
        prompts.template_for(modality, len(images))
        prompts.check_task(query.task, max_task_chars)
    except prompts.PromptError as exc:
        raise QueryError(str(exc)) from exc
    for index, image in enumerate(images):
        if not isinstance(image, np.ndarray):
            raise QueryError(f"image {index}: expected a numpy array, got {type(image).__name__}")
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise QueryError(
                f"image {index}: expected HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype} "
                "(convert with lrm_reward.core.images.to_rgb_uint8)"
            )
        height, width = image.shape[:2]
        if height < 1 or width < 1:
            raise QueryError(f"image {index}: empty ({height}x{width})")
        if max(height, width) > max_image_side:
            raise QueryError(f"image {index}: {height}x{width} exceeds max_image_side={max_image_side}")
        if max(height, width) / min(height, width) > MAX_IMAGE_ASPECT:
            raise QueryError(f"image {index}: aspect ratio of {height}x{width} exceeds {MAX_IMAGE_ASPECT}:1")
    return modality


@dataclass(frozen=True)
class _Route:
    """Queries that can share one forward pass."""

    adapter: str | None
    modality: Modality
    generate: bool
    max_new_tokens: int = 0
    prefill: bool = False


class LocalRewardEngine(RewardEngine):
    """In-process transformers + peft backend.

    loaded: an already prepared model (``loading.adopt_model``), e.g. random 8B-shaped weights built on the
    GPU by the benchmark; normally None, and the model is loaded from cfg.
    """

    def __init__(self, cfg: EngineConfig, loaded: LoadedModel | None = None):
        from lrm_reward.core import loading, readouts

        self.cfg = cfg
        self.model_id = cfg.describe()
        self.stats = EngineStats()
        self._lock = threading.Lock()
        self._loaded = loaded or loading.load_model(
            cfg.base_model,
            cfg.adapters,
            device=cfg.device,
            dtype=cfg.dtype,
            attn_implementation=cfg.attn_implementation,
            local_files_only=cfg.local_files_only,
            processor=cfg.processor,
        )
        tokenizer = self._loaded.processor.tokenizer
        self._tries = {
            modality: readouts.build_candidate_trie(tokenizer, spec.answer_prefix, spec.answers)
            for modality, spec in prompts.PROMPT_SPECS.items()
        }
        self._active_adapter = self._loaded.adapter_names[0] if self._loaded.adapter_names else None
        self._fast = None
        self._fast_failures = 0  # consecutive unexpected fast-path failures; at 3 the fast path is turned off
        if cfg.fast_path:
            from lrm_reward.core.fast_readout import FastLogitsReadout
            from lrm_reward.core.prefix_cache import PrefixCache

            cache = (
                PrefixCache(cfg.prefix_cache_entries, cfg.prefix_cache_bytes) if cfg.prefix_cache else None
            )
            decoder = None
            if cfg.compile != "off":
                from lrm_reward.core.compiled_suffix import SuffixDecoder

                decoder = SuffixDecoder(self._loaded.model, cfg.compile)
            self._fast = FastLogitsReadout(
                self._loaded.model,
                self._loaded.processor,
                self._loaded.device,
                cfg.max_task_chars,
                cache,
                decoder=decoder,
                length_step=cfg.compile_length_step,
            )
            if decoder is not None and cfg.compile_warmup_batches:
                self.warm_up(cfg.compile_warmup_batches)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._loaded.adapter_names) if self._loaded else []

    @property
    def base_only(self) -> bool:
        """No adapters loaded: the base (or a merged) checkpoint answers, not the released reward model."""
        return bool(self._loaded) and self._loaded.base_only

    @property
    def prefix_cache(self):
        """The PrefixCache of the fast path (None when off), for diagnostics and benchmarks."""
        return self._fast.cache if self._fast is not None else None

    @property
    def model(self):
        """The loaded (PEFT-wrapped) model, for inspection and benchmarks."""
        return self._loaded.model if self._loaded else None

    def score(self, queries: list[Query]) -> list[Answer]:
        with self._lock, on_device(self._loaded.device if self._loaded else None):
            return self._score(list(queries))

    def warm_up(
        self, batches: tuple[int, ...] | list[int], modalities: tuple[Modality, ...] | None = None
    ) -> float:
        """Compile / capture the static suffix pass for these batch sizes; returns the seconds it took.

        Runs synthetic queries (frames of cfg.compile_warmup_image, a short task) through score() for every
        modality with an adapter (or `modalities`), so the shapes a camera of that resolution produces are
        ready before the first real query. Stops after cfg.compile_warmup_s (later shapes compile on first
        use). Leaves the query counters as they were and empties the prefix cache (of warm-up entries, and of
        any others: they are recomputed on their next miss). No-op when compile is "off".
        """
        import time

        fast = self._fast
        if fast is None or fast.decoder is None:
            return 0.0
        if modalities is None:
            names = self.adapter_names
            modalities = tuple(m for m in WARMUP_ORDER if not names or m.value in names)
        height, width = self.cfg.compile_warmup_image
        frame = np.full((height, width, 3), 128, dtype=np.uint8)
        counts = {Modality.PROGRESS: 2, Modality.CONTRASTIVE: 2, Modality.COMPLETION: 1}
        # cudagraph trees record on a later call than the one that compiles
        calls = 3 if self.cfg.compile == "reduce-overhead" else 2
        saved = dataclasses.replace(self.stats)
        start = time.perf_counter()
        done = []
        for modality in modalities:
            for batch in sorted({min(b, self.cfg.max_batch_size) for b in batches}):
                if time.perf_counter() - start > self.cfg.compile_warmup_s:
                    log.warning(
                        "compile warm-up stopped after %.0f s (compile_warmup_s); %s at batch %d and later "
                        "shapes compile on first use",
                        time.perf_counter() - start,
                        modality.value,
                        batch,
                    )
                    break
                queries = [Query(modality, WARMUP_TASK, [frame] * counts[modality]) for _ in range(batch)]
                for _ in range(calls):
                    self.score(queries)
                done.append(f"{modality.value}@{batch}")
        elapsed = time.perf_counter() - start
        if fast.cache is not None:
            fast.cache.clear()
        compile_fields = {name: getattr(self.stats, name) for name in _COMPILE_STAT_FIELDS}
        self.stats = dataclasses.replace(saved, **compile_fields)
        self.stats.compile_warmup_s += elapsed
        log.info(
            "suffix pass %s warmed up in %.1f s (%s; %d graphs, %d failures)",
            self.cfg.compile,
            elapsed,
            ", ".join(done) or "nothing",
            self.stats.compiled_graphs,
            self.stats.compile_failures,
        )
        return elapsed

    def close(self) -> None:
        with self._lock:
            if self._loaded is None:
                return
            if self._fast is not None and self._fast.cache is not None:
                self._fast.cache.clear()
            device = self._loaded.device
            self._fast = None
            self._loaded = None
            release_memory(device)

    # --- internals ------------------------------------------------------------------------------------

    def _score(self, queries: list[Query]) -> list[Answer]:
        answers: list[list[Answer]] = [[] for _ in queries]
        groups: dict[_Route, list[tuple[int, Query]]] = {}
        for index, query in enumerate(queries):
            try:
                routes = self._routes(query)
            except QueryError as exc:
                answers[index].append(_error_answer(query, f"bad query: {exc}"))
                continue
            # a copy with the modality as the enum and C-contiguous frames (flipped views are fine to pass)
            clean = dataclasses.replace(
                query, modality=routes[0].modality, images=[np.ascontiguousarray(i) for i in query.images]
            )
            for route in routes:
                groups.setdefault(route, []).append((index, clean))

        # progress first, so the shared vision tower is switched as rarely as possible
        order = sorted(groups, key=lambda r: (r.adapter != "progress", str(r.adapter), r.generate))
        for route in order:
            items = groups[route]
            for start in range(0, len(items), self.cfg.max_batch_size):
                chunk = items[start : start + self.cfg.max_batch_size]
                for (index, _), answer in zip(chunk, self._run_chunk(route, chunk), strict=True):
                    answers[index].append(answer)

        done = [
            average_answers(a) if a else _error_answer(q, "not scored")
            for a, q in zip(answers, queries, strict=True)
        ]
        self.stats.queries += len(done)
        self.stats.unparsed += sum(1 for a in done if not a.parsed)
        self.stats.errors += sum(1 for a in done if a.error and a.value is None)
        return done

    def _routes(self, query: Query) -> list[_Route]:
        """The passes that answer this query: one per adapter serving its modality (averaged after)."""
        if self._loaded is None:
            raise QueryError("engine is closed")
        modality = check_query(query, self.cfg.max_task_chars, self.cfg.max_image_side)
        adapters: list[str | None] = [None]
        if self._loaded.adapter_names:
            adapters = [n for n in self._loaded.adapter_names if adapter_modality(n) == modality.value]
            if not adapters:
                raise QueryError(f"no {modality.value!r} adapter loaded (have {self._loaded.adapter_names})")
        cot = modality is Modality.CONTRASTIVE and (query.chain_of_thought or self.cfg.chain_of_thought)
        if cot:  # reasoning only comes from decoding, whatever the readout
            tokens = self.cfg.max_new_tokens[modality.value]
            return [_Route(a, modality, True, tokens, False) for a in adapters]
        if self.cfg.readout is Readout.LOGITS:
            return [_Route(a, modality, False) for a in adapters]
        if modality is Modality.CONTRASTIVE:  # released prompt, reply started at its JSON answer
            return [_Route(a, modality, True, self.cfg.answer_max_new_tokens, True) for a in adapters]
        return [_Route(a, modality, True, self.cfg.max_new_tokens[modality.value], False) for a in adapters]

    def _run_chunk(self, route: _Route, items: list[tuple[int, Query]]) -> list[Answer]:
        import torch

        queries = [query for _, query in items]
        out_of_memory = failure = ""
        try:
            self.stats.forward_batches += 1
            return self._run(route, queries)
        except torch.cuda.OutOfMemoryError as exc:
            out_of_memory = str(exc)
        except Exception as exc:  # one bad query must not take its batch (or the caller) down
            if len(items) == 1:
                log.exception("query failed")
            failure = f"{type(exc).__name__}: {exc}"
        # Retries run here, after the except block: only the message is kept, so the exception, its traceback
        # and the failed pass's frames (which hold its activations) are gone before the memory is released
        # and the smaller batches run.
        if out_of_memory:
            release_memory(self._loaded.device)
            if len(items) > 1:
                self.stats.oom_retries += 1
                half = len(items) // 2
                log.warning("CUDA out of memory at batch %d: retrying at %d", len(items), half)
                return self._run_chunk(route, items[:half]) + self._run_chunk(route, items[half:])
            return [_error_answer(q, f"CUDA out of memory at batch size 1: {out_of_memory}") for q in queries]
        if len(items) > 1:
            log.warning("batch of %d failed (%s): retrying one by one", len(items), failure)
            return [answer for item in items for answer in self._run_chunk(route, [item])]
        return [_error_answer(queries[0], failure)]

    def _run(self, route: _Route, queries: list[Query]) -> list[Answer]:
        from lrm_reward.core import readouts

        loaded = self._loaded
        # ask the model (engines may share one, e.g. in the benchmark); switching moves no weights
        active = getattr(loaded.model, "active_adapter", self._active_adapter)
        if route.adapter is not None and route.adapter != active:
            loaded.model.set_adapter(route.adapter)
            self._active_adapter = route.adapter
        if route.generate:
            return readouts.generate_answers(
                loaded.model,
                loaded.processor,
                queries,
                max_new_tokens=route.max_new_tokens,
                prefill_answer_prefix=route.prefill,
                max_task_chars=self.cfg.max_task_chars,
            )
        if self._fast is not None:
            fast = self._run_fast(route, queries)
            if fast is not None:
                return fast
        return readouts.score_answer_sets(
            loaded.model,
            loaded.processor,
            queries,
            self._tries[route.modality],
            loaded.device,
            self.cfg.max_task_chars,
        )

    def _run_fast(self, route: _Route, queries: list[Query]) -> list[Answer] | None:
        """The logits fast path; None when it could not answer (the caller uses the plain path)."""
        import torch

        from lrm_reward.core.fast_readout import FastPathUnavailable

        fast = self._fast
        cache = fast.cache
        before = cache.stats() if cache is not None else None
        try:
            answers = fast.score(queries, self._tries[route.modality], route.adapter)
        except torch.cuda.OutOfMemoryError:
            if cache is not None:  # cached prefixes are the memory we can give back before halving
                cache.clear()
            raise
        except FastPathUnavailable as exc:
            self.stats.fast_path_fallbacks += 1
            log.info("fast path not applicable (%s): plain readout", exc)
            return None
        except Exception as exc:
            self.stats.fast_path_fallbacks += 1
            self._fast_failures += 1
            log.warning("fast path failed (%s: %s): plain readout for this batch", type(exc).__name__, exc)
            if self._fast_failures >= 3:
                log.error("fast path failed 3 times in a row: turned off for this engine")
                if cache is not None:
                    cache.clear()
                self._fast = None
            return None
        finally:
            if fast.decoder is not None:
                self._sync_compile_stats(fast.decoder.stats)
            if before is not None:
                after = cache.stats()
                self.stats.prefix_cache_hits += after.hits - before.hits
                self.stats.prefix_cache_misses += after.misses - before.misses
                self.stats.prefix_cache_evictions += after.evictions - before.evictions
        self._fast_failures = 0
        return answers

    def _sync_compile_stats(self, compiled) -> None:
        self.stats.compiled_graphs = compiled.graphs
        self.stats.compile_s = compiled.compile_s
        self.stats.compile_failures = compiled.failures
        self.stats.compile_eager_passes = compiled.eager_calls
        self.stats.compile_unexpected_recompiles = compiled.unexpected_recompiles


WARMUP_ORDER = (Modality.PROGRESS, Modality.COMPLETION, Modality.CONTRASTIVE)
WARMUP_TASK = "pick up the red block and put it in the box"
_COMPILE_STAT_FIELDS = (
    "compiled_graphs",
    "compile_s",
    "compile_failures",
    "compile_eager_passes",
    "compile_unexpected_recompiles",
    "compile_warmup_s",
)


def average_answers(answers: list[Answer]) -> Answer:
    """One query's answers from several adapters of its modality as one: the mean of their values and of
    their probabilities. A mean with a member missing is not the ensemble's answer: when any member failed
    the query is unparsed, with every member's error. One answer is returned as it is.

    With the generate readout completion answers are 0 or 1, so two average to 0, 0.5 or 1."""
    if len(answers) == 1:
        return answers[0]
    failed = [a for a in answers if not a.parsed or a.value is None]
    if failed:
        errors = "; ".join(sorted({a.error or "unparsed" for a in failed}))
        return Answer(
            modality=answers[0].modality,
            value=None,
            parsed=False,
            raw_text=" | ".join(a.raw_text for a in answers if a.raw_text),
            latency_s=sum(a.latency_s for a in answers),
            error=f"{len(failed)} of {len(answers)} averaged adapters failed: {errors}",
        )
    probabilities = None
    if all(a.probabilities for a in answers):
        keys = set().union(*(a.probabilities for a in answers))
        probabilities = {k: float(np.mean([a.probabilities.get(k, 0.0) for a in answers])) for k in keys}
    confidences = [a.confidence for a in answers if a.confidence is not None]
    confidence = float(np.mean(confidences)) if confidences else None
    if probabilities:  # the averaged distribution's most likely answer, as a single answer's
        confidence = max(probabilities.values())
    return Answer(
        modality=answers[0].modality,
        value=float(np.mean([a.value for a in answers])),
        parsed=True,
        confidence=confidence,
        probabilities=probabilities,
        raw_text=" | ".join(a.raw_text for a in answers if a.raw_text),
        latency_s=sum(a.latency_s for a in answers),
    )


def _error_answer(query: Query, error: str) -> Answer:
    try:
        modality = Modality(query.modality)
    except (ValueError, AttributeError):  # the Answer still needs some modality; the error says why
        modality = Modality.PROGRESS
    return Answer(modality=modality, value=None, parsed=False, error=error)


def _vllm_engine(cfg: EngineConfig) -> RewardEngine:
    from lrm_reward.core.vllm_client import VllmRewardEngine  # httpx loads only for this backend

    return VllmRewardEngine(cfg)


_BACKENDS: dict[str, Callable[[EngineConfig], RewardEngine]] = {
    "local": LocalRewardEngine,
    "vllm": _vllm_engine,
}


def register_backend(name: str, factory: Callable[[EngineConfig], RewardEngine]) -> None:
    """Add a backend (e.g. a remote server client) that make_engine can build by name."""
    if not name or not callable(factory):
        raise ValueError("a backend needs a name and a callable factory")
    _BACKENDS[name] = factory


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def make_engine(cfg: EngineConfig) -> RewardEngine:
    """Build the engine for cfg.backend. Raises ValueError (unknown backend) or loading.ModelLoadError."""
    factory = _BACKENDS.get(cfg.backend)
    if factory is None:
        raise ValueError(f"unknown engine backend {cfg.backend!r}; available: {available_backends()}")
    return factory(cfg)
