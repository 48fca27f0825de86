"""The real launch: ``ros2 launch lrm_reward reward.launch.py`` in its own process group, checked from
outside with the real ``ros2`` CLI (``--no-daemon``, every call under a timeout), stopped with SIGINT to the
group as a user's Ctrl-C would. Each test checks that nothing of the launch is left running afterwards.

- every launch argument reaches the node's parameters (``ros2 param dump``), ``autostart:=false`` leaves
  the node unconfigured, and rviz2/PlotJuggler that are not installed only cost a WARN;
- with the tiny model the node comes up active, several cameras get their remaps, and an argument not
  given leaves the params file's value;
- a node that cannot configure (model folder missing) ends the launch at once with an ERROR naming the
  missing path and the download command, exit code 1.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ros

CLI_TIMEOUT_S = 40  # one `ros2 lifecycle get` once hung for minutes: never call the CLI without one
SPIN = ["--no-daemon", "--spin-time", "5"]  # --spin-time 2 missed nodes on 2 busy cores


class Launch:
    """`ros2 launch lrm_reward reward.launch.py ARGS` in its own process group, output in a log file."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ros2", "launch", "lrm_reward", "reward.launch.py", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own: SIGINT reaches it as Ctrl-C would
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        pytest.fail(f"{text!r} not seen (launch rc={self.proc.poll()}):\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                pytest.fail(f"launch did not stop on SIGINT within {timeout} s:\n{self.output()[-4000:]}")
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Processes still in the launch's group (the nodes it started), after a grace period."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return []
            time.sleep(0.2)
        found = subprocess.run(
            ["ps", "-o", "pid=,args=", "-g", str(self.proc.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split("\n")
        os.killpg(self.proc.pid, signal.SIGKILL)  # don't leave them to the next test
        return [line for line in found if line.strip()]


@pytest.fixture
def launch(tmp_path: Path):
    started: list[Launch] = []

    def start(*args: str) -> Launch:
        handle = Launch(list(args), tmp_path / f"launch_{len(started)}.log")
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            handle.stop()
        handle.leftovers()


def ros2_on_node(run: Launch, *args: str, timeout: float = 120.0) -> str:
    """`ros2 ARGS` against a node of RUN, tried again while the CLI's fresh participant has not discovered the
    node or its services yet ("Node not found", or `param dump`'s "Wait for service timed out", which exits 0
    with nothing on stdout): on 2 cores busy with the whole suite one 5 s spin is sometimes not enough, and
    discovery time is not what these tests check. Any other failure, or the launch ending, fails at once."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(["ros2", *args], capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout
        said = (result.stderr + result.stdout).lower()
        undiscovered = any(s in said for s in ("not found", "unable to find node", "timed out"))
        failure = f"ros2 {' '.join(args)}: rc {result.returncode}\n{result.stderr}"
        assert run.proc.poll() is None, f"{failure}\nthe launch ended:\n{run.output()[-4000:]}"
        assert undiscovered and time.monotonic() < deadline, failure
        time.sleep(1.0)


def parameters(run: Launch, node: str) -> dict[str, object]:
    """Every parameter of NODE by its dotted name, typed, from one `ros2 param dump`."""
    dumped = yaml.safe_load(ros2_on_node(run, "param", "dump", *SPIN, node))
    assert isinstance(dumped, dict) and node in dumped, dumped
    flat: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value

    walk("", dumped[node]["ros__parameters"])
    return flat


def test_every_argument_reaches_the_node_and_autostart_false_leaves_it_unconfigured(launch, tmp_path):
    for name in ("progress", "completion"):  # adapters:= takes the folders that exist
        (tmp_path / "adapters" / name).mkdir(parents=True)
    run = launch(
        "namespace:=robot1",
        "autostart:=false",  # no configure: no model needed, and the state must stay unconfigured
        "task:=stack the cups",
        "image_topics:=/cam_left/image_raw,/cam_right/image_raw",
        "compressed:=true",
        "multi_camera:=paired",
        f"model_path:={tmp_path / 'base'}",
        f"adapters:={tmp_path / 'adapters'}",
        "device:=cpu",
        "dtype:=float32",
        "compile:=cuda-graphs",
        "readout:=generate",
        "modalities:=progress,contrastive",
        "interval_frames:=7",
        "use_sim_time:=true",
        "use_rviz:=true",  # not installed here: a WARN, and the node runs on
        "use_plotjuggler:=true",
    )
    run.wait_for("process started", timeout=30)
    node = "/robot1/reward_node"
    values = parameters(run, node)
    state = ros2_on_node(run, "lifecycle", "get", *SPIN, node)
    assert state.startswith("unconfigured"), state
    expected = {
        "autostart": False,
        "task": "stack the cups",
        "image_topics": ["image_0", "image_1"],
        "compressed": True,
        "multi_camera": "paired",
        "model.base": str(tmp_path / "base"),
        "model.adapters.progress": str(tmp_path / "adapters" / "progress"),
        "model.adapters.contrastive": "",
        "model.adapters.completion": str(tmp_path / "adapters" / "completion"),
        "model.device": "cpu",
        "model.dtype": "float32",
        "model.compile": "cuda-graphs",
        "model.readout": "generate",
        "modalities": ["progress", "contrastive"],
        "interval_frames": 7,
        "use_sim_time": True,
    }
    assert {name: values.get(name) for name in expected} == expected
    output = run.output()
    for tool in ("rviz2", "plotjuggler"):
        assert re.search(rf"\[WARNING\] \[lrm_reward.launch\]: {tool} is not installed", output), output
    assert run.proc.poll() is None, output  # still running without them
    assert run.stop() == 0, run.output()
    assert run.leftovers() == []


def test_tiny_model_comes_up_active_with_one_remap_per_camera(launch, tiny_lrm, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {"reward_node": {"ros__parameters": {"interval_frames": 3, "compressed": False, "task": "t"}}}
        )
    )
    run = launch(
        f"params_file:={params}",
        f"model_path:={tiny_lrm.base}",
        f"adapters:={tiny_lrm.base.parent}",
        "device:=cpu",
        "image_topics:=/cam_a/image_raw,/cam_b/image_raw,/cam_c/image_raw",
    )
    run.wait_for("]: active: scoring", timeout=90)  # the node's log line once activated
    # Not given on the command line: the params file's values stand.
    values = parameters(run, "/reward_node")
    assert (values["interval_frames"], values["task"]) == (3, "t")
    assert ros2_on_node(run, "lifecycle", "get", *SPIN, "/reward_node").startswith("active")
    info = ros2_on_node(run, "node", "info", *SPIN, "/reward_node")
    subscribers = info.split("Subscribers:", 1)[1].split("Publishers:", 1)[0]
    for camera in ("/cam_a/image_raw", "/cam_b/image_raw", "/cam_c/image_raw"):
        assert camera in subscribers, info
    assert "/reward_node/reward" in info.split("Publishers:", 1)[1], info
    assert run.stop() == 0, run.output()
    assert "process has finished cleanly" in run.output()
    assert run.leftovers() == []


def test_a_node_that_cannot_configure_ends_the_launch_with_the_fix(launch, tiny_lrm, tmp_path):
    missing = tmp_path / "no" / "Qwen3-VL-8B-Instruct"
    run = launch(f"model_path:={missing}", f"adapters:={tiny_lrm.base.parent}", "device:=cpu")
    try:
        rc = run.proc.wait(timeout=90)  # by itself, no SIGINT
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launch carried on with an unconfigured node:\n{run.output()[-4000:]}")
    output = run.output()
    assert rc == 1, output
    error = next(line for line in output.splitlines() if "[ERROR] [lrm_reward.launch]" in line)
    assert f"model_path {missing} does not exist" in error
    assert "huggingface-cli download Qwen/Qwen3-VL-8B-Instruct" in error
    assert run.leftovers() == []
