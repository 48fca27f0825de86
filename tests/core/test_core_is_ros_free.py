"""The reward core must import and run where there is no ROS and no lerobot (the GPU server has neither)."""

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"

# Run in a fresh interpreter: block every ROS / lerobot top-level package, import every core module.
PROBE = r"""
import importlib, importlib.abc, pkgutil, sys

BLOCKED = ("rclpy", "lerobot", "rosidl_runtime_py", "sensor_msgs", "std_msgs", "lrm_interfaces",
           "builtin_interfaces", "diagnostic_msgs", "launch", "launch_ros")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the core must not need it")
        return None

sys.meta_path.insert(0, Block())
import lrm_reward.core as core
names = [m.name for m in pkgutil.walk_packages(core.__path__, "lrm_reward.core.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("imported", len(names), "core modules:", " ".join(names))
"""


def test_every_core_module_imports_without_ros_or_lerobot():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lrm_reward.core.types" in result.stdout
