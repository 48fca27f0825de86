"""The core's Python logging reaches /rosout: read back from /rosout (rcl_interfaces/msg/Log) with its level
and text, from a real reward_node process (a core WARNING at load, plus its /diagnostics) and from the bridge
installed on a node in this process (every level); and every node's main() installs it and removes it.
"""

from __future__ import annotations

import importlib
import logging

import pytest

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")

from conftest import spin_until  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402

from lrm_reward.ros import log_bridge  # noqa: E402

# what rcl's /rosout publisher offers: late joiners get what was logged before they subscribed
ROSOUT_QOS = QoSProfile(
    depth=1000, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL
)
BASE_ONLY = "base model only, not a reward model"


def _collect_rosout(node) -> list[Log]:
    logs: list[Log] = []
    node.create_subscription(Log, "/rosout", logs.append, ROSOUT_QOS)
    return logs


def test_core_warning_and_base_only_diagnostics_from_reward_node(start_node, ros_node, tiny_lrm):
    # no adapters: lrm_reward.core.loading logs a WARNING at load, which must arrive as a WARN of reward_node
    params = {
        "task": "open the top drawer",
        "model": {"base": str(tiny_lrm.base), "device": "cpu", "dtype": "float32"},
        "modalities": ["progress"],
    }
    logs = _collect_rosout(ros_node)
    diagnostics: list[DiagnosticArray] = []
    ros_node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    process = start_node("lrm_reward", "reward_node", params=params)

    def core_warning() -> list[Log]:
        return [log for log in logs if "lrm_reward.core.loading" in log.msg and BASE_ONLY in log.msg]

    assert spin_until(ros_node, lambda: bool(core_warning()), 120.0, process), process.log()[-3000:]
    (line,) = core_warning()
    assert line.level == Log.WARN
    assert line.name == "reward_node"
    assert line.msg.startswith("lrm_reward.core.loading: no adapters configured")

    def base_only_status():
        for array in diagnostics:
            for status in array.status:
                if status.name == "reward_node: reward model" and BASE_ONLY in status.message:
                    return status
        return None

    assert spin_until(ros_node, lambda: base_only_status() is not None, 30.0, process), process.log()[-3000:]
    status = base_only_status()
    assert status.level == DiagnosticStatus.WARN
    assert {kv.key: kv.value for kv in status.values}["adapters"].startswith("none")
    code = process.stop()
    assert code == 0, process.log()[-3000:]  # the node's own words on why it did not stop cleanly


def test_every_level_arrives_with_its_ros_severity_and_stops_after_removal(ros_node):
    logs = _collect_rosout(ros_node)
    core = logging.getLogger(log_bridge.CORE_LOGGER)
    name = ros_node.get_logger().name
    with log_bridge.forward_core_logging(ros_node) as handler:
        assert handler in core.handlers
        core.debug("bridge debug line")  # below the node's INFO level: not sent
        core.info("bridge info line")
        core.warning("bridge warning line %d", 7)
        core.error("bridge error line")
        core.critical("bridge critical line")
        try:
            raise ValueError("boom")
        except ValueError:
            core.exception("bridge exception line")
    assert handler not in core.handlers
    core.error("bridge after removal")

    def mine() -> dict[str, int]:
        return {log.msg: log.level for log in logs if log.name == name and "bridge" in log.msg}

    assert spin_until(ros_node, lambda: len(mine()) >= 5, 20.0)
    spin_until(ros_node, lambda: False, 0.5)  # anything sent after removal would have arrived by now
    got = mine()
    prefix = f"{log_bridge.CORE_LOGGER}: "
    assert got[prefix + "bridge info line"] == Log.INFO
    assert got[prefix + "bridge warning line 7"] == Log.WARN
    assert got[prefix + "bridge error line"] == Log.ERROR
    assert got[prefix + "bridge critical line"] == Log.FATAL
    exception = [msg for msg in got if msg.startswith(prefix + "bridge exception line")]
    assert len(exception) == 1 and "ValueError: boom" in exception[0]  # the traceback comes along
    assert got[exception[0]] == Log.ERROR
    assert not any("debug" in msg or "after removal" in msg for msg in got)


@pytest.mark.parametrize(
    "module_name, node_class",
    [
        ("reward_node", "RewardNode"),
        ("refinement_node", "RefinementNode"),
        ("sim_robot_node", "SimRobotNode"),
    ],
)
def test_every_node_main_forwards_while_it_spins(monkeypatch, module_name, node_class):
    module = importlib.import_module(f"lrm_reward.ros.{module_name}")
    core = logging.getLogger(log_bridge.CORE_LOGGER)
    seen = {}

    def light_node(*args, **kwargs):  # the real nodes load models / simulators; the wiring is what counts
        return rclpy.create_node(f"{module_name}_wiring_test")

    def fake_spin(node, *args, **kwargs):
        seen["handlers"] = [h for h in core.handlers if isinstance(h, log_bridge.RosLogHandler)]
        seen["logger"] = node.get_logger().name
        node.destroy_node()
        rclpy.try_shutdown()
        return 0

    monkeypatch.setattr(module, node_class, light_node)
    monkeypatch.setattr(module, "spin_until_shutdown", fake_spin)
    assert module.main(args=[]) == 0
    assert len(seen["handlers"]) == 1  # installed while the node spins ...
    assert seen["handlers"][0].ros_logger.name == seen["logger"]
    assert seen["handlers"][0] not in core.handlers  # ... and removed when it stops
