"""The bag importer and scorer run where there is no ROS: rosbags reads and writes bags in pure Python."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"

PROBE = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("rclpy", "rosidl_runtime_py", "sensor_msgs", "std_msgs", "lrm_interfaces", "builtin_interfaces",
           "rosbag2_py", "launch", "launch_ros")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the bag tools must not need it")
        return None

sys.meta_path.insert(0, Block())
import lrm_reward.bags as bags
names = [m.name for m in pkgutil.walk_packages(bags.__path__, "lrm_reward.bags.")]
for name in names:
    importlib.import_module(name)
from lrm_reward.bags.bag_source import default_typestore
assert "lrm_interfaces/msg/RewardSignal" in default_typestore().fielddefs  # from the .msg file, not rosidl
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("imported", " ".join(names))
"""


def test_every_bags_module_imports_without_ros():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lrm_reward.bags.importer" in result.stdout and "lrm_reward.bags.offline_scoring" in result.stdout
