"""policy_node: runs a LeRobot policy from the policy store on a robot's topics, one episode at a time.

A lifecycle node and a thin shell around ``lrm_reward.policy.runner.PolicyRunner`` (the same code as
sim_robot_node's policy controller): callbacks only store the latest message of each observation
topic; a control timer at ``control_rate_hz`` builds the observation, asks the runner for an action and
publishes it. Loading, the feature check, safety and version switching are the runner's.

Lifecycle: configure loads the policy (``policy_path``: ``<store>/<name>`` or ``.../current`` follows
promotions; a version folder or a ``pretrained_model`` folder is pinned) and checks that the configured
topics provide every feature it reads — a corrupt checkpoint or mismatched features fail configure with
the reason in the log and on /diagnostics, the node stays up; activate subscribes and starts the control
loop; deactivate stops it (ending an episode); cleanup frees the policy. ``autostart`` (default true)
configures and activates at startup.

Episodes (the refinement node's convention, the same service types): ``~/start_episode``
(lrm_interfaces/StartEpisode) switches to a newly promoted ``current`` — only here, between episodes —
resets the policy and starts sending actions; ``~/stop_episode`` (StopEpisode) stops them. A non-empty
``policy_version`` in the start request must name the version that will act (else RESULT_BAD_REQUEST:
the recording would be mislabelled). A promotion during an episode is logged and shown on /diagnostics
as pending; it acts from the next start.

Topics in (the recorder's mapping, ``lrm_reward.refinement.feature_topics``, same parameters as
refinement_node): ``image`` (or ``image_topics``, one per camera; Image or CompressedImage),
``joint_states`` (JointState, field ``state_field``), optionally ``environment_state_topic``.
Topics out: ``action`` — std_msgs/Float64MultiArray (``layout.dim[0].label`` = the policy version) or
trajectory_msgs/JointTrajectory (one point ``trajectory_time_from_start_s`` ahead, ``joint_names`` =
``action_names``, header stamped now, ``frame_id`` = the policy version; what ros2_control's
joint_trajectory_controller takes); ``~/action_stamped`` (sensor_msgs/JointState named ``action_names``,
stamped like the newest observation it was chosen from, ``frame_id`` = the policy version: what the
refinement node records as ``action``); ``~/policy_version`` (std_msgs/String, latched: the version
acting now). /diagnostics at 1 Hz: version, pending version, episode, actions sent, counters.

Safety (parameters): ``action_min`` / ``action_max`` per dimension and ``max_delta_per_step`` (clamped,
counted); an observation older than ``max_observation_age_s`` (or missing, or with NaN) stops the actions
(``on_stale: stop``) or repeats the last one (``hold``), with a WARN; a NaN action is not sent (counted,
WARN); a policy that raises is reported (ERROR on /diagnostics) and nothing is sent.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray, MultiArrayDimension, String

from lrm_interfaces.srv import StartEpisode, StopEpisode
from lrm_reward.policy import runner as R
from lrm_reward.policy.action_guard import SafetyConfig
from lrm_reward.refinement.feature_topics import (
    ENV_STATE_KEY,
    STATE_KEY,
    STATE_TOPIC,
    FeatureTopics,
    image_key,
)
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.serving_lifecycle import ServingLifecycleMixin
from lrm_reward.ros.spinning import SubmitOnceExecutor, spin_until_shutdown

ACTION_TYPES = ("float64_multi_array", "joint_trajectory")
LATCHED = QoSProfile(
    depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
)
INF = float("inf")


def _sec_nsec(seconds: float) -> tuple[int, int]:
    return divmod(round(seconds * 1e9), 1_000_000_000)


def _d(text: str, read_only: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only)


# name -> (default, descriptor); read at configure (a change applies after cleanup + configure).
# config/policy_node.yaml mirrors this list.
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "autostart": (True, _d("configure + activate at startup (false: a lifecycle manager does)", True)),
    "policy_path": ("", _d("<store>/<name> or .../current (follows promotions), a version or checkpoint")),
    "device": ("cpu", _d("torch device of the policy")),
    "task": ("", _d("task text given to language-conditioned policies")),
    "control_rate_hz": (10.0, _d("[Hz] actions per second while an episode runs")),
    "action_type": ("float64_multi_array", _d(f"message type of the action topic: one of {ACTION_TYPES}")),
    "action_names": ([""], _d("names of the action values (JointTrajectory joint_names); [''] = action_<i>")),
    "trajectory_time_from_start_s": (0.0, _d("[s] JointTrajectory point time; 0 = one control period")),
    "action_min": ([-INF], _d("lower limit per action dimension (one value: all dimensions)")),
    "action_max": ([INF], _d("upper limit per action dimension (one value: all dimensions)")),
    "max_delta_per_step": ([INF], _d("largest change per control step, per dimension (one value: all)")),
    "max_observation_age_s": (0.5, _d("[s] an observation older than this is stale; <= 0: never")),
    "on_stale": ("stop", _d("stale/missing observation: stop (send nothing) | hold (repeat last action)")),
    "cameras": (["front"], _d("camera names -> features observation.images.<name> (as refinement_node)")),
    "image_topics": ([""], _d("image topic per camera; [''] = 'image' for one camera, image_<name>")),
    "compressed": (False, _d("image topics carry sensor_msgs/CompressedImage")),
    "state_field": ("position", _d("JointState field read as observation.state")),
    "state_names": ([""], _d("joints picked by name for observation.state; [''] = the message's order")),
    "environment_state_topic": ("", _d("observation.environment_state topic; '' = none")),
    "environment_state_type": ("float64_multi_array", _d("float64_multi_array | joint_state")),
    "environment_state_names": ([""], _d("names of the environment state values, in order")),
}
WARN_STATUSES = {R.STALE, R.MISSING, R.BAD_OBSERVATION, R.NON_FINITE, R.ERROR, R.HELD}


class _Latest:
    """The latest message of one observation topic (callbacks write, the control loop reads)."""

    __slots__ = ("converted", "msg", "received", "stamp")

    def __init__(self, msg, received: float, stamp: float) -> None:
        self.msg, self.received, self.stamp, self.converted = msg, received, stamp, None


class PolicyNode(ServingLifecycleMixin, LifecycleNode):
    def __init__(self, **kwargs) -> None:
        super().__init__("policy_node", **kwargs)
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self.runner: R.PolicyRunner | None = None
        self.topics: FeatureTopics | None = None
        self.load_error = ""
        self.counters: dict[str, int] = {}
        self._warned: set[str] = set()
        self._latest: dict[str, _Latest] = {}
        self._latest_lock = threading.Lock()
        self._subs: list = []
        self._timer = None
        self._action_pub = self._stamped_pub = None
        self._trajectory_types = None
        self._action_names: list[str] = []
        self._episode = -1
        self._sent = 0
        self._last_status = R.IDLE
        self._last_message = "unconfigured"
        self._last_switch = ""
        self._announced_pending = ""
        self._control_group = MutuallyExclusiveCallbackGroup()
        self._version_pub = self.create_publisher(String, "~/policy_version", LATCHED)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_service(StartEpisode, "~/start_episode", self._start, callback_group=self._control_group)
        self.create_service(StopEpisode, "~/stop_episode", self._stop, callback_group=self._control_group)
        self.create_timer(1.0, self._publish_diagnostics)

    def _param(self, name: str):
        return self.get_parameter(name).value

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self._configure()
        except (R.PolicyLoadError, ValueError, ImportError) as exc:
            self.load_error = str(exc)
            self._last_message = f"configure failed: {exc}"
            self.runner = None
            self.get_logger().error(self._last_message)
            return TransitionCallbackReturn.FAILURE
        return super().on_configure(state)

    def _configure(self) -> None:
        p = self._param
        self.topics = FeatureTopics(
            cameras=tuple(p("cameras")),
            image_topics=tuple(p("image_topics")),
            state_field=p("state_field"),
            state_names=tuple(p("state_names")),
            environment_state_topic=p("environment_state_topic"),
            environment_state_type=p("environment_state_type"),
            environment_state_names=tuple(p("environment_state_names")),
        )
        if p("action_type") not in ACTION_TYPES:
            raise ValueError(f"action_type must be one of {ACTION_TYPES}, not {p('action_type')!r}")
        if p("control_rate_hz") <= 0:
            raise ValueError("control_rate_hz must be > 0")
        names = [n for n in p("action_names") if n]
        safety = SafetyConfig(
            action_min=tuple(p("action_min")),
            action_max=tuple(p("action_max")),
            max_delta=tuple(p("max_delta_per_step")),
            max_observation_age_s=p("max_observation_age_s"),
            on_stale=p("on_stale"),
        )
        if p("action_type") == "joint_trajectory":
            if not names:
                raise ValueError("action_type joint_trajectory needs action_names (the controller's joints)")
            try:
                from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint
            except ImportError as exc:
                raise ImportError(
                    "action_type joint_trajectory needs trajectory_msgs (ros-trajectory-msgs wheel, or "
                    "ros-<distro>-trajectory-msgs)"
                ) from exc
            self._trajectory_types = (JointTrajectory, JointTrajectoryPoint)
        cfg = R.RunnerConfig(
            path=p("policy_path"),
            provides=self.topics.feature_shapes(),
            action_dim=len(names) or None,
            task=p("task"),
            device=p("device"),
            safety=safety,
        )
        self.get_logger().info(f"loading policy {cfg.path or '(policy_path is empty)'} ...")
        started = time.monotonic()
        self.runner = R.PolicyRunner(cfg)
        version = self.runner.load()
        self.load_error = ""
        dim = self.runner.loaded.action_dim
        self._action_names = names or [f"action_{i}" for i in range(dim)]
        msg_type = self._trajectory_types[0] if self._trajectory_types else Float64MultiArray
        self._action_pub = self.create_lifecycle_publisher(msg_type, "action", 10)
        self._stamped_pub = self.create_lifecycle_publisher(JointState, "~/action_stamped", 100)
        self._version_pub.publish(String(data=version))
        self._last_message = f"policy {version} loaded"
        self.get_logger().info(
            f"policy {version} loaded in {time.monotonic() - started:.1f} s: reads "
            f"{', '.join(self.runner.loaded.input_features)}; {dim} action values"
        )

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        topics = self.topics
        image_type = CompressedImage if self._param("compressed") else Image
        for cam, topic in topics.camera_topics().items():
            self._subscribe(image_type, topic, image_key(cam), qos_profile_sensor_data)
        self._subscribe(JointState, STATE_TOPIC, STATE_KEY, 10)
        if topics.environment_state:
            env_type = JointState if topics.environment_state_type == "joint_state" else Float64MultiArray
            self._subscribe(env_type, topics.environment_state_topic, ENV_STATE_KEY, 10)
        period = 1.0 / float(self._param("control_rate_hz"))
        self._timer = self.create_timer(
            period, self._control, callback_group=MutuallyExclusiveCallbackGroup()
        )
        self._last_message = f"active: {self.runner.version}; waiting for ~/start_episode"
        self.get_logger().info(self._last_message)
        return super().on_activate(state)

    def _subscribe(self, msg_type, topic: str, key: str, qos) -> None:
        def store(msg, key=key) -> None:
            header = getattr(msg, "header", None)
            stamp = header.stamp.sec + header.stamp.nanosec * 1e-9 if header is not None else 0.0
            with self._latest_lock:
                self._latest[key] = _Latest(msg, time.monotonic(), stamp)

        self._subs.append(self.create_subscription(msg_type, topic, store, qos))

    def _stop_serving(self) -> None:
        if self.runner is not None and self.runner.in_episode:
            self.runner.stop_episode()
            self.get_logger().warning(f"deactivated during episode {self._episode}: actions stopped")
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        for sub in self._subs:
            self.destroy_subscription(sub)
        self._subs.clear()
        with self._latest_lock:
            self._latest.clear()

    def _release(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        for pub in (self._action_pub, self._stamped_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._action_pub = self._stamped_pub = None
        self._last_message = "unconfigured"

    def shutdown_cleanly(self) -> None:
        if self.runner is not None:
            self.runner.stop_episode()

    # ------------------------------------------------------------------ episodes
    def _active(self) -> bool:
        return self._timer is not None and self.runner is not None

    def _start(self, req: StartEpisode.Request, res: StartEpisode.Response) -> StartEpisode.Response:
        if not self._active():
            res.result = StartEpisode.Response.RESULT_BAD_REQUEST
            res.message = f"policy_node is not active ({self.load_error or self._last_message})"
            return res
        runner = self.runner
        if runner.in_episode:
            res.result = StartEpisode.Response.RESULT_ALREADY_RECORDING
            res.message = f"episode {self._episode} with {runner.version} is running: stop it first"
            return res
        upcoming = runner.pending_version() or runner.version
        if req.policy_version and req.policy_version != upcoming:
            res.result = StartEpisode.Response.RESULT_BAD_REQUEST
            res.message = f"policy_version {req.policy_version!r} asked, but {upcoming} would act"
            return res
        try:
            started = runner.start_episode()
        except (R.PolicyLoadError, R.EpisodeRunningError) as exc:
            res.result, res.message = StartEpisode.Response.RESULT_BAD_REQUEST, str(exc)
            return res
        self._episode += 1
        self._announced_pending = ""
        self._last_status = R.IDLE
        res.result = StartEpisode.Response.RESULT_OK
        res.episode_index = self._episode
        res.message = f"episode {self._episode}: {started.version} acts"
        if started.switched_from:
            self._last_switch = f"{started.switched_from} -> {started.version} at episode {self._episode}"
            res.message += f" (switched from {started.switched_from}, promoted since the last episode)"
        if started.switch_error:
            self._count("switch_failed", f"a promoted version cannot run; {started.version} acts on")
            res.message += f" (the promoted version cannot run: {started.switch_error})"
            self.get_logger().error(res.message)
        self._version_pub.publish(String(data=started.version))
        self._last_message = res.message
        self.get_logger().info(res.message)
        return res

    def _stop(self, req: StopEpisode.Request, res: StopEpisode.Response) -> StopEpisode.Response:
        runner = self.runner
        if runner is None or not runner.in_episode:
            res.result, res.message = StopEpisode.Response.RESULT_NOT_RECORDING, "no episode is running"
            return res
        runner.stop_episode()
        res.result = StopEpisode.Response.RESULT_OK
        res.episode_index = max(self._episode, 0)
        res.message = f"episode {self._episode} stopped ({runner.version})"
        pending = runner.pending_version()
        if pending:
            res.message += f"; {pending} acts from the next episode"
        self._last_message = res.message
        self.get_logger().info(res.message)
        return res

    # ------------------------------------------------------------------ control loop
    def _control(self) -> None:
        runner = self.runner
        if runner is None or not runner.in_episode:
            return
        observation, received, stamp = self._observation(runner)
        result = runner.step(observation, received)
        self._report(result)
        if result.action is not None:
            self._publish(result, stamp)

    def _observation(self, runner: R.PolicyRunner):
        with self._latest_lock:
            latest = dict(self._latest)
        observation: dict[str, np.ndarray] = {}
        received: dict[str, float] = {}
        stamp = 0.0
        for key in runner.loaded.input_features:
            item = latest.get(key)
            if item is None:
                continue
            try:
                if item.converted is None:  # the same message is converted once
                    item.converted = self._convert(key, item.msg)
            except (ImageConversionError, ValueError) as exc:
                self._count(f"bad_{key}", f"{key}: {exc}")
                continue
            observation[key] = item.converted
            received[key] = item.received
            stamp = max(stamp, item.stamp)
        return observation, received, stamp

    def _convert(self, key: str, msg) -> np.ndarray:
        topics = self.topics
        if isinstance(msg, CompressedImage):
            return compressed_msg_to_rgb(msg)
        if isinstance(msg, Image):
            return image_msg_to_rgb(msg)
        if isinstance(msg, Float64MultiArray):
            return np.asarray(msg.data, dtype=np.float64)
        field = topics.state_field if key == STATE_KEY else "position"
        values = np.asarray(getattr(msg, field), dtype=np.float64)
        names = topics.state_names if key == STATE_KEY else topics.environment_state_names
        if names and list(msg.name) != list(names):
            lookup = {n: i for i, n in enumerate(msg.name)}
            missing = [n for n in names if n not in lookup]
            if missing or len(msg.name) != values.size:
                raise ValueError(f"{key}: the message lacks {missing or 'values for its names'}")
            values = values[[lookup[n] for n in names]]
        return values

    def _publish(self, result: R.StepResult, stamp_s: float) -> None:
        values = [float(v) for v in result.action]
        now = self.get_clock().now().to_msg()
        if self._trajectory_types is not None:
            trajectory_type, point_type = self._trajectory_types
            msg = trajectory_type(joint_names=list(self._action_names))
            msg.header.stamp, msg.header.frame_id = now, result.version
            ahead = self._param("trajectory_time_from_start_s") or 1.0 / self._param("control_rate_hz")
            point = point_type(positions=values)
            point.time_from_start.sec, point.time_from_start.nanosec = _sec_nsec(ahead)
            msg.points = [point]
        else:
            msg = Float64MultiArray(data=values)
            msg.layout.dim = [MultiArrayDimension(label=result.version, size=len(values), stride=len(values))]
        self._action_pub.publish(msg)
        stamped = JointState(name=list(self._action_names), position=values)
        if stamp_s > 0:
            stamped.header.stamp.sec, stamped.header.stamp.nanosec = _sec_nsec(stamp_s)
        else:
            stamped.header.stamp = now
        stamped.header.frame_id = result.version
        self._stamped_pub.publish(stamped)
        self._sent += 1

    def _report(self, result: R.StepResult) -> None:
        """Log on a change of state (WARN into stale/NaN/error, INFO back to normal), warn once per clamp."""
        if result.clamped_limit:
            self._count("clamped_to_limits", "an action was outside action_min/action_max: clamped")
        if result.clamped_delta:
            self._count("clamped_max_delta", "an action changed more than max_delta_per_step: clamped")
        if result.status == self._last_status:
            return
        previous, self._last_status = self._last_status, result.status
        if result.status in WARN_STATUSES:
            what = {
                R.HELD: "holding the last action",
                R.NON_FINITE: "action not sent",
                R.ERROR: "nothing sent",
            }.get(result.status, "actions stopped")
            log = self.get_logger().error if result.status == R.ERROR else self.get_logger().warning
            log(f"{result.status}: {result.message} ({what})")
        elif result.status == R.OK and previous in WARN_STATUSES:
            self.get_logger().info(f"actions resumed ({result.version})")

    def _count(self, kind: str, message: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1
        if kind not in self._warned:
            self._warned.add(kind)
            self.get_logger().warning(f"{message} (further '{kind}' are only counted)")

    # ------------------------------------------------------------------ diagnostics
    def _publish_diagnostics(self) -> None:
        runner = self.runner
        status = DiagnosticStatus(
            name=f"{self.get_name()}: policy", hardware_id=str(self._param("policy_path"))
        )
        pending = runner.pending_version() if runner is not None else None
        if pending and runner.in_episode and pending != self._announced_pending:
            self._announced_pending = pending
            self.get_logger().info(
                f"{pending} was promoted during episode {self._episode}: {runner.version} acts until it ends"
            )
        counters = {**(runner.counters if runner else {}), **self.counters}
        problems = {k: v for k, v in counters.items() if k != "actions"}
        if self.load_error or (runner is not None and self._last_status == R.ERROR):
            status.level = DiagnosticStatus.ERROR
        elif problems or self._last_status in WARN_STATUSES:
            status.level = DiagnosticStatus.WARN
        else:
            status.level = DiagnosticStatus.OK
        status.message = self.load_error or (
            runner.last_error if runner and self._last_status == R.ERROR else ""
        )
        status.message = status.message or self._last_message
        values = {
            "version": runner.version if runner else "",
            "pending version": pending or "",
            "in episode": str(bool(runner and runner.in_episode)),
            "episode": str(self._episode),
            "actions sent": str(self._sent),
            "last step": self._last_status,
            "last switch": self._last_switch,
            "load error": self.load_error,
            **{f"count {k}": str(v) for k, v in sorted(counters.items())},
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self._diag_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run lrm_reward policy_node``."""
    rclpy.init(args=args if args is not None else sys.argv)
    node = PolicyNode()

    def autostart() -> None:
        if (
            node.get_parameter("autostart").value
            and node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        ):
            node.trigger_activate()

    # threads: the control loop, the services (a version switch loads a policy), the callbacks, diagnostics
    with forward_core_logging(node):  # the runner's Python logging -> this node's logger and /rosout
        return spin_until_shutdown(node, SubmitOnceExecutor(num_threads=4), startup=autostart)


if __name__ == "__main__":
    sys.exit(main())
