"""`make demo` in its --quick form, end to end: sim -> ROS nodes -> judge -> refine -> rollouts -> report.

Runs scripts/demo.py in a child process (inside the test run's loopback-only namespace) and checks that
every number in the result comes from what happened: episode counts, ground truth vs. judgments, the
confusion matrix, the recorded datasets and the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ros]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "ROS_DOMAIN_ID": os.environ.get("ROS_DOMAIN_ID", "42")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--rounds", "3", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "state.json").read_text()), proc


def test_every_stage_finished_and_the_report_exists(quick_demo):
    out, state, _ = quick_demo
    done = state["done"]
    for stage in (
        "demos",
        "reward",
        "policy",
        "rollout1",
        "judge1",
        "refine1",
        "rollout2",
        "judge2",
        "refine2",
        "rollout3",
        "judge3",
        "report",
    ):
        assert stage in done, stage
    assert "refine3" not in done  # no refinement after the last round
    html = (out / "report.html").read_text()
    assert "Judge vs. ground truth" in html and "data:image/png;base64," in html
    assert "Success per round" in html and "round 3" in html
    assert "Progress curves, successes vs. failures" in html
    assert "ros2 launch lrm_reward reward.launch.py" in html


def test_rollouts_were_recorded_through_the_nodes_with_live_rewards(quick_demo):
    _, state, _ = quick_demo
    import pandas as pd

    for name in ("rollout1", "rollout2", "rollout3"):
        roll = state["done"][name]
        assert len(roll["episodes"]) == state["settings"]["episodes"]
        assert roll["successes"] == sum(e["success"] for e in roll["episodes"])
        assert roll["reward_messages"] > 0
        files = sorted(Path(roll["dataset"], "data").rglob("*.parquet"))
        df = pd.concat([pd.read_parquet(f) for f in files])
        assert sorted(df["episode_index"].unique()) == [e["episode_index"] for e in roll["episodes"]]
        assert df["reward.progress"].notna().any()  # reward_node scored live and the recorder kept it
        # the sim's perception output came over ROS and was recorded for every frame
        env = np.stack(df["observation.environment_state"].to_numpy())
        assert env.shape == (len(df), 6) and np.all(np.isfinite(env))
        sidecars = sorted(Path(roll["dataset"], "recording").glob("episode_*.json"))
        assert len(sidecars) == len(roll["episodes"])
        assert all("simulator ground truth" in json.loads(p.read_text())["notes"] for p in sidecars)


def test_recorded_rollouts_pair_each_observation_with_the_action_chosen_from_it(quick_demo):
    """Replaying the recorded observations through the policy gives the recorded actions, frame by frame.

    Guards the stamping contract between sim_robot_node and the recorder: an action stamped with the frame
    it produced (one step late) would train refined policies on a lag.
    """
    _, state, _ = quick_demo
    import pandas as pd
    import torch

    from lrm_reward.sim.policy_controller import LeRobotPolicyController
    from lrm_reward.sim.so101_scene import TASK

    roll = state["done"]["rollout1"]
    controller = LeRobotPolicyController(Path(state["done"]["policy"]["path"]))
    files = sorted(Path(roll["dataset"], "data").rglob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files])
    episode = df[df["episode_index"] == roll["episodes"][0]["episode_index"]].sort_values("frame_index")
    assert len(episode) > 12  # past the first action chunk (10 steps): a second inference is checked too
    controller.reset()
    for _, row in episode.head(25).iterrows():
        obs = {
            "task": [TASK],
            **{
                key: torch.from_numpy(np.array(row[key], dtype=np.float32)).unsqueeze(0)
                for key in controller.input_features
            },
        }
        with torch.inference_mode():
            action = controller.post(controller.policy.select_action(controller.pre(obs)))
        np.testing.assert_allclose(
            action.reshape(-1).numpy(),
            np.asarray(row["action"]),
            atol=1e-3,
            err_msg=f"frame {row['frame_index']}",
        )


def test_confusion_matrix_matches_ground_truth_and_judgments(quick_demo):
    _, state, _ = quick_demo
    for stage in ("judge1", "judge2", "judge3"):
        judged = state["done"][stage]
        m = judged["matrix"]
        rows = judged["rows"]
        assert sum(m.values()) == len(rows) > 0
        assert m["tp"] == sum(r["success"] and r["judged_success"] for r in rows)
        assert m["tn"] == sum(not r["success"] and not r["judged_success"] for r in rows)
        assert judged["accuracy"] == pytest.approx((m["tp"] + m["tn"]) / len(rows))
        # VOC only for real successes with a curve to rank, and it is a correlation
        for r in rows:
            assert (r["voc"] is not None) == (r["success"] and len(r["curve"]) > 2)
            assert r["voc"] is None or -1.0 <= r["voc"] <= 1.0


def test_each_round_refined_a_new_policy_version_and_the_next_round_used_it(quick_demo):
    _, state, _ = quick_demo
    done = state["done"]
    assert done["refine1"]["parent"] == done["policy"]["version"]
    assert done["refine2"]["parent"] == done["refine1"]["version"]
    versions = {done[k]["version"] for k in ("policy", "refine1", "refine2")}
    assert len(versions) == 3
    assert done["rollout2"]["policy_version"] == done["refine1"]["version"]
    assert done["rollout3"]["policy_version"] == done["refine2"]["version"]
    assert Path(done["refine2"]["path"], "config.json").is_file()
    # the reward model says what it learned from: labelled sim episodes on layouts the rollouts never use
    trained_on = done["reward"]["trained_on"]
    assert len(trained_on["reward_episodes"]) == state["settings"]["reward_episodes"]
    rollout_seeds = {e["seed"] for e in done["rollout1"]["episodes"]}
    assert rollout_seeds.isdisjoint(e["seed"] for e in trained_on["reward_episodes"])
    # a copy of its base's vision tower first learnt from those episodes' frames: the run's base (judge and
    # nodes load it), with the completion adapter trained again on it; progress from the plain base's run
    vision = done["reward"]["base_vision"]
    assert vision["steps"] == state["settings"]["reward_steps"] and vision["frames"] > 0
    assert Path(done["reward"]["base"]) == Path(done["reward"]["cache"]) / "base"
    assert Path(done["reward"]["base"], "config.json").is_file()
    adapters = Path(done["reward"]["adapters"])
    completion = json.loads((adapters / "completion" / "lrm_adapter.json").read_text())
    progress = json.loads((adapters / "progress" / "lrm_adapter.json").read_text())
    assert completion["config"]["modalities"] == ["completion"]
    assert progress["config"]["modalities"] == ["completion", "progress", "contrastive"]
    # what training recorded names the cache, not the scratch folder it was made in
    assert Path(completion["base_model"]) == Path(done["reward"]["base"])
    assert Path(progress["base_model"]).is_dir()
    # a state-only policy (joints + object positions), and refinement kept its inputs
    for stage in ("policy", "refine1", "refine2"):
        meta = json.loads(Path(done[stage]["path"], "metadata.json").read_text())
        assert meta["policy_inputs"] == ["observation.state", "observation.environment_state"]
    # the same seeds in both rounds, so before/after compare the same layouts
    assert [e["seed"] for e in done["rollout1"]["episodes"]] == [
        e["seed"] for e in done["rollout2"]["episodes"]
    ]


def test_a_rerun_continues_instead_of_starting_over(quick_demo):
    out, state, _ = quick_demo
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py"), "--quick", "--rounds", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "continuing the run" in proc.stdout + proc.stderr
    again = json.loads((out / "state.json").read_text())
    assert again["done"]["rollout1"] == state["done"]["rollout1"]
