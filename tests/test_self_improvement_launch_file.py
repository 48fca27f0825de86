"""self_improvement.launch.py's own logic, without starting anything: every argument is described, shared
settings reach every node that needs them (data_root, task, policy), topics are remapped consistently with
and without the simulator, and the params file has a section per node. The real launch is in
tests/ros/test_self_improvement_launch.py."""

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "self_improvement.launch.py"


@pytest.fixture(scope="module")
def launch_file():
    spec = importlib.util.spec_from_file_location("self_improvement_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(launch_file, **given: str) -> dict:
    defaults = {name: default for name, default, _ in launch_file.ARGUMENTS}
    arg = lambda name: {**defaults, **given}.get(name, "")  # noqa: E731
    return launch_file.node_settings(arg, launch_file.reward_launch()._bool)


def test_every_argument_has_a_description(launch_file):
    arguments = launch_file.generate_launch_description().get_launch_arguments()
    names = {a.name for a in arguments}
    assert {"task", "data_root", "model_path", "adapters", "policy", "use_sim", "params_file"} <= names
    assert all(a.description.strip() for a in arguments)


def test_shared_settings_reach_every_node_that_needs_them(launch_file, tmp_path):
    (tmp_path / "models" / "progress").mkdir(parents=True)
    s = settings(
        launch_file,
        task="stack the cups",
        data_root="/data",
        policy="/store/act_pick/current",
        model_path="/models/base",
        adapters=str(tmp_path / "models"),
        namespace="robot1",
    )
    reward, _ = s["reward"]
    refinement, _ = s["refinement"]
    policy, policy_remaps = s["policy"]
    assert reward["judge.data_root"] == refinement["data_root"] == "/data"
    assert reward["task"] == policy["task"] == "stack the cups"
    assert reward["model.base"] == "/models/base"
    assert reward["model.adapters.progress"] == str(tmp_path / "models" / "progress")
    assert policy["policy_path"] == "/store/act_pick/current"
    assert (refinement["nightly.store"], refinement["nightly.policy"]) == ("/store", "act_pick")
    assert refinement["judge.action"] == "/robot1/reward_node/judge_episodes"
    assert ("action", "action") in policy_remaps
    assert s["sim"] is None


def test_arguments_left_empty_leave_the_params_file_alone(launch_file):
    s = settings(launch_file)
    reward, reward_remaps = s["reward"]
    refinement, refinement_remaps = s["refinement"]
    assert reward == {}
    assert set(refinement) == {"environment_state_topic", "judge.action"}  # nothing of the file's overridden
    assert refinement["environment_state_topic"] == ""
    assert s["policy"] is None and s["sim"] is None  # no policy: no policy_node
    assert reward_remaps == [("image", "camera/image")]
    assert ("action", "policy_node/action_stamped") in refinement_remaps
    assert ("reward", "reward_node/reward") in refinement_remaps


def test_the_simulator_is_driven_by_the_policy_and_recorded_like_a_robot(launch_file):
    s = settings(launch_file, use_sim="true", policy="/store/act_pick")
    sim, sim_remaps = s["sim"]
    refinement, refinement_remaps = s["refinement"]
    policy, _ = s["policy"]
    assert sim["controller"] == "external"
    assert ("camera/image", "camera/image") in sim_remaps and ("action", "action") in sim_remaps
    assert ("action", "sim_robot_node/applied_action") in refinement_remaps  # what the sim executed
    assert refinement["environment_state_topic"] == policy["environment_state_topic"] == "environment_state"
    assert settings(launch_file, use_sim="true")["sim"][0]["controller"] == "expert"  # no policy
    with pytest.raises(ValueError, match="use_sim"):
        settings(launch_file, use_sim="maybe")


def test_the_params_file_has_a_section_per_node():
    params = yaml.safe_load((REPO / "config" / "self_improvement.yaml").read_text())
    assert set(params) == {"reward_node", "refinement_node", "policy_node", "sim_robot_node"}
    assert params["refinement_node"]["ros__parameters"]["judge"]["mode"] == "reward_node"
    assert (
        params["reward_node"]["ros__parameters"]["judge"]["data_root"]
        == params["refinement_node"]["ros__parameters"]["data_root"]
    )
