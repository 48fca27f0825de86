"""policy_node as a real process: actions at the control rate, tagged with the policy version and clamped to
the limits; a version promoted during an episode acts only from the next one; stale observations stop the
actions; a checkpoint that cannot run leaves the node up, saying why."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import spin_until
from diagnostic_msgs.msg import DiagnosticStatus

from lrm_reward.policy.tiny_policy import store_tiny_act
from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, STATE_KEY
from lrm_reward.refinement.policy_store import PolicyStore

pytestmark = pytest.mark.ros

JOINTS = ["j1", "j2", "j3"]
RATE_HZ = 20.0
INPUTS = {STATE_KEY: (3,), ENV_STATE_KEY: (2,)}
WARN, ERROR = DiagnosticStatus.WARN, DiagnosticStatus.ERROR


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    store_tiny_act(root, "act_pick", INPUTS, 2, bias=0.5)  # v0001 -> actions [0.5, 0.5]
    store_tiny_act(root, "act_pick", INPUTS, 2, bias=2.0, promote=False)  # v0002 -> [2.0, 2.0]
    return root


def params(store, **kw) -> dict:
    return {
        "policy_path": str(store / "act_pick"),
        "control_rate_hz": RATE_HZ,
        "action_names": ["dx", "grip"],
        "action_max": [0.3, 1.0],
        "max_observation_age_s": 0.5,
        "state_names": JOINTS,
        "environment_state_topic": "objects",
        "environment_state_names": ["cube_x", "cube_y"],
        **kw,
    }


class Robot:
    """The test's side: fake observations out, actions and diagnostics in, the node's services."""

    def __init__(self, node) -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.qos import DurabilityPolicy, QoSProfile
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64MultiArray, String

        from lrm_interfaces.srv import StartEpisode, StopEpisode

        self.node, self.JointState, self.Float64MultiArray = node, JointState, Float64MultiArray
        self.StartEpisode, self.StopEpisode = StartEpisode, StopEpisode
        self.actions: list[tuple[float, list[float], str]] = []
        self.stamped: list = []
        self.diagnostics: list = []
        self.versions: list[str] = []
        self.publishing = True
        self.state_pub = node.create_publisher(JointState, "joint_states", 10)
        self.env_pub = node.create_publisher(Float64MultiArray, "objects", 10)
        node.create_subscription(Float64MultiArray, "action", self._on_action, 100)
        node.create_subscription(JointState, "/policy_node/action_stamped", self.stamped.append, 100)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(
            String, "/policy_node/policy_version", lambda m: self.versions.append(m.data), latched
        )
        node.create_timer(1.0 / 30.0, self._publish_observation)
        self.start = node.create_client(StartEpisode, "/policy_node/start_episode")
        self.stop = node.create_client(StopEpisode, "/policy_node/stop_episode")

    def _on_action(self, msg) -> None:
        self.actions.append((time.monotonic(), list(msg.data), msg.layout.dim[0].label))

    def _publish_observation(self) -> None:
        if not self.publishing:
            return
        state = self.JointState(name=list(reversed(JOINTS)), position=[0.3, 0.2, 0.1])  # picked by name
        state.header.stamp = self.node.get_clock().now().to_msg()
        self.state_pub.publish(state)
        self.env_pub.publish(self.Float64MultiArray(data=[1.0, 2.0]))

    def call(self, client, request, process):
        assert spin_until(self.node, client.service_is_ready, 60.0, process), process.log()[-3000:]
        future = client.call_async(request)
        assert spin_until(self.node, future.done, 60.0, process), process.log()[-3000:]
        return future.result()

    def diagnostic(self) -> dict[str, str]:
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name.startswith("policy_node"):
                    return {"level": status.level, "message": status.message} | {
                        kv.key: kv.value for kv in status.values
                    }
        return {}


def test_actions_at_the_control_rate_tagged_clamped_and_versions_switch_between_episodes(
    start_node, ros_node, store
):
    proc = start_node("lrm_reward", "policy_node", params=params(store))
    robot = Robot(ros_node)
    started = robot.call(robot.start, robot.StartEpisode.Request(task="pick"), proc)
    assert started.result == started.RESULT_OK, started.message
    assert "act_pick/v0001 acts" in started.message

    assert spin_until(ros_node, lambda: len(robot.actions) >= 5, 20.0, proc), proc.log()[-3000:]
    t0, n0 = time.monotonic(), len(robot.actions)
    spin_until(ros_node, lambda: time.monotonic() - t0 > 1.5, 3.0)
    rate = (len(robot.actions) - n0) / (time.monotonic() - t0)
    assert 0.6 * RATE_HZ <= rate <= 1.3 * RATE_HZ, f"{rate:.1f} actions/s"
    _, values, label = robot.actions[-1]
    assert label == "act_pick/v0001"
    np.testing.assert_allclose(values, [0.3, 0.5], atol=1e-5)  # dx clamped to action_max 0.3
    stamped = robot.stamped[-1]
    assert stamped.header.frame_id == "act_pick/v0001" and list(stamped.name) == ["dx", "grip"]
    assert stamped.header.stamp.sec > 0
    assert robot.versions and robot.versions[-1] == "act_pick/v0001"

    # promoted during the episode: v0001 keeps acting until the episode ends
    store_ = PolicyStore(store, "act_pick")
    store_.promote(store_.versions()[1])
    t_promote = time.monotonic()
    spin_until(ros_node, lambda: time.monotonic() - t_promote > 1.2, 2.0)
    after = [a for a in robot.actions if a[0] > t_promote]
    assert after and all(label == "act_pick/v0001" for _, _, label in after)
    assert robot.diagnostic().get("pending version") == "act_pick/v0002"
    stopped = robot.call(robot.stop, robot.StopEpisode.Request(), proc)
    assert (
        stopped.result == stopped.RESULT_OK and "act_pick/v0002 acts from the next episode" in stopped.message
    )

    second = robot.call(robot.start, robot.StartEpisode.Request(task="pick"), proc)
    assert second.result == second.RESULT_OK and "switched from act_pick/v0001" in second.message
    n1 = len(robot.actions)
    assert spin_until(ros_node, lambda: len(robot.actions) >= n1 + 5, 10.0, proc)
    _, values, label = robot.actions[-1]
    assert label == "act_pick/v0002"
    np.testing.assert_allclose(values, [0.3, 1.0], atol=1e-5)  # both clamped

    # observations stop: so do the actions (on_stale: stop), with a WARN and a counter
    robot.publishing = False
    t_quiet = time.monotonic()
    spin_until(ros_node, lambda: time.monotonic() - t_quiet > 1.5, 2.0)
    late = [a for a in robot.actions if a[0] > t_quiet + 0.7]
    assert not late, f"{len(late)} actions sent on stale observations"
    spin_until(ros_node, lambda: "count stale_observations" in robot.diagnostic(), 3.0)
    diag = robot.diagnostic()
    assert diag["last switch"].startswith("act_pick/v0001 -> act_pick/v0002")
    assert int(diag["count clamped_to_limits"]) > 0 and diag["level"] == WARN
    assert "stale" in proc.log()


def test_a_checkpoint_whose_features_do_not_match_leaves_the_node_up_and_says_why(
    start_node, ros_node, store
):
    proc = start_node("lrm_reward", "policy_node", params=params(store, environment_state_topic=""))
    robot = Robot(ros_node)
    assert spin_until(ros_node, lambda: robot.diagnostic().get("load error"), 30.0, proc), proc.log()[-3000:]
    diag = robot.diagnostic()
    assert "observation.environment_state, which no configured topic provides" in diag["load error"]
    assert diag["level"] == ERROR
    refused = robot.call(robot.start, robot.StartEpisode.Request(task="pick"), proc)
    assert refused.result == refused.RESULT_BAD_REQUEST and "not active" in refused.message
    assert proc.alive()
