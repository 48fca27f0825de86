"""The nightly run's commands: judged through the running reward node (no model of its own) or with a model
loaded by lrm-judge, never both; refine after judge; with keep_best, lrm-policy promote --best between."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from store_records import add_episode, add_version

from lrm_reward.refinement.nightly import JUDGE_MODULE, POLICY_MODULE, REFINE_MODULE, NightlyConfig
from lrm_reward.refinement.policy_store import PolicyStore


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


def test_keep_best_runs_between_judge_and_refine_and_moves_current(tmp_path):
    store = PolicyStore(tmp_path / "policies", "act_pick")
    add_version(store, None, [], 0.5)
    add_version(store, "act_pick/v0001", [], 0.4)  # v0002, current
    data = tmp_path / "data"
    cfg = NightlyConfig(
        datasets=[data / "night2"],
        store=store.root,
        policy="act_pick",
        judge_via_node="/reward_node/judge_episodes",
        data_root=data,
        keep_best=True,
        keep_best_min_judged=4,
    )
    judge, best, refine = cfg.commands()
    assert JUDGE_MODULE in judge and POLICY_MODULE in best and REFINE_MODULE in refine
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # first nights: no version has 4 judged episodes yet, current stays and the night goes on to refine
    run = subprocess.run(best, capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    assert "current stays" in run.stdout and store.current().version == "v0002"
    for i in range(4):  # v0001 did better on the robot than last night's v0002
        add_episode(data / "night1", i, "act_pick/v0001", "unknown", i < 3)
        add_episode(data / "night2", i, "act_pick/v0002", "unknown", i < 1)
    run = subprocess.run(best, capture_output=True, text=True, env=env, check=False)
    assert run.returncode == 0, run.stderr
    assert "best on the robot: v0001" in run.stdout and store.current().version == "v0001"
    with pytest.raises(ValueError, match="keep_best needs the data root"):
        config(keep_best=True)
