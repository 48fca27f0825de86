"""Day -> night -> next day through ``ros2 launch lrm_reward self_improvement.launch.py use_sim:=true``:
reward_node (tiny LRM on the CPU), policy_node (a tiny ACT from a policy store) driving sim_robot_node,
refinement_node recording; one params file for all of them. Started in its own process group as a user
would, stopped with SIGINT, nothing left running.

Day: the policy drives the simulator, reward_node scores the camera live, the recorder saves the episode,
and ``refinement_node/judge_episode`` judges it through reward_node's ``~/judge_episodes`` action: the
judgment names the reward node's model, and no other node loads one.
Night: ``lrm-nightly`` (the documented systemd/cron entry point) runs the node's judge + refine + promote
while the launch keeps running; the judge step goes through the reward node too.
Next day: policy_node switches to the promoted version at its next episode, that episode is recorded as the
new version's, and ``lrm-policy list`` shows both versions with their episodes and judge counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

pytestmark = [pytest.mark.ros, pytest.mark.slow]

rclpy = pytest.importorskip("rclpy")
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from std_msgs.msg import String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from lrm_interfaces.msg import RewardSignal  # noqa: E402
from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode  # noqa: E402

LAUNCH_FILE = "self_improvement.launch.py"
TASK = "pick up the purple cube and place it on the green target"  # the simulator's task
IMAGE_SIZE = 96
START_TIMEOUT_S = 240  # five processes importing torch on two shared cores
LATCHED = QoSProfile(
    depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
)


class Launch:
    """`ros2 launch lrm_reward <file> ARGS` in its own process group, output in a log file."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["ros2", "launch", "lrm_reward", LAUNCH_FILE, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return re.sub(r"\x1b\[[0-9;]*m", "", self.log_path.read_text(errors="replace"))

    def stop(self, timeout: float = 60.0) -> int:
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
        os.killpg(self.proc.pid, signal.SIGKILL)
        return [line for line in found if line.strip()]


@pytest.fixture
def loop(tmp_path, tiny_lrm):
    from lrm_reward.policy.tiny_policy import store_tiny_act
    from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, STATE_KEY, image_key

    store = tmp_path / "policies"
    inputs = {image_key("front"): (3, IMAGE_SIZE, IMAGE_SIZE), STATE_KEY: (6,), ENV_STATE_KEY: (6,)}
    store_tiny_act(store, "act_pick", inputs, 4, bias=0.0)  # stands still: the episode runs to max_steps
    # the shipped params file, made quick for a 2-core CPU: short episodes, PNG frames instead of video
    params = yaml.safe_load((REPO / "config" / "self_improvement.yaml").read_text())
    params["reward_node"]["ros__parameters"].update(interval_frames=5)
    params["refinement_node"]["ros__parameters"].update(use_videos=False, dataset_name="day", max_gap_s=2.0)
    params["refinement_node"]["ros__parameters"]["judge"]["curve_every_k"] = 5
    # the night: a few refine steps; "both" keeps the day's episode whatever the tiny judge says of it
    nightly = params["refinement_node"]["ros__parameters"]["nightly"]
    nightly.update(datasets=["day"], steps=2, batch_size=2, refine_args=["--selection", "both"])
    params["sim_robot_node"]["ros__parameters"].update(max_steps=20, image_size=IMAGE_SIZE)
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    args = [
        f"params_file:={params_file}",
        "use_sim:=true",
        f"policy:={store / 'act_pick'}",
        f"task:={TASK}",
        f"data_root:={tmp_path / 'data'}",
        f"model_path:={tiny_lrm.base}",
        f"adapters:={tiny_lrm.base.parent}",
        "device:=cpu",
        "dtype:=float32",
    ]
    run = Launch(args, tmp_path / "launch.log")
    yield run, tmp_path / "data", store
    if run.proc.poll() is None:
        run.stop()
    run.leftovers()


class Operator:
    """The test's node: the episode services of the three nodes, the rewards and the sim's results."""

    def __init__(self, node, run: Launch) -> None:
        self.node, self.run = node, run
        self.rewards: list[RewardSignal] = []
        self.results: list[dict] = []
        node.create_subscription(RewardSignal, "/reward_node/reward", self.rewards.append, 100)
        node.create_subscription(
            String,
            "/sim_robot_node/episode_result",
            lambda m: self.results.append(json.loads(m.data)),
            LATCHED,
        )
        self.clients = {
            "record": node.create_client(StartEpisode, "/refinement_node/start_episode"),
            "save": node.create_client(StopEpisode, "/refinement_node/stop_episode"),
            "judge": node.create_client(JudgeEpisode, "/refinement_node/judge_episode"),
            "policy": node.create_client(StartEpisode, "/policy_node/start_episode"),
            "policy_stop": node.create_client(StopEpisode, "/policy_node/stop_episode"),
            "sim": node.create_client(Trigger, "/sim_robot_node/start_episode"),
        }

    def spin_until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.node.executor_for_test.spin_once(timeout_sec=0.05)
            if predicate():
                return True
            assert self.run.proc.poll() is None, f"the launch ended:\n{self.run.output()[-5000:]}"
        return predicate()

    def call(self, name: str, request, timeout: float = 120.0):
        client = self.clients[name]
        assert self.spin_until(client.service_is_ready, START_TIMEOUT_S), (
            f"{client.srv_name} never came up:\n{self.run.output()[-5000:]}"
        )
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout), f"{client.srv_name} did not answer"
        return future.result()


