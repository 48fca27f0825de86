"""A LeRobot policy driving the simulated SO-101: scene state in, ``[dx, dy, dz, grasp]`` out.

What it is for: ``sim_robot_node``'s ``policy`` controller (and in-process evaluation). It is a thin
adapter over ``lrm_reward.policy.runner.PolicyRunner`` — the same code policy_node runs on a real robot:
loading from the policy store (checksums), the feature check, switching to a newly promoted ``current``
at the next episode, the safety guard. The scene provides what the recorder writes for a recorded
episode, under the same feature names (``lrm_reward.refinement.feature_topics``):
``observation.images.front`` (the front camera), ``observation.state`` (JOINT_NAMES order) and
``observation.environment_state`` (the cube from the gripper and the goal from the cube, ENV_STATE_NAMES
order, as a pose estimator would report them). Only the features the checkpoint reads are built, so a
state-only policy never pays for images.

What it is not: a trainer (``lrm_reward.refinement.refine``) or aware of ROS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrm_reward.policy.action_guard import SafetyConfig
from lrm_reward.policy.runner import OK, PolicyLoadError, PolicyRunner, RunnerConfig
from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, IMAGE_KEY_PREFIX, STATE_KEY, image_key
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, TASK, SceneState

CAMERA = "front"
# What the sim provides, feature -> shape (images: any size)
SIM_FEATURES: dict[str, tuple[int, ...] | None] = {
    image_key(CAMERA): None,
    STATE_KEY: (len(JOINT_NAMES),),
    ENV_STATE_KEY: (len(ENV_STATE_NAMES),),
}

__all__ = ["ENV_STATE_KEY", "IMAGE_KEY_PREFIX", "STATE_KEY", "LeRobotPolicyController", "PolicyLoadError"]


class LeRobotPolicyController:
    """Call ``reset()`` at every episode start, then ``act(state)`` once per step. One thread only.

    ``path``: a ``pretrained_model`` folder, a store version, or ``<store>/<name>[/current]`` (then a
    version promoted while an episode runs acts from the next ``reset()`` on). Raises PolicyLoadError.
    """

    def __init__(self, path: Path | str, device: str = "cpu", safety: SafetyConfig | None = None) -> None:
        # The sim is never stale (every state is fresh) and its actions are bounded by the scene itself.
        safety = safety or SafetyConfig(max_observation_age_s=0.0)
        cfg = RunnerConfig(path, dict(SIM_FEATURES), len(ACTION_NAMES), TASK, device, safety)
        self.runner = PolicyRunner(cfg)
        self.runner.load()
        self.path = self.runner.loaded.path
        self.switch_message = ""

    @property
    def version(self) -> str:
        return self.runner.version

    @property
    def input_features(self) -> tuple[str, ...]:
        return tuple(self.runner.loaded.input_features)

    # lerobot's parts of the loaded version, for checks that call them directly (tests/test_demo_quick.py)
    @property
    def policy(self):
        return self.runner.loaded.policy

    @property
    def pre(self):
        return self.runner.loaded.pre

    @property
    def post(self):
        return self.runner.loaded.post

    def reset(self, episode_seed: int | None = None) -> None:
        if self.runner.in_episode:
            self.runner.stop_episode()
        started = self.runner.start_episode()
        self.path = self.runner.loaded.path
        self.switch_message = ""
        if started.switched_from:
            self.switch_message = f"switched policy {started.switched_from} -> {started.version}"
        if started.switch_error:
            self.switch_message = f"kept {started.version}: {started.switch_error}"

    def observation(self, state: SceneState) -> dict[str, np.ndarray]:
        """The features the policy reads, as the recorder names them, for one scene state."""
        values = {
            image_key(CAMERA): lambda: state.image,
            STATE_KEY: lambda: state.joint_positions,
            ENV_STATE_KEY: lambda: state.environment_state,
        }
        return {key: values[key]() for key in self.input_features}

    def act(self, state: SceneState) -> np.ndarray:
        if not self.runner.in_episode:
            self.reset()
        result = self.runner.step(self.observation(state))
        if result.status != OK:
            raise RuntimeError(f"policy {result.version}: {result.status}: {result.message}")
        return result.action.astype(np.float32)
