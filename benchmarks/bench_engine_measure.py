"""The measurements of bench_engine.py: timed calls, run budget, stage breakdown, numerics, memory."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from bench_engine_report import gib
from bench_engine_workload import GIB, TASK, frames, stream_queries

from lrm_reward.core.types import Modality, Query


def measure(
    scorer, queries: list[Query], repeats: int, warmup: int, cuda: bool, before_each=None, after_warmup=None
) -> dict:
    """Times repeats calls of scorer.score(queries); before_each runs untimed before every call."""
    for _ in range(warmup):
        if before_each:
            before_each()
        scorer.score(queries)
    if after_warmup:
        after_warmup()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, errors = [], 0
    for _ in range(repeats):
        if before_each:
            before_each()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        answers = scorer.score(queries)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        errors += sum(1 for a in answers if getattr(a, "error", None) and getattr(a, "value", 0) is None)
    times.sort()
    return dict(
        qps=len(queries) * len(times) / sum(times),
        p50=statistics.median(times),
        p95=times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
        errors=errors,
        peak=torch.cuda.max_memory_allocated() if cuda else None,
    )


class Budget:
    """Wall-clock budget of the whole run (0 = none): rows that would start too late are skipped."""

    def __init__(self, seconds: float, started: float):
        self.seconds = seconds
        self.started = started
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, label: str, needed_s: float) -> bool:
        if self.seconds <= 0 or self.elapsed() + needed_s <= self.seconds:
            return True
        self.skipped.append(label)
        print(
            f"| {label} | skipped: {self.elapsed():.0f} s of --budget-s {self.seconds:.0f} used |", flush=True
        )
        return False


def compile_notes(scorer, before) -> str:
    """What the static suffix pass did during a row (empty for engines without it)."""
    stats = getattr(scorer, "stats", None)
    fast = getattr(scorer, "_fast", None)
    decoder = getattr(fast, "decoder", None) if fast is not None else None
    if stats is None or scorer.cfg.compile == "off":
        return ""
    notes = [f"{stats.compiled_graphs} graphs"]
    if decoder is None or not decoder.active:
        reason = decoder.disabled_reason if decoder is not None else "fast path off"
        notes.append(f"STATIC PATH OFF ({reason})"[:160])
    vision = getattr(fast, "vision", None) if fast is not None else None
    if vision is not None and not vision.active:
        notes.append(f"STATIC VISION OFF ({vision.disabled_reason})"[:160])
    elif vision is not None and vision.failures:  # out of memory while capturing: the tower ran eagerly
        notes.append(f"VISION GRAPHS OFF ({vision.failures} capture failures)")
    if stats.compile_eager_passes > before.compile_eager_passes:
        notes.append(f"{stats.compile_eager_passes - before.compile_eager_passes} eager passes")
    if stats.compile_unexpected_recompiles > before.compile_unexpected_recompiles:
        notes.append("UNEXPECTED RECOMPILES")
    return "; ".join(notes)


class _TimedDecoder:
    """Stands in for a SuffixDecoder and times its calls (synchronised), for the breakdown."""

    def __init__(self, inner, times: list[float], cuda: bool):
        self.inner, self.times, self.cuda = inner, times, cuda

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args):
        return _timed_call(self.inner, args, self.times, self.cuda)


def _timed_call(fn, args, times: list[float], cuda: bool):
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if cuda:
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
    return out


def breakdown(name: str, engine, queries: list[Query], cuda: bool, repeats: int) -> tuple:
    """Median ms per score() call at batch 1, split into stages (steady state: prefix cached)."""
    fast = engine._fast
    stages = {key: [] for key in ("total", "processor", "suffix pass", "vision + embeddings", "decoder")}
    # at steady state (prefix cached) the suffix's inputs are the only processor work of a call
    wrapped = {
        "_encode_suffixes": "processor",
        "_suffix_pass": "suffix pass",
        "_embeddings": "vision + embeddings",
    }
    for method, stage in wrapped.items():
        original = getattr(fast, method)
        setattr(fast, method, lambda *args, _fn=original, _t=stages[stage]: _timed_call(_fn, args, _t, cuda))
    decoder = fast.decoder
    if decoder is not None:
        fast.decoder = _TimedDecoder(decoder, stages["decoder"], cuda)
    try:
        engine.score(queries)  # prefix cached, shapes warm
        for values in stages.values():
            values.clear()
        for _ in range(repeats):
            _timed_call(engine.score, (queries,), stages["total"], cuda)
    finally:
        for method in wrapped:
            delattr(fast, method)
        fast.decoder = decoder
    median = {key: statistics.median(values) * 1e3 if values else None for key, values in stages.items()}
    # processor runs once per call here (prefix cached): inside the suffix pass
    net_suffix = median["suffix pass"] - (median["processor"] or 0.0)
    return (
        name,
        median["total"],
        median["processor"],
        net_suffix,
        median["vision + embeddings"],
        median["decoder"],
    )


def numerics(slow: dict, fast: dict, names: list[str], initials, batch: int, completion: bool) -> list:
    """Fast vs plain on the same inputs: max |diff| of the expected value and argmax agreement (rows)."""
    rows = []
    rng = np.random.default_rng(1)
    modalities = (Modality.PROGRESS, Modality.COMPLETION) if completion else (Modality.PROGRESS,)
    for modality in modalities:
        queries = stream_queries(modality, batch, rng, initials)
        reference = slow["plain"].score(queries)
        runs = [("one-pass", slow["one-pass"], "")] if completion else []
        for name in names:
            runs += [(name, fast[name], " (miss)"), (name, fast[name], " (hit)")]
        for name in names:
            if fast[name].prefix_cache is not None:
                fast[name].prefix_cache.clear()
        for name, engine, suffix in runs:
            before = fallback_count(engine)
            answers = engine.score(queries)
            fallbacks = fallback_count(engine) - before
            diff = max(abs(a.value - b.value) for a, b in zip(answers, reference, strict=True))
            same = all(argmax(a) == argmax(b) for a, b in zip(answers, reference, strict=True))
            rows.append((name + suffix, modality.value, diff, same, fallbacks))
    return rows


def four_streams(engine, rng, cuda: bool, weights_bytes: int | None, modes: list[str]) -> None:
    """Memory with three adapters resident and prefix caches for 4 streams (progress + completion)."""
    print()
    print("# 4 streams x (progress + completion), three adapters resident, prefix caches kept")
    print(
        "| compile | cached prefixes | prefix cache MiB | weights+adapters GiB | peak alloc GiB | "
        "peak reserved GiB | 24 GB card |"
    )
    print("|---|---|---|---|---|---|---|")
    initials = frames(rng, 4)
    tasks = [f"{TASK} (stream {i})" for i in range(4)]  # own task per stream: own completion prefix too
    for mode in modes:
        fast = engine(prefix_cache_entries=64, prefix_cache_bytes=64 * GIB, compile=mode)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(3):  # three rounds: every stream queries progress and completion, all in one call
            progress = stream_queries(Modality.PROGRESS, 4, rng, initials, tasks)
            fast.score(progress + stream_queries(Modality.COMPLETION, 4, rng, tasks=tasks))
        stats = fast.prefix_cache.stats()
        peak = torch.cuda.max_memory_allocated() if cuda else None
        reserved = torch.cuda.max_memory_reserved() if cuda else None
        cached = stats.bytes / 2**20
        # a CUDA context takes roughly another 0.5 GiB outside the allocator
        verdict = "-"
        if cuda:
            verdict = "fits" if reserved + 0.5 * GIB <= 24e9 else "does NOT fit"
        print(
            f"| {mode} | {stats.entries} | {cached:.2f} | {gib(weights_bytes)} | {gib(peak)} "
            f"| {gib(reserved)} | {verdict} |",
            flush=True,
        )
        fast.close()


def fallback_count(scorer) -> int:
    """Batches the fast path handed to the plain path (a fast-path row with fallbacks measured plain)."""
    stats = getattr(scorer, "stats", None)
    return stats.fast_path_fallbacks if stats is not None else 0


def argmax(answer) -> str:
    return max(answer.probabilities, key=answer.probabilities.get)
