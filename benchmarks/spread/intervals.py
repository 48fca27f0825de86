"""Mean success deltas with bootstrap 95% intervals, for policy_spread's tables (numpy only).

The data of one comparison is a grid: training seeds x evaluation layouts, each cell the difference of two
outcomes (1 success, 0 failure) on the same layout with the same seed (an arm and its base, a round and the
first round). Seeds and layouts are both samples (of training runs, of scenes), so the bootstrap resamples
both, independently, with replacement, and every resampled seed keeps every resampled layout (the crossed
two-way bootstrap). Percentile intervals, a fixed rng seed: the same numbers give the same interval.

What it is not: a significance test. With 3 seeds the seed resampling has only 10 distinct draws; the
interval says how far the mean could move with other seeds and layouts of the same kind, not more.
"""

from __future__ import annotations

import numpy as np

DRAWS = 10_000
RNG_SEED = 0
LEVEL = 0.95
RESAMPLED = (
    f"crossed bootstrap, {DRAWS} draws, rng seed {RNG_SEED}: training seeds and layouts resampled "
    "independently with replacement, percentile interval"
)


def bootstrap_interval(delta: np.ndarray, draws: int = DRAWS, seed: int = RNG_SEED) -> tuple[float, float]:
    """95% interval of delta.mean() for a (seeds, layouts) grid, by the crossed bootstrap."""
    delta = np.asarray(delta, dtype=np.float64)
    if delta.ndim != 2 or delta.size == 0:
        raise ValueError(f"expected a non-empty (seeds, layouts) grid, got shape {delta.shape}")
    n_seeds, n_layouts = delta.shape
    rng = np.random.default_rng(seed)
    # How often each seed and each layout is drawn: the mean of the resampled grid is then one product.
    seed_counts = _counts(rng.integers(0, n_seeds, (draws, n_seeds)), n_seeds)
    layout_counts = _counts(rng.integers(0, n_layouts, (draws, n_layouts)), n_layouts)
    means = np.einsum("ds,sl,dl->d", seed_counts, delta, layout_counts) / (n_seeds * n_layouts)
    alpha = (1.0 - LEVEL) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _counts(draws: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((draws.shape[0], n))
    np.add.at(out, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    return out


def compare(outcomes: np.ndarray, reference: np.ndarray) -> dict:
    """outcomes, reference: (seeds, layouts) of 0/1 on the same layouts. Successes are counted per seed over
    the layouts given, so the mean delta and its interval are in successes out of that many layouts."""
    outcomes = np.asarray(outcomes, dtype=np.int64)
    reference = np.asarray(reference, dtype=np.int64)
    if outcomes.shape != reference.shape:
        raise ValueError(f"shapes differ: {outcomes.shape} vs {reference.shape}")
    n_layouts = outcomes.shape[1]
    wins = outcomes.sum(axis=1)
    deltas = wins - reference.sum(axis=1)
    row = {
        "layouts": n_layouts,
        "successes": [int(w) for w in wins],
        "mean": float(wins.mean()),
        "delta": [int(d) for d in deltas],
        "mean_delta": float(deltas.mean()),
        "interval": None,
    }
    if n_layouts:
        lo, hi = bootstrap_interval(outcomes - reference)
        row["interval"] = [lo * n_layouts, hi * n_layouts]
    return row


def interval_text(row: dict) -> str:
    if row["interval"] is None:
        return "—"
    lo, hi = row["interval"]
    return f"{row['mean_delta']:+.1f} [{lo:+.1f}, {hi:+.1f}]"
