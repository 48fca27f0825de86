"""The evaluation metrics against values worked out by hand."""

import math

import numpy as np
import pytest

from lrm_reward.adaptation import metrics as M


def test_ranks_share_ties():
    assert M.rank_average(np.array([10.0, 30.0, 20.0, 20.0])).tolist() == [1.0, 4.0, 2.5, 2.5]


def test_spearman_of_monotone_and_reversed_orders():
    t = np.linspace(0, 1, 7)
    assert M.spearman(t**2, t) == pytest.approx(1.0)
    assert M.spearman(-t, t) == pytest.approx(-1.0)


def test_spearman_by_hand_with_a_tie():
    # ranks x: [1, 2.5, 2.5, 4], y: [1, 2, 3, 4] -> centred dot 4.5, norms sqrt(4.5) * sqrt(5)
    assert M.spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))


def test_constant_prediction_has_no_order():
    assert M.spearman([0.3, 0.3, 0.3], [0, 1, 2]) == 0.0


def test_spearman_rejects_bad_input():
    with pytest.raises(ValueError):
        M.spearman([1.0], [1.0])
    with pytest.raises(ValueError):
        M.spearman([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        M.spearman([1.0, float("nan")], [1.0, 2.0])


def test_voc_averages_episodes():
    t = np.arange(5.0)
    assert M.value_order_correlation([(t, t), (-t, t)]) == pytest.approx(0.0)
    assert M.value_order_correlation([(t, t), (t, t)]) == pytest.approx(1.0)
    assert math.isnan(M.value_order_correlation([]))


def test_accuracy_and_f1():
    pred = np.array([1, 1, 0, 0, 1], dtype=bool)
    true = np.array([1, 0, 0, 1, 1], dtype=bool)
    assert M.accuracy(pred, true) == pytest.approx(3 / 5)
    # tp 2, fp 1, fn 1 -> 4 / 6
    assert M.f1_score(pred, true) == pytest.approx(4 / 6)
    assert M.f1_score(np.zeros(3, bool), np.ones(3, bool)) == 0.0


def test_ece_by_hand():
    p = np.array([0.05, 0.15, 0.95, 0.95])
    y = np.array([0, 0, 1, 0])
    # bins: 0 -> conf .05 acc 0 (share .25); 1 -> conf .15 acc 0 (.25); 9 -> conf .95 acc .5 (.5)
    expected = 0.25 * 0.05 + 0.25 * 0.15 + 0.5 * 0.45
    assert M.expected_calibration_error(p, y, 10) == pytest.approx(expected)
    assert M.expected_calibration_error(np.array([1.0, 0.0]), np.array([1, 0])) == pytest.approx(0.0)


def test_ece_rejects_probabilities_out_of_range():
    with pytest.raises(ValueError):
        M.expected_calibration_error([1.2], [1])


def test_reliability_curve_counts_bins():
    conf, freq, count = M.reliability_curve([0.1, 0.12, 0.9], [0, 1, 1], 10)
    assert count.tolist() == [2, 1]
    assert freq.tolist() == [0.5, 1.0]
    assert conf[0] == pytest.approx(0.11)
