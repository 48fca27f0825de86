"""Metrics for reward-model evaluation: value-order correlation, accuracy, F1, expected calibration error.

What this is for: the numbers ``lrm-eval-reward`` reports, as plain functions of numpy arrays so they can be
tested exactly. VOC follows GVL (value-order correlation): the Spearman rank correlation between predicted
progress and frame time within one successful episode, averaged over episodes.

What it is not: no model, no data loading, no plotting.
"""

from __future__ import annotations

import math

import numpy as np


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties sharing the mean of their ranks (as Spearman's rho needs)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=float)
    sorted_vals = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation in [-1, 1]; 0.0 when either side is constant (no order to compare).

    Raises ValueError on length mismatch, fewer than 2 points, or non-finite values.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-D arrays of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError("spearman needs at least 2 points")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman got non-finite values")
    rx, ry = rank_average(x), rank_average(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    if denom == 0.0:
        # A constant prediction carries no order information; GVL-style averaging counts it as 0.
        return 0.0
    return float((rx * ry).sum() / denom)


def value_order_correlation(episodes: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean over episodes of spearman(predicted values, frame times). NaN for no episodes."""
    if not episodes:
        return float("nan")
    return float(np.mean([spearman(pred, times) for pred, times in episodes]))


def accuracy(predicted, labels) -> float:
    """Fraction of equal entries; NaN for empty input."""
    predicted = np.asarray(predicted)
    labels = np.asarray(labels)
    if predicted.shape != labels.shape:
        raise ValueError(f"accuracy: shapes differ ({predicted.shape} vs {labels.shape})")
    if predicted.size == 0:
        return float("nan")
    return float((predicted == labels).mean())


def f1_score(predicted, labels) -> float:
    """Binary F1 of the positive class (True / 1). 0.0 when there are no true or predicted positives."""
    predicted = np.asarray(predicted).astype(bool)
    labels = np.asarray(labels).astype(bool)
    if predicted.shape != labels.shape:
        raise ValueError(f"f1_score: shapes differ ({predicted.shape} vs {labels.shape})")
    if predicted.size == 0:
        return float("nan")
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    if tp == 0:
        return 0.0
    return 2.0 * tp / (2.0 * tp + fp + fn)


def expected_calibration_error(probabilities, labels, n_bins: int = 10) -> float:
    """ECE of P(positive): sum over equal-width confidence bins of |bin accuracy - bin confidence| * share.

    Uses the probability of the positive class directly (reliability of P(yes)); bins are [0, 1/n), ...,
    [(n-1)/n, 1]. NaN for empty input; ValueError for probabilities outside [0, 1].
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(labels).astype(float)
    if p.shape != y.shape:
        raise ValueError(f"expected_calibration_error: shapes differ ({p.shape} vs {y.shape})")
    if p.size == 0:
        return float("nan")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += abs(float(y[mask].mean()) - float(p[mask].mean())) * float(mask.mean())
    return ece


def reliability_curve(probabilities, labels, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean confidence, observed frequency, count) per non-empty bin, for a reliability plot."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(labels).astype(float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    conf, freq, count = [], [], []
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            conf.append(float(p[mask].mean()))
            freq.append(float(y[mask].mean()))
            count.append(int(mask.sum()))
    return np.array(conf), np.array(freq), np.array(count)