def drive_episode(op: Operator, version: str) -> tuple[dict, StopEpisode.Response]:
    """policy_node drives one sim episode as `version`; refinement_node records it (no operator label)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    # policy_node answers once it is active (policy loaded)
    while (res := op.call("policy", StartEpisode.Request(task=TASK, policy_version=version))).result != (
        StartEpisode.Response.RESULT_OK
    ):
        assert "is not active" in res.message and time.monotonic() < deadline, res.message
        op.spin_until(lambda: False, 1.0)
    # reward_node publishes once active
    assert op.spin_until(lambda: "]: active: scoring" in op.run.output(), START_TIMEOUT_S), op.run.output()[
        -5000:
    ]
    record = op.call("record", StartEpisode.Request(task=TASK, policy_version=version))
    assert record.result == StartEpisode.Response.RESULT_OK, record.message
    started = op.call("sim", Trigger.Request())
    assert started.success, started.message
    episode = json.loads(started.message)["episode"]
    assert op.spin_until(lambda: any(r["episode"] == episode for r in op.results), 120.0), op.run.output()[
        -5000:
    ]
    result = next(r for r in op.results if r["episode"] == episode)
    assert result["controller"] == "external" and result["steps"] > 0, result  # policy_node drove it
    op.call("policy_stop", StopEpisode.Request())
    op.spin_until(lambda: False, 1.0)  # the last rewards
    saved = op.call("save", StopEpisode.Request(outcome=StopEpisode.Request.OUTCOME_UNKNOWN), timeout=300.0)
    assert saved.result == StopEpisode.Response.RESULT_OK and saved.num_frames > 5, saved.message
    return res, saved


def judge(op: Operator, episode_index: int):
    judged = op.call("judge", JudgeEpisode.Request(dataset="day", episode_index=episode_index), timeout=300.0)
    assert judged.result == JudgeEpisode.Response.RESULT_OK, judged.message
    assert "/reward_node/judge_episodes" in judged.message, judged.message
    (judgment,) = judged.judgments
    assert judgment.episode_index == episode_index and judgment.verdict in (0, 1, 2)
    return judgment


def test_day_night_next_day_through_the_launch(ros_node, loop, tmp_path):
    run, data_root, store = loop
    op = Operator(ros_node, run)
    versions: list[str] = []
    ros_node.create_subscription(
        String, "/policy_node/policy_version", lambda m: versions.append(m.data), LATCHED
    )

    # ---- day 1: v0001 acts, scored live, recorded, judged through the reward node
    drive_episode(op, "act_pick/v0001")
    scored = [r for r in op.rewards if r.queried]
    assert scored, f"no reward scored live:\n{run.output()[-5000:]}"
    judgment = judge(op, 0)
    assert f"model {judgment.model_id} loaded" in run.output()  # the reward node's own model
    stored = json.loads((data_root / "day" / "judgments" / "episode_000000.json").read_text())
    assert stored["recorded_outcome"] == "unknown" and stored["model_id"] == judgment.model_id

    # ---- night: the documented entry point, with the day's launch still running
    night = subprocess.run(
        ["lrm-nightly", "--timeout", "900"], capture_output=True, text=True, timeout=1000, cwd=tmp_path
    )
    assert night.returncode == 0, f"{night.stdout[-3000:]}\n{night.stderr[-3000:]}\n{run.output()[-3000:]}"
    assert "judge + refine done" in night.stdout, night.stdout[-3000:]
    assert "--via-node /reward_node/judge_episodes" in night.stdout, night.stdout[-3000:]  # the log, followed
    assert (store / "act_pick" / "current").resolve().name == "v0002"

    # ---- next day: policy_node switches at its next episode; the episode is v0002's
    res, saved = drive_episode(op, "act_pick/v0002")
    assert "switched from act_pick/v0001" in res.message, res.message
    assert op.spin_until(lambda: versions and versions[-1] == "act_pick/v0002", 10.0), versions
    sidecar = json.loads(
        (data_root / "day" / "recording" / f"episode_{saved.episode_index:06d}.json").read_text()
    )
    assert sidecar["policy_version"] == "act_pick/v0002", sidecar
    judge(op, saved.episode_index)
    listed = subprocess.run(
        ["lrm-policy", "list", "--store", str(store), "--policy", "act_pick", "--data-root", str(data_root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[1 if line.startswith("*") else 0]: line for line in listed.stdout.splitlines()[2:]}
    assert rows["v0002"].startswith("*") and "v0001" in rows["v0002"], listed.stdout  # current; its parent
    for version in ("v0001", "v0002"):
        assert re.search(r"1 episodes, judge [01]/1", rows[version]), listed.stdout

    output = run.output()
    # one copy of the model: reward_node loaded it, nobody else did (night included)
    assert output.count("loading reward model") == 1, output[-5000:]
    assert len(re.findall(r"\[reward_node-\d+\] .*judge goal done", output)) >= 2, output[-5000:]
    assert run.stop() == 0, run.output()[-5000:]
    for node in ("reward_node", "refinement_node", "policy_node", "sim_robot_node"):  # no SIGTERM needed
        assert re.search(rf"\[{node}-\d+\]: process has finished cleanly", run.output()), run.output()[-5000:]
    assert run.leftovers() == []
