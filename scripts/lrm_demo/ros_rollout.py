"""Rollouts through real ROS processes: sim_robot_node drives the policy, reward_node scores the camera live,
refinement_node records; the demo's own node calls their services."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from lrm_demo.common import (
    ENV_STATE_TOPIC,
    EPISODE_TIMEOUT_S,
    NODE_START_TIMEOUT_S,
    PKG_SRC,
    ROUND_SEED,
    TASK,
    DemoError,
    DemoSettings,
    fresh_dir,
    say,
)
from lrm_reward.sim.so101_scene import ENV_STATE_NAMES


class NodeProcess:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise DemoError(f"{self.name} exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _params_file(path: Path, node: str, params: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({node: {"ros__parameters": params}}))
    return path


def start_nodes(work: Path, s: DemoSettings, reward_model: dict, policy_path: str, dataset: str):
    env = {**os.environ, "PYTHONPATH": f"{PKG_SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
    adapters = Path(reward_model["adapters"])
    reward_params = {
        "task": TASK,
        "image_topics": ["image"],
        "model": {
            "base": reward_model["base"],
            "adapters": {
                m: str(adapters / m) if (adapters / m).is_dir() else ""
                for m in ("progress", "contrastive", "completion")
            },
            "device": s.device,
            "dtype": "float32" if s.device == "cpu" else "auto",
            "max_batch_size": 4,
        },
        "modalities": ["progress", "completion"],
        "interval_frames": s.interval_frames,
        "completion_debounce": 2,
    }
    rec_params = {
        "data_root": str(work / "data"),
        "dataset_name": dataset,
        "robot_type": "so101_sim",
        "fps": 10,
        "cameras": ["front"],
        "action_type": "joint_state",
        "use_videos": False,
        "stop_waits_for_save": True,  # judged right after the round: every episode must be on disk
        "image_writer_threads": 0,
        "max_gap_s": 1.0,
        "environment_state_topic": ENV_STATE_TOPIC,
        "environment_state_type": "joint_state",  # stamped like the frame it belongs to
        "environment_state_names": list(ENV_STATE_NAMES),
    }
    sim_params = {
        "image_size": s.image_size,
        "camera_view": s.camera_view,
        "max_steps": s.max_steps,
        "seed": ROUND_SEED,
        "controller": "policy",
        "policy_path": policy_path,
        "policy_device": s.device,
    }
    py = sys.executable
    nodes = [
        NodeProcess(
            "sim_robot_node",
            [py, "-m", "lrm_reward.ros.sim_robot_node", "--ros-args", "--params-file",
             str(_params_file(work / "sim_robot_node.yaml", "sim_robot_node", sim_params))],
            work / "sim_robot_node.log",
            env,
        ),
        NodeProcess(
            "reward_node",
            [py, "-m", "lrm_reward.ros.reward_node", "--ros-args", "--params-file",
             str(_params_file(work / "reward_node.yaml", "reward_node", reward_params)),
             "-r", "image:=/camera/image"],
            work / "reward_node.log",
            env,
        ),
        NodeProcess(
            "refinement_node",
            [py, "-m", "lrm_reward.ros.refinement_node", "--ros-args", "--params-file",
             str(_params_file(work / "refinement_node.yaml", "refinement_node", rec_params)),
             "-r", "image:=/camera/image", "-r", "action:=/sim_robot_node/applied_action",
             "-r", "reward:=/reward_node/reward"],
            work / "refinement_node.log",
            env,
        ),
    ]  # fmt: skip
    return nodes


class DemoClient:
    """The demo's own ROS node: calls the nodes' services and listens to results and rewards."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        from lrm_interfaces.msg import RewardSignal
        from lrm_interfaces.srv import SetTask, StartEpisode, StopEpisode

        self.rclpy = rclpy
        rclpy.init()
        self.node = Node("lrm_demo")
        self.results: list[dict] = []
        self.rewards: list[RewardSignal] = []
        latched = QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node.create_subscription(
            String,
            "/sim_robot_node/episode_result",
            lambda m: self.results.append(json.loads(m.data)),
            latched,
        )
        self.node.create_subscription(RewardSignal, "/reward_node/reward", self.rewards.append, 100)
        self.sim_start = self.node.create_client(Trigger, "/sim_robot_node/start_episode")
        self.sim_result = self.node.create_client(Trigger, "/sim_robot_node/last_result")
        self.set_task = self.node.create_client(SetTask, "/reward_node/set_task")
        self.rec_start = self.node.create_client(StartEpisode, "/refinement_node/start_episode")
        self.rec_stop = self.node.create_client(StopEpisode, "/refinement_node/stop_episode")
        self.types = {
            "Trigger": Trigger,
            "SetTask": SetTask,
            "StartEpisode": StartEpisode,
            "StopEpisode": StopEpisode,
        }

    def wait_ready(self, nodes: list[NodeProcess]) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        clients = (self.sim_start, self.sim_result, self.set_task, self.rec_start, self.rec_stop)
        while not all(c.service_is_ready() for c in clients):
            for n in nodes:
                n.check()
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the nodes did not come up within {NODE_START_TIMEOUT_S:.0f} s "
                    f"(logs in {nodes[0].log_path.parent})"
                )
            self.rclpy.spin_once(self.node, timeout_sec=0.2)
        # The reward node answers set_task only once it is active (model loaded).
        while True:
            res = self.call(self.set_task, self.types["SetTask"].Request(task=TASK))
            if res.result == res.RESULT_OK:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"reward_node never became active: {res.message}")
            for n in nodes:
                n.check()
            time.sleep(0.5)

    def call(self, client, request, timeout: float = 120.0):
        future = client.call_async(request)
        self.rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        if not future.done():
            raise DemoError(f"service {client.srv_name} did not answer within {timeout:.0f} s")
        return future.result()

    def run_episode(self, policy_version: str, round_name: str, nodes: list[NodeProcess]) -> dict:
        T = self.types
        res = self.call(self.set_task, T["SetTask"].Request(task=TASK, reset_only=True))
        if res.result != res.RESULT_OK:
            raise DemoError(f"reward_node set_task: {res.message}")
        rec = self.call(
            self.rec_start,
            T["StartEpisode"].Request(task=TASK, notes=f"demo {round_name}", policy_version=policy_version),
        )
        if rec.result != rec.RESULT_OK:
            raise DemoError(f"refinement_node start_episode: {rec.message}")
        seen = len(self.results)
        started = self.call(self.sim_start, T["Trigger"].Request())
        if not started.success:
            raise DemoError(f"sim_robot_node start_episode: {started.message}")
        deadline = time.monotonic() + EPISODE_TIMEOUT_S
        episode = json.loads(started.message)["episode"]
        result, next_poll = None, time.monotonic() + 2.0
        while result is None:
            if len(self.results) > seen and self.results[-1]["episode"] == episode:
                result = self.results[-1]
            elif time.monotonic() > next_poll:  # the latched topic is the fast path; polling the safe one
                # A slow answer on a busy machine is not an error: the episode deadline decides.
                with contextlib.suppress(DemoError):
                    polled = self.call(self.sim_result, T["Trigger"].Request(), timeout=10.0)
                    if polled.success and json.loads(polled.message)["episode"] == episode:
                        result = json.loads(polled.message)
                next_poll = time.monotonic() + 2.0
            if time.monotonic() > deadline:
                raise DemoError(f"the sim episode did not finish within {EPISODE_TIMEOUT_S:.0f} s")
            for n in nodes:
                n.check()
            self.rclpy.spin_once(self.node, timeout_sec=0.1)
        # Wait for the reward of the last frame (or a little while): the recorder keeps what came.
        last = result["last_stamp"] - 1e-6
        wait_until = time.monotonic() + 10.0
        while time.monotonic() < wait_until:
            if any(r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 >= last for r in self.rewards[-5:]):
                break
            self.rclpy.spin_once(self.node, timeout_sec=0.05)
        truth = "success" if result["success"] else "failure"
        stop = self.call(
            self.rec_stop,
            T["StopEpisode"].Request(
                outcome=0, notes=f"simulator ground truth: {truth} (seed {result['seed']})"
            ),
        )
        if stop.result != stop.RESULT_OK:
            raise DemoError(f"refinement_node stop_episode: {stop.message}")
        return {
            "episode_index": int(stop.episode_index),
            "frames": int(stop.num_frames),
            "seed": result["seed"],
            "success": result["success"],
            "steps": result["steps"],
            "note": result["note"],
            "policy_version": policy_version,
        }

    def close(self) -> None:
        self.node.destroy_node()
        with contextlib.suppress(Exception):
            self.rclpy.try_shutdown()


def rollout(out: Path, s: DemoSettings, reward_model: dict, policy: dict, round_name: str) -> dict:
    work = fresh_dir(out / round_name)
    dataset = f"rollouts_{round_name}"
    nodes = start_nodes(work, s, reward_model, policy["path"], dataset)
    client = None
    episodes = []
    started = time.monotonic()
    try:
        client = DemoClient()
        say(f"{round_name}: starting sim_robot_node, reward_node, refinement_node (logs: {work})")
        client.wait_ready(nodes)
        bar = tqdm(range(s.episodes), desc=f"{round_name}: rollouts over ROS", unit="ep", leave=False)
        for _ in bar:
            ep = client.run_episode(policy["version"], round_name, nodes)
            episodes.append(ep)
            bar.set_postfix(successes=sum(e["success"] for e in episodes))
        rewards = len(client.rewards)
    finally:
        if client is not None:
            client.close()
        for n in nodes:
            n.stop()
    successes = sum(e["success"] for e in episodes)
    return {
        "dataset": str(work / "data" / dataset),
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / len(episodes),
        "policy_version": policy["version"],
        "reward_messages": rewards,
        "wall_s": time.monotonic() - started,
    }
