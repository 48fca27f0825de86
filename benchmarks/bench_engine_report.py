"""The tables of bench_engine.py: row columns, GiB cells, breakdown / numerics tables, failed rows."""

from __future__ import annotations

import sys
import traceback

import torch
from bench_engine_workload import GIB


def gib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / GIB:.2f}"


COLUMNS = (
    "variant",
    "batch",
    "q/s",
    "x hf-forward",
    "p50 call ms",
    "p95 call ms",
    "compile s",
    "peak GPU GiB",
    "errors",
    "fallbacks",
    "notes",
)


def print_breakdown(rows: list) -> None:
    if not rows:
        return
    print()
    print("# batch 1, where a steady-state progress query's time goes (median ms per score() call)")
    print(
        "| variant | total | processor | suffix pass net of processor | of which vision + embeddings "
        "| of which decoder (static pass) | rest (prompt, hashing, positions, readout) |"
    )
    print("|---|---|---|---|---|---|---|")

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, total, processor, suffix, vision, decoder in rows:
        rest = total - (processor or 0.0) - suffix
        print(
            f"| {name} | {fmt(total)} | {fmt(processor)} | {fmt(suffix)} | {fmt(vision)} | {fmt(decoder)} "
            f"| {fmt(rest)} |"
        )
    sys.stdout.flush()


def failed(label: str, exc: Exception, cuda: bool) -> None:
    """Report a failed row in the table (and its traceback on stderr), then go on."""
    print(f"| {label} | FAILED: {type(exc).__name__}: {str(exc)[:300]} |", flush=True)
    traceback.print_exception(exc, file=sys.stderr)
    if cuda:
        torch.cuda.empty_cache()


def guarded(label: str, cuda: bool, fn, *args):
    """fn(*args), or None (reported by failed()) when it raises."""
    try:
        return fn(*args)
    except Exception as exc:
        failed(label, exc, cuda)
        return None


def print_numerics(rows: list, batch: int, modalities: str) -> None:
    print()
    print(f"# numerics: fast path vs plain path on the same {batch} queries of each of {modalities}")
    print("| variant | modality | max abs diff of expected value | argmax identical | fallbacks |")
    print("|---|---|---|---|---|")
    for label, modality, diff, same, fallbacks in rows:
        print(f"| {label} | {modality} | {diff:.2e} | {'yes' if same else 'NO'} | {fallbacks} |")
    if not rows:
        print("| (failed: see above) | | | | |")
    sys.stdout.flush()
