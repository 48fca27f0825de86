"""The sim's LeRobot policy controller feeds a checkpoint exactly the features it reads, under the recorded
names, refuses a checkpoint whose inputs the simulated robot cannot provide, and — being policy_node's
PolicyRunner — picks up a newly promoted store version at the next episode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrm_reward.policy import tiny_policy
from lrm_reward.sim.policy_controller import (
    ENV_STATE_KEY,
    STATE_KEY,
    LeRobotPolicyController,
    PolicyLoadError,
)
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, SceneState


def save_tiny_act(
    folder: Path, inputs: dict[str, tuple[int, ...]], action_dim: int = len(ACTION_NAMES)
) -> Path:
    return tiny_policy.save_tiny_act(folder, inputs, action_dim)


def scene_state(image_size: int = 32) -> SceneState:
    rng = np.random.default_rng(0)
    return SceneState(
        image=rng.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8),
        joint_positions=rng.normal(size=len(JOINT_NAMES)),
        joint_velocities=np.zeros(len(JOINT_NAMES)),
        grasp_point=np.array([0.2, 0.0, 0.1]),
        block_position=np.array([0.25, 0.05, 0.0125]),
        goal_position=np.array([0.18, -0.04, 0.0125]),
    )


def test_a_state_only_policy_gets_joints_and_object_positions_and_no_image(tmp_path):
    inputs = {STATE_KEY: (len(JOINT_NAMES),), ENV_STATE_KEY: (len(ENV_STATE_NAMES),)}
    controller = LeRobotPolicyController(save_tiny_act(tmp_path / "ckpt", inputs))
    state = scene_state()
    obs = controller.observation(state)
    assert set(obs) == {STATE_KEY, ENV_STATE_KEY}
    np.testing.assert_allclose(obs[ENV_STATE_KEY], [0.05, 0.05, -0.0875, -0.07, -0.09, 0.0], atol=1e-6)
    np.testing.assert_allclose(obs[STATE_KEY], state.joint_positions, atol=1e-6)
    controller.reset()
    action = controller.act(state)
    assert action.shape == (len(ACTION_NAMES),) and action.dtype == np.float32 and np.all(np.isfinite(action))


def test_an_image_policy_gets_the_camera(tmp_path):
    inputs = {"observation.images.front": (3, 32, 32), STATE_KEY: (len(JOINT_NAMES),)}
    controller = LeRobotPolicyController(save_tiny_act(tmp_path / "ckpt", inputs))
    obs = controller.observation(scene_state())
    assert set(obs) == {"observation.images.front", STATE_KEY}
    assert obs["observation.images.front"].shape == (32, 32, 3)
    assert np.all(np.isfinite(controller.act(scene_state())))


@pytest.mark.parametrize(
    ("inputs", "action_dim", "message"),
    [
        ({ENV_STATE_KEY: (3,)}, 4, "environment_state has shape"),
        ({ENV_STATE_KEY: (6,), "observation.depth": (2,)}, 4, "no configured topic provides"),
        ({ENV_STATE_KEY: (6,)}, 7, "action shape"),
    ],
)
def test_checkpoints_the_sim_cannot_feed_are_refused(tmp_path, inputs, action_dim, message):
    folder = save_tiny_act(tmp_path / "ckpt", inputs, action_dim)
    with pytest.raises(PolicyLoadError, match=message):
        LeRobotPolicyController(folder)


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PolicyLoadError, match=r"no config\.json"):
        LeRobotPolicyController(tmp_path)


def test_a_store_policy_switches_to_a_new_promotion_at_the_next_episode(tmp_path):
    inputs = {STATE_KEY: (len(JOINT_NAMES),), ENV_STATE_KEY: (len(ENV_STATE_NAMES),)}
    tiny_policy.store_tiny_act(tmp_path, "act_pick", inputs, len(ACTION_NAMES), bias=0.25)
    controller = LeRobotPolicyController(tmp_path / "act_pick" / "current")
    controller.reset(0)
    np.testing.assert_allclose(controller.act(scene_state()), 0.25, atol=1e-6)
    tiny_policy.store_tiny_act(tmp_path, "act_pick", inputs, len(ACTION_NAMES), bias=-0.5)
    np.testing.assert_allclose(controller.act(scene_state()), 0.25, atol=1e-6)  # same episode: same version
    controller.reset(1)
    assert controller.version == "act_pick/v0002" and "v0001 -> act_pick/v0002" in controller.switch_message
    np.testing.assert_allclose(controller.act(scene_state()), -0.5, atol=1e-6)
