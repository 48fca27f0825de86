"""Helpers for tests with real ROS 2 nodes: start the installed executables of this workspace in their own
processes, talk to them from the test process over Fast DDS, and stop them cleanly.

Every test here refuses to run unless DDS discovery is limited to this host and the process sits in a
network namespace with nothing but loopback (scripts/run_tests.sh arranges both): no packet may leave.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from node_process import NodeProcess

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "ros2_ws" / "install"


def _network_interfaces() -> list[str]:
    # if_nameindex asks the kernel about this process's namespace; /sys/class/net may show the host's.
    return sorted(name for _, name in socket.if_nameindex())


@pytest.fixture(autouse=True, scope="session")
def loopback_only() -> None:
    if os.environ.get("ROS_AUTOMATIC_DISCOVERY_RANGE") != "LOCALHOST":
        pytest.fail(
            "ROS tests need ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST: run them via scripts/run_tests.sh"
        )
    interfaces = _network_interfaces()
    if interfaces != ["lo"]:
        pytest.fail(
            f"ROS tests must run in a network namespace with only loopback (found {interfaces}): "
            "run them via scripts/run_tests.sh (unshare -n)"
        )


def installed_executable(package: str, executable: str) -> Path:
    path = INSTALL / package / "lib" / package / executable
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/setup.sh (colcon build) first")
    return path


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., NodeProcess]]:
    """start_node(package, executable, params={...} | params_file=Path, node_name=..., args=[...])"""
    started: list[NodeProcess] = []

    def start(
        package: str,
        executable: str,
        *,
        node_name: str | None = None,
        params: dict | None = None,
        params_file: Path | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        argv = [str(installed_executable(package, executable)), "--ros-args"]
        if params is not None:
            key = node_name or executable
            params_file = tmp_path / f"{key}_params.yaml"
            params_file.write_text(yaml.safe_dump({key: {"ros__parameters": params}}))
        if params_file is not None:
            argv += ["--params-file", str(params_file)]
        if node_name is not None:
            argv += ["-r", f"__node:={node_name}"]
        argv += args or []
        node = NodeProcess(argv, tmp_path / f"{executable}_{len(started)}.log", {**os.environ, **(env or {})})
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


@pytest.fixture
def ros_node(request) -> Iterator:
    """An rclpy node in the test process, on its own context (so tests don't share graph state)."""
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    context = rclpy.Context()
    rclpy.init(context=context)
    name = "test_" + "".join(c if c.isalnum() else "_" for c in request.node.name[:40])
    node = rclpy.create_node(name, context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    node.executor_for_test = executor
    yield node
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)


def spin_until(
    node, predicate: Callable[[], bool], timeout: float, process: NodeProcess | None = None
) -> bool:
    """Spin the test node until predicate() is true; stop early (False) if the node process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        node.executor_for_test.spin_once(timeout_sec=0.05)
        if predicate():
            return True
        if process is not None and not process.alive():
            return False
    return predicate()
