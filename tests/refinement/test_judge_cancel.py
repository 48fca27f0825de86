"""Judge runs that are watched and stopped halfway: progress after every model call, and a stop between
two model calls leaves no half-written judgment (the episode under way has no file at all); the next run
resumes."""

from __future__ import annotations

import json

import pytest
from judged_data import BrightnessEngine, record

from lrm_reward.refinement.judge import (
    JUDGMENTS_DIR,
    JudgeCanceledError,
    JudgeConfig,
    judge_dataset,
    judgment_path,
    load_judgments,
)
from lrm_reward.refinement.judge_cli import build_arg_parser

# 20 frames per episode, every_k 5 -> 5 progress + 3 completion queries; 2 per call -> 4 calls per episode
CFG = JudgeConfig(completion_last_n=3, curve_every_k=5, max_queries_per_call=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return record(root, "night", [("stack the cups", 220.0), ("stack the cups", 60.0), ("open it", 230.0)])


def test_progress_is_reported_after_every_model_call(dataset):
    seen = []
    judge_dataset(dataset, BrightnessEngine(), CFG, progress_bar=False, on_progress=seen.append, force=True)
    assert seen[0].episodes_done == 0 and seen[0].episode_index == -1
    assert seen[-1].episodes_done == seen[-1].episodes_total == 3 and seen[-1].episode_index == -1
    during = [p for p in seen if p.episode_index == 1]
    assert [(p.queries_done, p.queries_total) for p in during] == [(2, 8), (4, 8), (6, 8), (8, 8)]
    assert all(p.episodes_done == 1 for p in during)


def test_a_stop_halfway_leaves_no_half_judgment_and_the_next_run_resumes(dataset):
    for path in (dataset / JUDGMENTS_DIR).glob("episode_*.json"):
        path.unlink()
    engine = BrightnessEngine()
    calls = []

    def should_stop() -> bool:  # asked before every model call: stop in the middle of episode 1
        calls.append(engine.queries)
        return engine.queries >= 8 + 4  # episode 0 (8 queries) and half of episode 1

    with pytest.raises(JudgeCanceledError, match="stopped during episode 1") as stopped:
        judge_dataset(dataset, engine, CFG, progress_bar=False, should_stop=should_stop)
    assert [j.episode_index for j in stopped.value.judged] == [0]
    assert engine.queries == 12  # no model call after the stop
    assert judgment_path(dataset, 0).exists()
    assert not judgment_path(dataset, 1).exists() and not judgment_path(dataset, 2).exists()
    assert not list((dataset / JUDGMENTS_DIR).glob("*.tmp"))  # nothing half written
    assert json.loads(judgment_path(dataset, 0).read_text())["num_frames"] == 20

    resumed = judge_dataset(dataset, BrightnessEngine(), CFG, progress_bar=False)
    assert [j.episode_index for j in resumed.judged] == [1, 2] and resumed.skipped == [0]
    assert sorted(load_judgments(dataset)) == [0, 1, 2]


def test_the_cli_takes_a_model_or_a_node_never_both():
    parser = build_arg_parser()
    assert parser.parse_args(["ds", "--via-node", "/reward_node"]).via_node == "/reward_node"
    assert parser.parse_args(["ds", "--model", "m"]).model == "m"
    for argv in (["ds"], ["ds", "--model", "m", "--via-node", "/reward_node"]):
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(argv)
        assert exited.value.code == 2
