"""A LeRobot policy checkpoint driving the simulated SO-101: scene state in, ``[dx, dy, dz, grasp]`` out.

What it is for: ``sim_robot_node``'s ``policy`` controller (and in-process evaluation). The policy sees what
the recorder writes for a recorded episode, under the same feature names: ``observation.images.front``
(the front camera), ``observation.state`` (JOINT_NAMES order) and ``observation.environment_state`` (the
cube from the gripper and the goal from the cube, ENV_STATE_NAMES order, as a pose estimator would
report them). Each is fed only
when the checkpoint's config lists it among its inputs, so a state-only policy never pays for images.

What it is not: a trainer (``lrm_reward.refinement.refine``) or aware of ROS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, TASK, SceneState

STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
IMAGE_PREFIX = "observation.images."


class LeRobotPolicyController:
    """Call ``reset()`` at every episode start, then ``act(state)`` once per step. One thread only."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors

        path = Path(path).expanduser().resolve()  # a store's `current` link resolves to its version
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a LeRobot policy checkpoint (no config.json)")
        cfg = PreTrainedConfig.from_pretrained(path)
        cfg.device = device
        self._check_features(path, cfg)
        self.path = path
        self.input_features = tuple(cfg.input_features)
        self.policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg)
        self.policy.eval()
        self.pre, self.post = make_pre_post_processors(
            cfg,
            pretrained_path=str(path),
            preprocessor_overrides={"device_processor": {"device": device}},
        )
        self.image_keys = [k for k in cfg.input_features if k.startswith(IMAGE_PREFIX)]
        if not self.image_keys and str(device).startswith("cpu"):
            import torch

            # A state-only policy is tiny: more OpenMP threads only spin against the camera rendering
            # and the reward model on the same cores.
            torch.set_num_threads(1)

    @staticmethod
    def _check_features(path: Path, cfg) -> None:
        """Refuse, with the reason, a checkpoint whose inputs or action this scene cannot provide."""
        sizes = {STATE_KEY: len(JOINT_NAMES), ENV_STATE_KEY: len(ENV_STATE_NAMES)}
        for key, feature in cfg.input_features.items():
            if key.startswith(IMAGE_PREFIX):
                continue
            if key not in sizes:
                raise ValueError(f"policy {path} reads {key!r}, which the simulated robot does not provide")
            if tuple(feature.shape) != (sizes[key],):
                raise ValueError(
                    f"policy {path}: {key} has shape {tuple(feature.shape)}, the sim provides ({sizes[key]},)"
                )
        action = cfg.output_features.get("action")
        if action is None or tuple(action.shape) != (len(ACTION_NAMES),):
            shape = None if action is None else tuple(action.shape)
            raise ValueError(f"policy {path}: action shape {shape}, the sim takes {len(ACTION_NAMES)} values")

    def reset(self, episode_seed: int | None = None) -> None:
        self.policy.reset()

    def observation(self, state: SceneState) -> dict:
        """The policy's input batch (batch size 1) for one scene state."""
        import torch

        obs: dict = {"task": [TASK]}
        if self.image_keys:
            image = torch.from_numpy(state.image).permute(2, 0, 1).float().div(255.0).unsqueeze(0)
            obs.update({k: image for k in self.image_keys})
        if STATE_KEY in self.input_features:
            obs[STATE_KEY] = torch.from_numpy(state.joint_positions.astype(np.float32)).unsqueeze(0)
        if ENV_STATE_KEY in self.input_features:
            obs[ENV_STATE_KEY] = torch.from_numpy(state.environment_state.astype(np.float32)).unsqueeze(0)
        return obs

    def act(self, state: SceneState) -> np.ndarray:
        import torch

        with torch.inference_mode():
            action = self.post(self.policy.select_action(self.pre(self.observation(state))))
        return np.asarray(action.reshape(-1).cpu().numpy(), dtype=np.float32)
