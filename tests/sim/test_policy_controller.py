"""The sim's LeRobot policy controller feeds a checkpoint exactly the features it reads, under the recorded
names, and refuses a checkpoint whose inputs the simulated robot cannot provide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lrm_reward.sim.policy_controller import ENV_STATE_KEY, STATE_KEY, LeRobotPolicyController
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, SceneState


def save_tiny_act(
    folder: Path, inputs: dict[str, tuple[int, ...]], action_dim: int = len(ACTION_NAMES)
) -> Path:
    """An untrained ACT checkpoint (weights + pre/post processors) with the given inputs."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors

    kinds = {STATE_KEY: FeatureType.STATE, ENV_STATE_KEY: FeatureType.ENV}
    features = {k: PolicyFeature(kinds.get(k, FeatureType.VISUAL), shape) for k, shape in inputs.items()}
    cfg = make_policy_config(
        "act",
        input_features=features,
        output_features={"action": PolicyFeature(FeatureType.ACTION, (action_dim,))},
        device="cpu",
        push_to_hub=False,
        pretrained_backbone_weights=None,
        dim_model=16,
        n_heads=2,
        dim_feedforward=16,
        n_encoder_layers=1,
        n_decoder_layers=1,
        use_vae=False,
        chunk_size=3,
        n_action_steps=3,
    )
    torch.manual_seed(0)
    policy = get_policy_class("act")(cfg)
    stats = {
        k: {
            "mean": np.zeros(s[0] if len(s) == 1 else (s[0], 1, 1)),
            "std": np.ones(s[0] if len(s) == 1 else (s[0], 1, 1)),
        }
        for k, s in {**inputs, "action": (action_dim,)}.items()
    }
    pre, post = make_pre_post_processors(cfg, dataset_stats=stats)
    for part in (policy, pre, post):
        part.save_pretrained(folder)
    return folder


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
    assert set(obs) == {STATE_KEY, ENV_STATE_KEY, "task"}
    np.testing.assert_allclose(
        obs[ENV_STATE_KEY].numpy()[0], [0.05, 0.05, -0.0875, -0.07, -0.09, 0.0], atol=1e-6
    )
    np.testing.assert_allclose(obs[STATE_KEY].numpy()[0], state.joint_positions, atol=1e-6)
    controller.reset()
    action = controller.act(state)
    assert action.shape == (len(ACTION_NAMES),) and action.dtype == np.float32 and np.all(np.isfinite(action))


def test_an_image_policy_gets_the_camera(tmp_path):
    inputs = {"observation.images.front": (3, 32, 32), STATE_KEY: (len(JOINT_NAMES),)}
    controller = LeRobotPolicyController(save_tiny_act(tmp_path / "ckpt", inputs))
    obs = controller.observation(scene_state())
    assert set(obs) == {"observation.images.front", STATE_KEY, "task"}
    assert tuple(obs["observation.images.front"].shape) == (1, 3, 32, 32)
    assert float(obs["observation.images.front"].max()) <= 1.0
    assert np.all(np.isfinite(controller.act(scene_state())))


@pytest.mark.parametrize(
    ("inputs", "action_dim", "message"),
    [
        ({ENV_STATE_KEY: (3,)}, 4, "environment_state has shape"),
        ({ENV_STATE_KEY: (6,), "observation.depth": (2,)}, 4, "does not provide"),
        ({ENV_STATE_KEY: (6,)}, 7, "action shape"),
    ],
)
def test_checkpoints_the_sim_cannot_feed_are_refused(tmp_path, inputs, action_dim, message):
    folder = save_tiny_act(tmp_path / "ckpt", inputs, action_dim)
    with pytest.raises(ValueError, match=message):
        LeRobotPolicyController(folder)


def test_a_folder_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        LeRobotPolicyController(tmp_path)
