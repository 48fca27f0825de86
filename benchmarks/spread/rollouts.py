"""Policy rollouts in-process, on given layouts (scene seeds): bare, or rendered and recorded.

`evaluate` runs a state-only policy without rendering (the policy never looks at the camera), the fast
way to count successes. `record_rollouts` runs it as the demo's ROS rollouts do (sim_robot_node's scene
with the demo's camera and image size, the refinement node's EpisodeRecorder, the same features, the
simulator's outcome in the sidecar's notes and the operator's outcome left unknown) so that lrm-judge and
lrm-refine can read the recording; the reward node is not running, so no live `reward.progress` is
recorded (dense weighting then falls back to the judge's progress curve: dense_weights.read_progress).
In-process rollouts of a checkpoint reproduce its ROS rollouts on the same layouts (docs/demo.md).

What it is not: ROS (scripts/lrm_demo/ros_rollout.py is the demo's own, over real nodes).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

RECORDED_CAMERA = "front"  # the feature name the demo records the camera under, whatever the view


def _controller(path: Path):
    from lrm_reward.sim.policy_controller import LeRobotPolicyController

    with contextlib.redirect_stdout(sys.stderr):  # lerobot prints "Loading weights ..." on stdout
        controller = LeRobotPolicyController(path, "cpu")
    if any(k.startswith("observation.images.") for k in controller.input_features):
        raise SystemExit(f"{path} reads camera images; policy_spread only rolls out state-only policies")
    return controller


def evaluate(path: Path, layouts: list[int], max_steps: int) -> list[bool]:
    """The simulator's outcome of one episode per layout, without rendering."""
    import numpy as np

    from lrm_reward.sim.so101_scene import SceneConfig, So101Scene

    controller = _controller(path)
    scene = So101Scene(SceneConfig(image_size=32, max_steps=max_steps))
    scene.render = lambda: np.zeros((32, 32, 3), np.uint8)  # the policy never looks: skip the renderer
    results = []
    try:
        for layout in layouts:
            state = scene.reset(layout)
            controller.reset(layout)
            while not state.done:
                state = scene.step(controller.act(state))
            results.append(bool(state.success))
    finally:
        scene.close()
    return results


def record_rollouts(
    path: Path,
    layouts: list[int],
    max_steps: int,
    image_size: int,
    camera_view: str,
    data_root: Path,
    dataset_name: str,
    note: str,
) -> list[dict]:
    """One rendered, recorded episode per layout; returns the demo's episode rows (episode_index, seed,
    success, steps, frames). The dataset is data_root/dataset_name."""
    from lrm_reward.refinement.recorder import EpisodeOutcome, EpisodeRecorder, RecorderConfig
    from lrm_reward.sim.so101_scene import (
        ACTION_NAMES,
        CONTROL_DT_S,
        ENV_STATE_NAMES,
        JOINT_NAMES,
        TASK,
        SceneConfig,
        So101Scene,
    )

    controller = _controller(path)
    recorder = EpisodeRecorder(
        RecorderConfig(
            data_root=data_root, cameras=(RECORDED_CAMERA,), fps=round(1 / CONTROL_DT_S),
            dataset_name=dataset_name, state_names=JOINT_NAMES, action_names=ACTION_NAMES,
            robot_type="so101_sim", use_videos=False, spool_to_disk=False, image_writer_threads=0,
            rewards=True,  # the reward.* features of the ROS recordings, NaN: no reward node here
            environment_state_names=ENV_STATE_NAMES,
        )
    )  # fmt: skip
    rows = []
    scene_cfg = SceneConfig(image_size=image_size, max_steps=max_steps, camera=camera_view)
    try:
        with So101Scene(scene_cfg) as scene:
            for i, layout in enumerate(layouts):
                state = scene.reset(layout)
                controller.reset(layout)
                recorder.start(TASK, notes=note, policy_version=controller.version)
                t0 = 1_000_000.0 + i * 1000.0
                observe(recorder, state, t0)
                while not state.done:
                    # The action is stamped with the frame it was chosen from, as sim_robot_node stamps it;
                    # the final frame (recorded too, as over ROS) gets the last action by the recorder's hold.
                    action = controller.act(state)
                    recorder.add_action(t0 + state.step_index * CONTROL_DT_S, action, ACTION_NAMES)
                    state = scene.step(action)
                    observe(recorder, state, t0)
                truth = "success" if state.success else "failure"
                stop = recorder.stop(
                    EpisodeOutcome.UNKNOWN, notes=f"simulator ground truth: {truth} (seed {layout})"
                )
                if stop.status.value != "saved":
                    raise RuntimeError(f"saving the episode on layout {layout} failed: {stop.message}")
                rows.append(
                    {
                        "episode_index": int(stop.episode_index),
                        "seed": layout,
                        "success": bool(state.success),
                        "steps": int(state.step_index),
                        "frames": int(stop.num_frames),
                    }
                )
    finally:
        recorder.close()
    return rows


def observe(recorder, state, t0: float) -> None:
    """One frame of what sim_robot_node publishes: the camera, the joints, the perceived cube and goal."""
    from lrm_reward.sim.so101_scene import CONTROL_DT_S, ENV_STATE_NAMES, JOINT_NAMES

    t = t0 + state.step_index * CONTROL_DT_S
    recorder.add_image(RECORDED_CAMERA, t, state.image)
    recorder.add_state(t, state.joint_positions, JOINT_NAMES)
    recorder.add_environment_state(t, state.environment_state, ENV_STATE_NAMES)
