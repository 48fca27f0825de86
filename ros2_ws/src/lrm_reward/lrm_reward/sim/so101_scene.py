"""The simulated robot of the demo: SO-101 pick-and-place (lerobot-env-so101, MuJoCo), headless on the CPU.

What it is for: one small object that resets the scene with a seed, steps it with ``[dx, dy, dz, grasp]``
actions and renders the front camera with the goal drawn in, so a vision reward model can see where the
cube must go. The simulator's ground truth (``info["succeed"]``: cube carried, resting within 3 cm of the
goal, released) comes back with every step.

What it is not: a ROS node (``lrm_reward.ros.sim_robot_node`` wraps it) or a controller
(``lrm_reward.sim.noisy_expert``).

Rendering: MuJoCo reads ``MUJOCO_GL`` when it is first imported, so this module sets it (``egl`` unless
the caller chose) before importing mujoco lazily. Shadows and anti-aliasing are switched off (about ten
times faster on software GL) and frames are small. The goal marker is a visual-only disc added to the
rendered scene, never to the physics model, so it cannot collide with anything.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field

import numpy as np

TASK = "pick up the purple cube and place it on the green target"
DEFAULT_GL = "egl"
GL_FIX = {
    "egl": "apt-get install libegl1 libgl1-mesa-dri (or set MUJOCO_GL=osmesa with libosmesa6)",
    "osmesa": "apt-get install libosmesa6 (or set MUJOCO_GL=egl with libegl1 libgl1-mesa-dri)",
    "glfw": "glfw needs a display: set MUJOCO_GL=egl (apt-get install libegl1 libgl1-mesa-dri)",
}
# The scripted controller and the environment's IK are calibrated for this many metres per action unit.
ACTION_SCALE_M = 0.025
CONTROL_DT_S = 0.1
ARM_JOINTS = ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll")
JOINT_NAMES = (*ARM_JOINTS, "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "grasp")
SUCCESS_RADIUS_M = 0.03  # mirrors the environment's success check: cube within 3 cm of the goal's centre
# What a perception system would report (e.g. AprilTags seen by a wrist camera): where the cube is from
# the grasp point and where the goal is from the cube [m]. A policy may read it as
# observation.environment_state; the camera still shows everything. Relative rather than absolute
# positions because a small policy learns them from a dozen demonstrations: measured on this scene, an
# ACT trained on 30 clean demonstrations succeeded in 0-3 of 20 layouts with absolute cube/goal (and
# grasp point) positions, in 8 of 20 with these.
ENV_STATE_NAMES = (
    "cube_from_gripper_x",
    "cube_from_gripper_y",
    "cube_from_gripper_z",
    "goal_from_cube_x",
    "goal_from_cube_y",
    "goal_from_cube_z",
)


def _default_gl_at_import() -> None:
    # Anything may import mujoco later (lerobot's plugin discovery does): choose the backend now, before
    # that happens, unless the user already did.
    if "mujoco" not in sys.modules:
        os.environ.setdefault("MUJOCO_GL", DEFAULT_GL)
        if os.environ["MUJOCO_GL"] in ("egl", "osmesa"):
            os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


_default_gl_at_import()


# Named views. "front" is the environment's own camera (80 cm away: cube and target cover a few pixels of a
# 96 px frame, mostly floor). "workspace" looks down at the area where cubes and targets are drawn
# (x 0.15-0.30 m, y +-0.10 m) from the robot's far side, so at 96 px the cube covers ~10 px and the target
# ~12 px: what a vision reward model needs to tell "on the target" from "next to it". "workspace_low" is
# closer (40 cm) and lower (35 deg): the cube ~12 px, and a cube held above the target shows a gap under
# it instead of sitting on the disc in the image. "workspace_close" is the workspace view 23 % closer,
# centred on the floor: cube and target ~1.3x as wide (at 128 px the disc ~24 px instead of ~18, the cube
# ~20 px), while the arm's start pose covers a strip down the frame's centre. Free cameras of the renderer,
# so the physics model is untouched. Values: lookat (x, y, z) [m], distance [m], azimuth and elevation
# [deg].
CAMERA_VIEWS = {
    "front": None,
    "workspace": ((0.23, 0.0, 0.05), 0.48, 180.0, -58.0),
    "workspace_low": ((0.23, 0.0, 0.04), 0.40, 180.0, -35.0),
    "workspace_close": ((0.225, 0.0, 0.02), 0.37, 180.0, -62.0),
}


_RETREAT_ACTION = (-0.6, 0.0, 1.0)  # dx, dy, dz in action units: back toward the base, mostly up


class SimRenderError(RuntimeError):
    """The simulator cannot render frames on this machine; the message names the fix."""


@dataclass
class SceneConfig:
    image_size: int = 96  # square camera frames; 96-128 keeps software rendering fast
    max_steps: int = 90  # an episode ends here if the task was not done (the expert needs ~50)
    random_layout: bool = True  # cube and goal positions drawn from the seed; False: the fixed layout
    gl_backend: str | None = None  # None: $MUJOCO_GL, else egl
    marker_rgba: tuple[float, float, float, float] = (0.1, 0.85, 0.2, 1.0)
    marker_radius_m: float = SUCCESS_RADIUS_M  # the drawn disc shows where the cube counts as placed
    fast_render: bool = True  # shadows and multisampling off
    camera: str = "workspace"  # a CAMERA_VIEWS name: what the camera topic shows
    # At the episode's end the arm lifts and backs off this many control steps (gripper as last commanded)
    # before the final frame is taken, as a lab's end-of-episode "home" move does: the final frame then
    # shows where the cube was left instead of the jaws around it (the moment of release, which a camera
    # cannot tell from holding). Outcome and step count are the episode's; the policy does not act there.
    end_retreat_steps: int = 6

    def __post_init__(self) -> None:
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"SceneConfig.image_size must be in [16, 1024], got {self.image_size}")
        if self.max_steps < 1:
            raise ValueError("SceneConfig.max_steps must be >= 1")
        if not 0 <= self.end_retreat_steps <= 50:
            got = self.end_retreat_steps
            raise ValueError(f"SceneConfig.end_retreat_steps must be in [0, 50], got {got}")
        if len(self.marker_rgba) != 4 or not all(0.0 <= c <= 1.0 for c in self.marker_rgba):
            raise ValueError("SceneConfig.marker_rgba must be four values in [0, 1]")
        if self.marker_radius_m <= 0:
            raise ValueError("SceneConfig.marker_radius_m must be > 0")
        if self.camera not in CAMERA_VIEWS:
            raise ValueError(f"SceneConfig.camera must be one of {sorted(CAMERA_VIEWS)}, got {self.camera!r}")
        if self.gl_backend is not None and self.gl_backend not in GL_FIX:
            raise ValueError(f"SceneConfig.gl_backend must be one of {sorted(GL_FIX)} or None")


@dataclass
class SceneState:
    """What the controllers and the ROS node need after a reset or a step."""

    image: np.ndarray  # (H, W, 3) uint8, front camera with the goal marker
    joint_positions: np.ndarray  # (6,) ARM_JOINTS then the gripper joint, radians
    joint_velocities: np.ndarray  # (6,)
    grasp_point: np.ndarray  # (3,) the point the action moves (between the jaws)
    block_position: np.ndarray  # (3,)
    goal_position: np.ndarray  # (3,)
    step_index: int = 0
    success: bool = False  # simulator ground truth
    done: bool = False  # success, cube out of the workspace, or max_steps reached
    info: dict = field(default_factory=dict)

    @property
    def environment_state(self) -> np.ndarray:
        """(6,) ENV_STATE_NAMES: cube minus grasp point, goal minus cube [m]."""
        return np.concatenate(
            [self.block_position - self.grasp_point, self.goal_position - self.block_position]
        )


def select_gl_backend(requested: str | None = None) -> str:
    """Set MUJOCO_GL (and PyOpenGL's platform) before mujoco is imported; returns the backend in use."""
    backend = requested or os.environ.get("MUJOCO_GL") or DEFAULT_GL
    if "mujoco" in sys.modules and os.environ.get("MUJOCO_GL") != backend:
        raise SimRenderError(
            f"mujoco was imported before MUJOCO_GL={backend} was set; fix: export MUJOCO_GL={backend} "
            "before starting Python"
        )
    os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


def render_failure_message(backend: str, exc: BaseException) -> str:
    fix = GL_FIX.get(backend, "set MUJOCO_GL=egl (apt-get install libegl1 libgl1-mesa-dri)")
    return f"the simulator cannot render with MUJOCO_GL={backend} ({type(exc).__name__}: {exc}); fix: {fix}"


class So101Scene:
    """SO-101 pick-and-place with a visible goal. Not thread-safe: one thread steps it."""

    def __init__(self, cfg: SceneConfig | None = None) -> None:
        self.cfg = cfg or SceneConfig()
        self.gl_backend = select_gl_backend(self.cfg.gl_backend)
        try:
            import mujoco
            from lerobot_env_so101.mujoco_env import GymRenderingSpec
            from lerobot_env_so101.pick_place_env import SO101PickPlaceGymEnv
        except ImportError as exc:
            if "lerobot_env_so101" in str(exc) or "mujoco" in str(exc):
                raise SimRenderError(
                    f"the simulator is not installed ({exc}); fix: pip install -r requirements/sim.txt "
                    "-c requirements/constraints.txt"
                ) from exc
            raise SimRenderError(render_failure_message(self.gl_backend, exc)) from exc
        self._mujoco = mujoco
        size = self.cfg.image_size
        self._env = SO101PickPlaceGymEnv(
            render_spec=GymRenderingSpec(height=size, width=size),
            random_block_position=self.cfg.random_layout,
            action_scale=ACTION_SCALE_M,
        )
        model = self._env.model
        if self.cfg.fast_render:
            model.vis.quality.shadowsize = 0
            model.vis.quality.offsamples = 0
        try:
            self._renderer = mujoco.Renderer(model, height=size, width=size)
        except Exception as exc:  # any GL/EGL failure surfaces here, with backend-specific types
            self._env.close()
            raise SimRenderError(render_failure_message(self.gl_backend, exc)) from exc
        self._camera = self._make_camera(mujoco, self.cfg.camera)
        self._joint_qpos = [model.joint(n).qposadr[0] for n in JOINT_NAMES]
        self._joint_dof = [model.joint(n).dofadr[0] for n in JOINT_NAMES]
        self._obs: dict | None = None
        self._step = 0
        self._done = True
        self._success = False

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int) -> SceneState:
        self._obs, _ = self._env.reset(seed=int(seed))
        self._step = 0
        self._done = False
        self._success = False
        return self._state({})

    def step(self, action: np.ndarray) -> SceneState:
        """Apply one ``[dx, dy, dz, grasp]`` action (clipped to the action space) for CONTROL_DT_S."""
        if self._obs is None:
            raise RuntimeError("So101Scene.step before reset")
        if self._done:
            raise RuntimeError("So101Scene.step after the episode ended: reset first")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (len(ACTION_NAMES),):
            raise ValueError(f"action must have {len(ACTION_NAMES)} values {ACTION_NAMES}, got {a.shape[0]}")
        if not np.all(np.isfinite(a)):
            raise ValueError("action contains NaN or inf")
        space = self._env.action_space
        a = np.clip(a, space.low, space.high).astype(np.float32)
        self._obs, _, terminated, truncated, info = self._env.step(a)
        self._step += 1
        self._success = bool(info.get("succeed", False))
        self._done = bool(terminated or truncated or self._step >= self.cfg.max_steps)
        if self._done:
            self._retreat(float(a[3]))
        return self._state(info)

    def _retreat(self, grasp: float) -> None:
        """The end-of-episode home move (SceneConfig.end_retreat_steps): up and back toward the base."""
        move = np.asarray((*_RETREAT_ACTION, grasp), dtype=np.float32)
        for _ in range(self.cfg.end_retreat_steps):
            self._obs, *_ = self._env.step(move)

    @property
    def done(self) -> bool:
        return self._done

    @property
    def success(self) -> bool:
        return self._success

    # ------------------------------------------------------------------ rendering
    def render(self) -> np.ndarray:
        mujoco = self._mujoco
        r = self._renderer
        r.update_scene(self._env.data, camera=self._camera)
        scene = r.scene
        if scene.ngeom < scene.maxgeom:
            goal = self._env.goal_pos
            mujoco.mjv_initGeom(
                scene.geoms[scene.ngeom],
                mujoco.mjtGeom.mjGEOM_CYLINDER,
                np.array([self.cfg.marker_radius_m, 0.001, 0.0]),
                np.array([goal[0], goal[1], 0.0015]),  # a flat disc just above the floor
                np.eye(3).reshape(-1),
                np.asarray(self.cfg.marker_rgba, dtype=np.float32),
            )
            scene.ngeom += 1
        return r.render().copy()

    @staticmethod
    def _make_camera(mujoco, name: str):
        view = CAMERA_VIEWS[name]
        if view is None:
            return name  # a camera of the model, by name
        lookat, distance, azimuth, elevation = view
        cam = mujoco.MjvCamera()
        cam.type = mujoco.mjtCamera.mjCAMERA_FREE
        cam.lookat[:] = lookat
        cam.distance = distance
        cam.azimuth = azimuth
        cam.elevation = elevation
        return cam

    def close(self) -> None:
        for closer in (getattr(self, "_renderer", None), getattr(self, "_env", None)):
            if closer is not None:
                with contextlib.suppress(Exception):  # teardown must not mask the caller's own error
                    closer.close()
        self._renderer = None
        self._env = None

    def __enter__(self) -> So101Scene:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ state
    def _state(self, info: dict) -> SceneState:
        data = self._env.data
        env_state = self._obs["environment_state"]
        return SceneState(
            image=self.render(),
            joint_positions=np.asarray([data.qpos[i] for i in self._joint_qpos], dtype=np.float64),
            joint_velocities=np.asarray([data.qvel[i] for i in self._joint_dof], dtype=np.float64),
            grasp_point=np.asarray(self._env.ik_point_pos, dtype=np.float64),
            block_position=np.asarray(env_state[:3], dtype=np.float64),
            goal_position=np.asarray(env_state[3:6], dtype=np.float64),
            step_index=self._step,
            success=self._success,
            done=self._done,
            info=dict(info),
        )
