"""A scripted pick-and-place expert that fails some of the time, for demonstrations and demo rollouts.

What it is for: lerobot-env-so101's ``PickPlaceController`` (hover, descend, close, lift, traverse, lower,
open, retreat) succeeds almost always; Gaussian noise on its position actions and a per-episode error in
where it believes the cube is (the grasp offset) make some episodes fail, so recordings hold successes
and failures. Whether an episode succeeded is the simulator's ground truth (``SceneState.success``),
never this controller's opinion.

What it is not: a learned policy, or aware of ROS.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrm_reward.sim.so101_scene import ACTION_SCALE_M, SceneState

# Phases in which the controller is still aiming at the cube; the grasp offset only applies to them, so
# a cube picked up off-centre is still carried to the goal by its true position.
_AIMING_PHASES = ("HOVER", "DESCEND", "CLOSE")
_PLACING_PHASES = ("LOWER", "OPEN", "RETREAT")
# Failure modes a reward model must learn to call failures, both what a half-trained imitation policy
# often does. "hover": the cube is carried over the target and held there, never put down and released --
# a few centimetres from a success in the camera image. "stall": the arm goes to the cube and stops beside
# or above it, jaw open, never grasping; the cube stays where it was (the demo policy's most common failure
# in the measured rollouts, and a reward model that never saw it called it a success: docs/adaptation.md).
FAIL_MODES = ("", "hover", "stall")
_HOVER_HEIGHT_M = (0.05, 0.10)  # the grasp point's height while hovering, drawn per episode
_STALL_HEIGHT_M = (0.03, 0.09)  # stall: the grasp point's height above the table, drawn per episode
_STALL_OFFSET_M = (0.0, 0.04)  # stall: its horizontal distance from the cube, drawn per episode
_GRIPPER_OPEN = 1.0


@dataclass
class ExpertNoise:
    action_sigma: float = 0.0  # std of Gaussian noise added to dx, dy, dz (action units, range [-1, 1])
    grasp_offset_sigma_m: float = 0.0  # std of the per-episode xy error of the perceived cube position [m]
    seed: int = 0
    fail_mode: str = ""  # a FAIL_MODES name: make the episode fail that way on purpose ("": never)
    # The cube is put down this far at most from the target's centre (distance drawn per episode, uniform;
    # direction uniform). Past the task's 3 cm success radius the episode fails with the cube beside the
    # target; inside it succeeds off-centre, as a policy's successes often do, and a reward model that saw
    # only the expert's centred placements called those failures (docs/adaptation.md). A minimum > 0 keeps
    # the cube off the centre: with a maximum inside the radius, successes off-centre and nothing else.
    place_offset_max_m: float = 0.0
    place_offset_min_m: float = 0.0

    def __post_init__(self) -> None:
        if self.action_sigma < 0 or not np.isfinite(self.action_sigma):
            raise ValueError("ExpertNoise.action_sigma must be a finite value >= 0")
        if self.grasp_offset_sigma_m < 0 or not np.isfinite(self.grasp_offset_sigma_m):
            raise ValueError("ExpertNoise.grasp_offset_sigma_m must be a finite value >= 0")
        if self.place_offset_max_m < 0 or not np.isfinite(self.place_offset_max_m):
            raise ValueError("ExpertNoise.place_offset_max_m must be a finite value >= 0")
        if not 0 <= self.place_offset_min_m <= self.place_offset_max_m:
            raise ValueError(
                "ExpertNoise.place_offset_min_m must be >= 0 and <= place_offset_max_m, got "
                f"{self.place_offset_min_m} (max {self.place_offset_max_m})"
            )
        if self.fail_mode not in FAIL_MODES:
            raise ValueError(f"ExpertNoise.fail_mode must be one of {FAIL_MODES}, got {self.fail_mode!r}")


class NoisyExpert:
    """Call ``reset(episode_seed)`` at every episode start, then ``act(state)`` once per step."""

    def __init__(self, noise: ExpertNoise | None = None) -> None:
        from lerobot_env_so101.scripted import PickPlaceController

        self.noise = noise or ExpertNoise()
        self._controller = PickPlaceController(action_scale=ACTION_SCALE_M)
        self._rng = np.random.default_rng(self.noise.seed)
        self.grasp_offset = np.zeros(3)
        self.hover_height = _HOVER_HEIGHT_M[0]
        self.stall_offset = np.zeros(3)  # from the cube's resting point, where a stalling arm stops
        self.place_offset = np.zeros(3)  # from the target's centre, where the cube is put down
        self._table_z: float | None = None

    def reset(self, episode_seed: int | None = None) -> None:
        self._controller.reset()
        if episode_seed is not None:  # the same episode seed gives the same noise, whatever came before
            self._rng = np.random.default_rng([self.noise.seed, int(episode_seed)])
        offset = self._rng.normal(0.0, self.noise.grasp_offset_sigma_m, size=2)
        self.grasp_offset = np.array([offset[0], offset[1], 0.0])
        if self.noise.fail_mode == "hover":  # drawn only then: the other modes' noise stays as it was
            self.hover_height = float(self._rng.uniform(*_HOVER_HEIGHT_M))
        if self.noise.fail_mode == "stall":
            angle = self._rng.uniform(0.0, 2 * np.pi)
            radius = self._rng.uniform(*_STALL_OFFSET_M)
            height = self._rng.uniform(*_STALL_HEIGHT_M)
            self.stall_offset = np.array([radius * np.cos(angle), radius * np.sin(angle), height])
        if self.noise.place_offset_max_m > 0:  # drawn last and only then: the other draws stay as they were
            angle = self._rng.uniform(0.0, 2 * np.pi)
            radius = self._rng.uniform(self.noise.place_offset_min_m, self.noise.place_offset_max_m)
            self.place_offset = np.array([radius * np.cos(angle), radius * np.sin(angle), 0.0])
        self._table_z = None

    @property
    def phase(self) -> str:
        return self._controller.phase.name

    def act(self, state: SceneState) -> np.ndarray:
        if self._table_z is None:
            self._table_z = float(state.block_position[2])
        if self.noise.fail_mode == "stall":
            return self._stall(state)
        block = state.block_position
        if self.phase in _AIMING_PHASES:
            block = block + self.grasp_offset
        goal = state.goal_position + self.place_offset
        action = self._controller.act(state.grasp_point, block, goal).astype(np.float64)
        if self.noise.fail_mode == "hover" and self.phase in _PLACING_PHASES:
            # Stay at the hover height over the target, gripper closed: never lowered, never released.
            action[2] = np.clip((self.hover_height - state.grasp_point[2]) / ACTION_SCALE_M, -0.4, 0.4)
            action[3] = 0.0
        if self.noise.action_sigma > 0:
            action[:3] += self._rng.normal(0.0, self.noise.action_sigma, size=3)
        action[:3] = np.clip(action[:3], -1.0, 1.0)
        return action.astype(np.float32)

    def _stall(self, state: SceneState) -> np.ndarray:
        """Go to the stall point by the cube (at most full speed), then hold there, jaw open."""
        target = state.block_position + self.stall_offset
        target[2] = self._table_z + self.stall_offset[2]
        action = np.zeros(4)
        action[:3] = (target - state.grasp_point) / ACTION_SCALE_M
        action[3] = _GRIPPER_OPEN
        if self.noise.action_sigma > 0:
            action[:3] += self._rng.normal(0.0, self.noise.action_sigma, size=3)
        action[:3] = np.clip(action[:3], -1.0, 1.0)
        return action.astype(np.float32)
