"""Judge vs. operator labels: agreement at the configured threshold, the best threshold on the labels,
and the files lrm-judge leaves next to the judgments."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from judged_data import BrightnessEngine, record

from lrm_reward.refinement.calibration import calibrate, load_calibration
from lrm_reward.refinement.judge import JudgeConfig, calibrate_against_operator, judge_dataset


def judged(index: int, label: str | None, completion: float, progress: float = 1.0, verdict: str = "x"):
    return SimpleNamespace(
        episode_index=index,
        recorded_outcome=label,
        completion_prob=completion,
        final_progress=progress,
        verdict=verdict,
    )


def test_counts_agreement_and_finds_the_threshold_that_separates_the_labels():
    # the judge is shy: real successes sit at 0.3-0.45, failures at 0.05-0.2 -> at 0.5 it misses them all
    episodes = [judged(i, "success", p) for i, p in enumerate([0.3, 0.35, 0.4, 0.45, 0.42])]
    episodes += [judged(10 + i, "failure", p) for i, p in enumerate([0.05, 0.1, 0.2, 0.15, 0.12])]
    episodes.append(judged(20, "unknown", 0.9))  # not labelled: left out
    cal = calibrate(episodes, success_threshold=0.5)
    assert cal.matrix == {"tp": 0, "fp": 0, "fn": 5, "tn": 5}
    assert cal.balanced_accuracy == pytest.approx(0.5)
    assert 0.2 < cal.suggested_threshold < 0.3  # any split between the classes separates them
    assert cal.suggested_threshold == pytest.approx(0.25)  # the one closest to the configured 0.5
    assert cal.suggested_balanced_accuracy == pytest.approx(1.0)
    assert (cal.successes, cal.failures) == (5, 5) and not cal.notes
    assert "agrees on 5 (TP 0 FP 0 FN 5 TN 5)" in cal.summary() and "0.25 separates best" in cal.summary()


def test_keeps_the_configured_threshold_when_nothing_separates_better():
    episodes = [judged(0, "success", 0.9), judged(1, "failure", 0.1), judged(2, "success", 0.7)]
    cal = calibrate(episodes, success_threshold=0.5)
    assert cal.matrix == {"tp": 2, "fp": 0, "fn": 0, "tn": 1}
    assert cal.suggested_threshold == 0.5 and cal.suggested_balanced_accuracy == pytest.approx(1.0)
    assert any("few labels" in n for n in cal.notes)


def test_unsure_nan_and_progress_rule_are_never_successes():
    episodes = [
        judged(0, "success", 0.9, verdict="unsure"),
        judged(1, "success", math.nan),
        judged(2, "success", 0.9, progress=0.2),  # fails the progress rule
        judged(3, "failure", 0.1),
    ]
    cal = calibrate(episodes, success_threshold=0.5, progress_threshold=0.8)
    assert cal.matrix == {"tp": 0, "fp": 0, "fn": 3, "tn": 1}
    assert any("progress_threshold 0.80 kept" in n for n in cal.notes)


def test_applies_the_judges_progress_success_rule():
    # two successes the completion adapter missed, one with final progress past the rule's 0.95
    episodes = [judged(0, "success", 0.1, progress=0.97), judged(1, "success", 0.1, progress=0.8)]
    episodes += [judged(2, "failure", 0.1, progress=0.9), judged(3, "success", 0.9, progress=0.5)]
    assert calibrate(episodes, success_threshold=0.5).matrix == {"tp": 1, "fp": 0, "fn": 2, "tn": 1}
    cal = calibrate(episodes, success_threshold=0.5, progress_success_threshold=0.95)
    assert cal.matrix == {"tp": 2, "fp": 0, "fn": 1, "tn": 1}
    assert cal.progress_success_threshold == 0.95
    assert any("progress_success_threshold 0.95 kept" in n for n in cal.notes)


def test_needs_labels_of_both_kinds_for_a_suggestion():
    assert calibrate([judged(0, None, 0.9), judged(1, "unknown", 0.2)], 0.5) is None
    cal = calibrate([judged(0, "success", 0.9), judged(1, "success", 0.2)], 0.5)
    assert cal.matrix == {"tp": 1, "fp": 0, "fn": 1, "tn": 0}
    assert cal.suggested_threshold is None and cal.balanced_accuracy is None
    assert "no episode labelled failure" in cal.summary()


def test_lrm_judge_writes_calibration_next_to_the_judgments(tmp_path):
    # brightness engine: completion = P(brightness > 150); the operator disagrees once (episode 2)
    ds = record(
        tmp_path,
        "night",
        [
            ("stack the cups", 220.0, "success"),
            ("stack the cups", 60.0, "failure"),
            ("stack the cups", 140.0, "success"),  # dim but done: the judge says ~0.27
            ("stack the cups", 230.0, "unknown"),
        ],
    )
    cfg = JudgeConfig(completion_last_n=3, curve_every_k=5)
    judge_dataset(ds, BrightnessEngine(), cfg, progress_bar=False)
    line = calibrate_against_operator(ds, cfg)
    assert "operator labels on 3 episodes (2 success, 1 failure)" in line
    assert "agrees on 2 (TP 1 FP 0 FN 1 TN 1)" in line
    stored = load_calibration(ds)
    assert stored["matrix"] == {"tp": 1, "fp": 0, "fn": 1, "tn": 1}
    assert [e["episode_index"] for e in stored["episodes"]] == [0, 1, 2]
    assert stored["suggested_balanced_accuracy"] == pytest.approx(1.0)
    low = next(e["completion_prob"] for e in stored["episodes"] if e["episode_index"] == 1)
    dim = next(e["completion_prob"] for e in stored["episodes"] if e["episode_index"] == 2)
    assert low < stored["suggested_threshold"] <= dim
    png = ds / "judgments" / "calibration.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((ds / "judgments" / "calibration.json").read_text())["successes"] == 2


def test_without_labels_it_says_how_to_get_them(tmp_path):
    ds = record(tmp_path, "night", [("stack the cups", 220.0)])
    cfg = JudgeConfig(completion_last_n=3, curve_every_k=5)
    judge_dataset(ds, BrightnessEngine(), cfg, progress_bar=False)
    assert "OUTCOME_SUCCESS" in calibrate_against_operator(ds, cfg)
    assert load_calibration(ds) is None
