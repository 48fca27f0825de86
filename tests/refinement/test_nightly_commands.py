"""The nightly run's commands: judged through the running reward node (no model of its own) or with a model
loaded by lrm-judge, never both; refine after judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from lrm_reward.refinement.nightly import JUDGE_MODULE, REFINE_MODULE, NightlyConfig


def config(**kw) -> NightlyConfig:
    return NightlyConfig(datasets=[Path("/data/day")], store=Path("/store"), policy="act_pick", **kw)


def test_judging_via_the_reward_node_loads_no_model():
    judge, refine = config(
        judge_via_node="/reward_node/judge_episodes", judge_adapters="progress=/a"
    ).commands()
    assert judge[judge.index(JUDGE_MODULE) + 1 :][:3] == [
        "/data/day",
        "--via-node",
        "/reward_node/judge_episodes",
    ]
    assert not {"--model", "--adapters", "--device", "--dtype"} & set(judge)
    assert REFINE_MODULE in refine


def test_judging_with_a_model_of_its_own_and_without_judging():
    judge, _ = config(judge_model="/models/base", judge_adapters="progress=/a").commands()
    assert judge[judge.index("--model") + 1] == "/models/base" and "--adapters" in judge
    assert "--via-node" not in judge
    (refine,) = config().commands()  # nothing to judge with: refine only
    assert REFINE_MODULE in refine


def test_a_model_and_a_node_exclude_each_other():
    with pytest.raises(ValueError, match="exclude each other"):
        config(judge_model="/models/base", judge_via_node="/reward_node")


def test_judge_thresholds_reach_lrm_judge():
    judge, _ = config(
        judge_model="/models/base", progress_threshold=0.5, progress_success_threshold=0.95
    ).commands()
    assert judge[judge.index("--progress-threshold") + 1] == "0.5"
    assert judge[judge.index("--progress-success-threshold") + 1] == "0.95"
    judge, _ = config(judge_model="/models/base").commands()
    assert "--progress-success-threshold" not in judge
