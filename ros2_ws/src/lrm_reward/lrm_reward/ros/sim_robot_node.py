"""sim_robot_node: the simulated SO-101 pick-and-place robot on the topics a real robot driver would use.

A thin shell around ``lrm_reward.sim``: a worker thread steps the scene and publishes; callbacks only
store the latest command or flip flags. Nothing here scores or records: run reward_node and
refinement_node beside it, unchanged, exactly as with a real robot.

Topics out: ``camera/image`` (sensor_msgs/Image rgb8, ``camera_view`` with the goal marker), ``joint_states``
(sensor_msgs/JointState, five arm joints + gripper), ``environment_state`` (sensor_msgs/JointState
named ENV_STATE_NAMES, values in ``position`` [m]: the cube from the grasp point and the goal from the
cube, what a pose estimator would report on a real robot; a JointState rather than a Float64MultiArray
because it carries the frame's stamp and the names, so a recorder aligns it exactly; the names are also
in the read-only parameter ``environment_state_names``), ``~/applied_action`` (sensor_msgs/JointState named
dx, dy, dz, grasp: the action the sim executed, stamped like the frame it was chosen from, so a recorder
pairs observation k with action k),
``~/success`` (std_msgs/Bool, latched: the simulator's ground truth at the end of each episode) and
``~/episode_result`` (std_msgs/String, latched JSON: episode, seed, success, steps, controller, first and
last frame stamps, policy path and version). Topic in: ``action`` (std_msgs/Float64MultiArray
``[dx, dy, dz, grasp]``), used when ``controller`` is ``external``: one step per received action.

Services (std_srvs/Trigger): ``~/start_episode`` resets the scene with the next seed (``seed`` +
episodes started since ``seed`` was last set) and runs it with the configured controller until success,
the cube leaves the workspace or ``max_steps``; ``~/stop_episode`` ends the running episode (published as
not successful); ``~/reset`` resets without running (publishes the first frame); ``~/last_result``
answers the JSON of the last finished episode (success false while one runs), for clients that poll.

Controllers: ``expert`` (the noisy scripted expert, ``expert.action_sigma`` / ``expert.grasp_offset_m``),
``policy`` (a LeRobot policy checkpoint: a ``pretrained_model`` folder, a store version, or
``policies/act_pick[/current]``, whose newly promoted version acts from the next episode on; reloaded
when ``policy_path`` changes; it is fed the recorded feature names it reads: ``observation.images.front``,
``observation.state``, ``observation.environment_state``; the same PolicyRunner as policy_node, see
``lrm_reward.sim.policy_controller``), ``external`` (the ``action`` topic).

Time: with ``rate_hz`` 0 the sim runs as fast as it renders and every message is stamped with simulated
time (episode start + step x 0.1 s, never behind the wall clock at the start and always increasing),
so recording and scoring by stamp stay exact; with ``rate_hz`` > 0 it is paced to the wall clock.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Bool, Float64MultiArray, String
from std_srvs.srv import Trigger

from lrm_reward.ros.image_conversion import rgb_to_image_msg
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.spinning import spin_until_shutdown, thread_per_entity
from lrm_reward.sim.noisy_expert import ExpertNoise, NoisyExpert
from lrm_reward.sim.policy_controller import LeRobotPolicyController
from lrm_reward.sim.so101_scene import (
    ACTION_NAMES,
    CAMERA_VIEWS,
    CONTROL_DT_S,
    ENV_STATE_NAMES,
    JOINT_NAMES,
    TASK,
    SceneConfig,
    SceneState,
    SimRenderError,
    So101Scene,
)

CONTROLLERS = ("expert", "policy", "external")
EXTERNAL_ACTION_TIMEOUT_S = 5.0  # an external controller silent this long ends the episode (not success)
LATCHED = QoSProfile(
    depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
)


def _stamp(seconds: float):
    from builtin_interfaces.msg import Time

    sec = int(seconds)
    return Time(sec=sec, nanosec=round((seconds - sec) * 1e9) % 1_000_000_000)


STARTUP_ONLY = ("image_size", "max_steps", "random_layout", "rate_hz", "frame_id", "end_retreat_steps")


class SimRobotNode(Node):
    def __init__(self) -> None:
        super().__init__("sim_robot_node")
        p = self._param
        self.scene_cfg = SceneConfig(
            image_size=p("image_size", 96, "camera frame size in pixels (square)"),
            max_steps=p("max_steps", 90, "an episode ends after this many steps (10 steps per second)"),
            random_layout=p("random_layout", True, "cube and goal positions drawn from the episode seed"),
            camera=p(
                "camera_view",
                SceneConfig.camera,
                f"what camera/image shows: {' | '.join(CAMERA_VIEWS)} (workspace: cube and target large)",
            ),
            end_retreat_steps=p(
                "end_retreat_steps",
                SceneConfig.end_retreat_steps,
                "steps of the end-of-episode home move (up and back) before the final frame; 0: none",
            ),
        )
        self.frame_id = p("frame_id", f"{self.scene_cfg.camera}_camera", "frame_id of the camera images")
        self.rate_hz = p("rate_hz", 0.0, "[Hz] pace steps to the wall clock; 0 = as fast as possible")
        p("seed", 0, "seed of the next episode; setting it restarts the seed sequence")
        p("controller", "expert", f"what drives the robot: one of {CONTROLLERS}")
        p("policy_path", "", "LeRobot policy checkpoint (pretrained_model folder or policies/<name>/current)")
        p("policy_device", "cpu", "torch device of the policy")
        p("expert.action_sigma", 0.15, "std of the expert's action noise (action units)")
        p("expert.grasp_offset_m", 0.01, "[m] std of the expert's per-episode error of the cube position")
        self.declare_parameter(
            "environment_state_names",
            list(ENV_STATE_NAMES),
            ParameterDescriptor(
                description="names of the values published on environment_state, in order (information)",
                read_only=True,
            ),
        )
        self._check(self.get_parameter("controller").value)
        self.add_on_set_parameters_callback(self._on_parameters)

        # The GL context belongs to the thread that creates it: the worker creates the scene and is the
        # only thread that touches it (reset, step, render); services hand it requests through a queue.
        self._requests: queue.Queue = queue.Queue()
        self._shutdown = threading.Event()
        self._scene_ready = threading.Event()
        self._scene_error: Exception | None = None
        self.scene: So101Scene | None = None
        self._worker = threading.Thread(target=self._work, name="sim_robot_worker", daemon=True)
        self._worker.start()
        self._scene_ready.wait()
        if self._scene_error is not None:
            raise self._scene_error  # SimRenderError: main() prints it and exits
        self._image_pub = self.create_publisher(Image, "camera/image", 10)
        self._joint_pub = self.create_publisher(JointState, "joint_states", 10)
        self._env_pub = self.create_publisher(JointState, "environment_state", 10)
        self._action_pub = self.create_publisher(JointState, "~/applied_action", 10)
        self._success_pub = self.create_publisher(Bool, "~/success", LATCHED)
        self._result_pub = self.create_publisher(String, "~/episode_result", LATCHED)

        control = MutuallyExclusiveCallbackGroup()
        self.create_service(Trigger, "~/start_episode", self._on_start, callback_group=control)
        self.create_service(Trigger, "~/stop_episode", self._on_stop, callback_group=ReentrantCallbackGroup())
        self.create_service(Trigger, "~/reset", self._on_reset, callback_group=control)
        self.create_service(
            Trigger, "~/last_result", self._on_last_result, callback_group=ReentrantCallbackGroup()
        )
        self.create_subscription(
            Float64MultiArray, "action", self._on_action, 10, callback_group=ReentrantCallbackGroup()
        )

        self.counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._external_action: np.ndarray | None = None
        self._external_event = threading.Event()
        self._stop_requested = threading.Event()
        self._running = False
        self._last_result = ""
        self._episode = -1
        self._seed_base = int(self.get_parameter("seed").value)
        self._seed_offset = 0
        self._last_stamp = 0.0
        self._policy: LeRobotPolicyController | None = None
        self._policy_setting: tuple[str, str] = ("", "")
        self._expert: NoisyExpert | None = None
        self.get_logger().info(
            f"SO-101 pick-and-place sim ready ({self.scene_cfg.image_size}px, MUJOCO_GL="
            f"{self.scene.gl_backend}); task: {TASK!r}"
        )

    # ------------------------------------------------------------------ parameters
    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    @staticmethod
    def _check(controller: str) -> None:
        if controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {CONTROLLERS}, not {controller!r}")

    def _on_parameters(self, params) -> SetParametersResult:
        for param in params:
            if param.name == "controller" and param.value not in CONTROLLERS:
                return SetParametersResult(
                    successful=False, reason=f"controller must be one of {CONTROLLERS}"
                )
            if param.name in STARTUP_ONLY:
                return SetParametersResult(successful=False, reason=f"{param.name} is read at startup")
            if param.name == "seed":
                with self._lock:
                    self._seed_base, self._seed_offset = int(param.value), 0
        return SetParametersResult(successful=True)

    def _count(self, kind: str, message: str) -> None:
        first = kind not in self.counters
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if first:
            self.get_logger().warning(f"{message} (further '{kind}' are only counted)")

    # ------------------------------------------------------------------ callbacks: store, never step
    def _on_action(self, msg: Float64MultiArray) -> None:
        values = np.asarray(msg.data, dtype=np.float64)
        if values.shape != (len(ACTION_NAMES),) or not np.all(np.isfinite(values)):
            self._count("bad_action", f"action must be {len(ACTION_NAMES)} finite values {ACTION_NAMES}")
            return
        with self._lock:
            self._external_action = values
        self._external_event.set()

    def _on_start(self, request, response):
        with self._lock:
            if self._running:
                response.success, response.message = False, f"episode {self._episode} is still running"
                return response
            seed = self._seed_base + self._seed_offset
            self._seed_offset += 1
            self._running = True
        self._stop_requested.clear()
        self._requests.put(("run", seed, None))
        response.success = True
        response.message = json.dumps({"episode": self._episode + 1, "seed": seed, "task": TASK})
        return response

    def _on_stop(self, request, response):
        if not self._running:
            response.success, response.message = False, "no episode is running"
            return response
        self._stop_requested.set()
        response.success, response.message = True, "stopping"
        return response

    def _on_last_result(self, request, response):
        response.success = bool(self._last_result) and not self._running
        response.message = self._last_result
        return response

    def _on_reset(self, request, response):
        with self._lock:
            if self._running:
                response.success, response.message = False, "an episode is running: stop it first"
                return response
            seed = self._seed_base + self._seed_offset
        done: queue.Queue = queue.Queue()
        self._requests.put(("reset", seed, done))
        try:
            error = done.get(timeout=30.0)
        except queue.Empty:
            error = "the sim did not answer within 30 s"
        response.success = error is None
        response.message = json.dumps({"seed": seed}) if error is None else f"reset failed: {error}"
        return response

    # ------------------------------------------------------------------ worker: step and publish
    def _work(self) -> None:
        try:
            self.scene = So101Scene(self.scene_cfg)
        except Exception as exc:
            self._scene_error = exc
            return
        finally:
            self._scene_ready.set()
        try:
            while not self._shutdown.is_set():
                try:
                    kind, seed, done = self._requests.get(timeout=0.2)
                except queue.Empty:
                    continue
                if kind == "reset":
                    try:
                        state = self.scene.reset(seed)
                        self._publish_state(state, self._next_episode_start(), None)
                        done.put(None)
                    except Exception as exc:
                        done.put(f"{type(exc).__name__}: {exc}")
                    continue
                try:
                    self._run_episode(seed)
                except Exception as exc:  # a controller or sim failure ends the episode, the node stays up
                    self._count("episode_error", f"episode failed: {type(exc).__name__}: {exc}")
                    self._publish_result(self._episode, seed, False, 0, "error", 0.0, 0.0, str(exc))
                finally:
                    with self._lock:
                        self._running = False
        finally:
            self.scene.close()

    def _controller(self):
        kind = self.get_parameter("controller").value
        if kind == "expert":
            noise = ExpertNoise(
                action_sigma=float(self.get_parameter("expert.action_sigma").value),
                grasp_offset_sigma_m=float(self.get_parameter("expert.grasp_offset_m").value),
            )
            if self._expert is None or self._expert.noise != noise:
                self._expert = NoisyExpert(noise)
            return kind, self._expert
        if kind == "policy":
            setting = str(self.get_parameter("policy_path").value)
            if not setting:
                raise ValueError("controller 'policy' needs the policy_path parameter")
            device = str(self.get_parameter("policy_device").value)
            # Same path: keep the runner; a store's newly promoted `current` is picked up at reset()
            # (the next episode), by the same code as policy_node.
            if self._policy is None or self._policy_setting != (setting, device):
                path = Path(setting).expanduser()
                self.get_logger().info(f"loading policy {path}")
                self._policy = LeRobotPolicyController(path, device)
                self._policy_setting = (setting, device)
                self.get_logger().info(f"policy {self._policy.version} loaded")
            return kind, self._policy
        return kind, None

    def _next_episode_start(self) -> float:
        # Simulated stamps may run ahead of the wall clock; a new episode never goes back in time.
        start = max(time.time(), self._last_stamp + 1.0)
        self._last_stamp = start
        return start

    def _run_episode(self, seed: int) -> None:
        kind, controller = self._controller()
        self._episode += 1
        state = self.scene.reset(seed)
        if controller is not None:
            controller.reset(seed)
            if getattr(controller, "switch_message", ""):
                self.get_logger().info(f"episode {self._episode}: {controller.switch_message}")
        self._external_event.clear()
        t0 = self._next_episode_start()
        first_stamp = t0
        self._publish_state(state, t0)
        wall0 = time.monotonic()
        note = ""
        while not state.done:
            if self._shutdown.is_set() or self._stop_requested.is_set():
                note = "stopped"
                break
            if controller is None:
                if not self._external_event.wait(timeout=EXTERNAL_ACTION_TIMEOUT_S):
                    note = f"no action for {EXTERNAL_ACTION_TIMEOUT_S:g} s"
                    break
                self._external_event.clear()
                with self._lock:
                    action = self._external_action
            else:
                action = controller.act(state)
            # Stamped with the frame it was chosen from: a recorder then pairs observation k with action k
            # (LeRobot's convention). Stamping it with the resulting frame taught refined policies a lag.
            self._publish_action(action, t0 + state.step_index * CONTROL_DT_S)
            state = self.scene.step(action)
            self._publish_state(state, t0 + state.step_index * CONTROL_DT_S)
            if self.rate_hz > 0:
                delay = wall0 + state.step_index / self.rate_hz - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        last = t0 + state.step_index * CONTROL_DT_S
        self._last_stamp = max(self._last_stamp, last)
        success = bool(state.success) and not note
        self._publish_result(self._episode, seed, success, state.step_index, kind, first_stamp, last, note)

    def _publish_state(self, state: SceneState, stamp_s: float) -> None:
        from std_msgs.msg import Header

        header = Header(stamp=_stamp(stamp_s), frame_id=self.frame_id)
        self._image_pub.publish(rgb_to_image_msg(state.image, header))
        js = JointState(header=header, name=list(JOINT_NAMES))
        js.position = [float(v) for v in state.joint_positions]
        js.velocity = [float(v) for v in state.joint_velocities]
        self._joint_pub.publish(js)
        env = JointState(header=header, name=list(ENV_STATE_NAMES))
        env.position = [float(v) for v in state.environment_state]
        self._env_pub.publish(env)

    def _publish_action(self, action: np.ndarray, stamp_s: float) -> None:
        from std_msgs.msg import Header

        applied = JointState(
            header=Header(stamp=_stamp(stamp_s), frame_id=self.frame_id), name=list(ACTION_NAMES)
        )
        applied.position = [float(v) for v in action]
        self._action_pub.publish(applied)

    def _publish_result(self, episode, seed, success, steps, controller, first, last, note) -> None:
        self._success_pub.publish(Bool(data=bool(success)))
        result = {
            "episode": int(episode),
            "seed": int(seed),
            "success": bool(success),
            "steps": int(steps),
            "controller": controller,
            "task": TASK,
            "first_stamp": float(first),
            "last_stamp": float(last),
            "note": note,
            "policy_path": str(self._policy.path) if controller == "policy" and self._policy else "",
            "policy_version": self._policy.version if controller == "policy" and self._policy else "",
        }
        self._last_result = json.dumps(result)
        self._result_pub.publish(String(data=self._last_result))
        self.get_logger().info(
            f"episode {episode} (seed {seed}, {controller}): {'SUCCESS' if success else 'failure'} "
            f"after {steps} steps{' - ' + note if note else ''}"
        )

    def shutdown_cleanly(self) -> None:
        self._shutdown.set()
        self._stop_requested.set()
        self._worker.join(timeout=5.0)


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run lrm_reward sim_robot_node``."""
    rclpy.init(args=args if args is not None else sys.argv)
    try:
        node = SimRobotNode()
    except (SimRenderError, ValueError) as exc:
        print(f"sim_robot_node: {exc}", file=sys.stderr)
        with contextlib.suppress(Exception):
            rclpy.try_shutdown()
        return 1
    with forward_core_logging(node):  # the core's Python logging -> this node's logger and /rosout
        return spin_until_shutdown(node, thread_per_entity(node))


if __name__ == "__main__":
    sys.exit(main())
