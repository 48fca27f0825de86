"""reward_node's ~/judge_episodes action in a real process, with a slow stand-in engine (a known answer and
0.15 s per model call, so a goal can be watched and canceled halfway):

- refused goals (outside the data root, missing dataset, a second goal while one runs) answer with their
  result code and a message; the node's /diagnostics counts them;
- a goal canceled in the middle of an episode ends CANCELED, the episodes finished before stay judged, the
  one under way has no judgment file (not even a temp file), and the next goal resumes with it;
- live scoring goes on while the node judges: camera frames keep getting rewards from the same engine;
- ``lrm-judge --via-node /reward_node`` judges through the node (no model loaded in the CLI);
- releasing the model (deactivate + cleanup) stops a running goal (RESULT_NO_MODEL, with what was finished)
  and goals sent while no model is loaded are answered RESULT_NO_MODEL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from node_process import NodeProcess

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
from action_msgs.msg import GoalStatus  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from lrm_interfaces.action import JudgeEpisodes  # noqa: E402
from lrm_interfaces.msg import RewardSignal  # noqa: E402

R = JudgeEpisodes.Result
NODE = "/reward_node"
ACTION = f"{NODE}/judge_episodes"
JUDGE_STATUS = "reward_node: judge"
SHAPE = (48, 64, 3)
RELIABLE = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
SRC = REPO / "ros2_ws" / "src" / "lrm_reward"

# The real node with a stand-in engine: progress = brightness / 200, completion = P(brightness > 150),
# 0.15 s per model call, like BrightnessEngine of the refinement tests.
SLOW_ENGINE_MAIN = """
import sys, time
import numpy as np
from lrm_reward.core.types import Answer, Modality
from lrm_reward.ros import reward_node

class SlowBrightnessEngine:
    model_id = "slow-brightness-engine"

    def __init__(self, cfg):
        pass

    def score(self, queries):
        time.sleep(0.15)
        out = []
        for q in queries:
            level = float(q.images[-1].mean())
            if q.modality is Modality.PROGRESS:
                out.append(Answer(q.modality, min(1.0, level / 200.0), parsed=True))
            else:
                out.append(Answer(q.modality, 1.0 / (1.0 + np.exp(-(level - 150.0) / 10.0)), parsed=True))
        return out

    def close(self):
        pass

sys.exit(reward_node.main(engine_factory=SlowBrightnessEngine))
"""


def record(root: Path, name: str, finals: list[float]) -> Path:
    """A dataset of len(finals) 2 s episodes (20 frames at 10 fps) whose brightness ramps to each final."""
    from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig, SaveStatus

    rec = EpisodeRecorder(
        RecorderConfig(data_root=root, cameras=("front",), fps=10, dataset_name=name, image_writer_threads=0)
    )
    for final in finals:
        rec.start("stack the cups")
        for k in range(40):
            t = k * 0.05
            rec.add_image("front", t, np.full(SHAPE, int(20 + (final - 20) * min(1.0, t / 1.6)), np.uint8))
            rec.add_state(t, [t, 0.0])
            rec.add_action(t, [t, 0.0])
        assert rec.stop().status is SaveStatus.SAVED
    rec.close()
    return root / name


class Judge:
    """The test side: the action client, a camera publisher, the node's rewards and diagnostics."""

    def __init__(self, node, process: NodeProcess) -> None:
        self.node, self.process = node, process
        self.client = ActionClient(node, JudgeEpisodes, ACTION)
        self.camera = node.create_publisher(Image, "/camera/image", RELIABLE)
        self.rewards: list[RewardSignal] = []
        self.diagnostics: list[DiagnosticArray] = []
        node.create_subscription(RewardSignal, f"{NODE}/reward", self.rewards.append, RELIABLE)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.change_state = node.create_client(ChangeState, f"{NODE}/change_state")

    def spin_until(self, predicate, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.node.executor_for_test.spin_once(timeout_sec=0.02)
            if predicate():
                return True
            assert self.process.alive(), self.process.log()[-3000:]
        return predicate()

    def send(self, feedback: list | None = None, **fields):
        assert self.spin_until(self.client.server_is_ready), f"no {ACTION}:\n{self.process.log()[-3000:]}"
        future = self.client.send_goal_async(
            JudgeEpisodes.Goal(**fields), feedback_callback=feedback_sink(feedback)
        )
        assert self.spin_until(future.done)
        handle = future.result()
        assert handle.accepted
        return handle

    def result(self, handle, timeout: float = 120.0) -> tuple[int, JudgeEpisodes.Result]:
        future = handle.get_result_async()
        assert self.spin_until(future.done, timeout), self.process.log()[-3000:]
        return future.result().status, future.result().result

    def judge(self, **fields) -> tuple[int, JudgeEpisodes.Result]:
        return self.result(self.send(**fields))

    def publish_frame(self, k: int) -> None:
        msg = Image(height=SHAPE[0], width=SHAPE[1], encoding="rgb8", step=SHAPE[1] * 3)
        msg.header.stamp.sec, msg.header.stamp.nanosec = 1000 + k, 0
        msg.data = np.full(SHAPE, 40 + k % 100, np.uint8).tobytes()
        self.camera.publish(msg)

    def judge_status(self):
        for array in reversed(self.diagnostics):
            for status in array.status:
                if status.name == JUDGE_STATUS:
                    return status
        return None

    def judge_values(self) -> dict[str, str]:
        status = self.judge_status()
        return {} if status is None else {kv.key: kv.value for kv in status.values}

    def wait_judging(self) -> None:
        """Until /diagnostics says a goal is being judged."""
        assert self.spin_until(lambda: "judging" in getattr(self.judge_status(), "message", ""), 30.0)

    def transition(self, transition_id: int) -> bool:
        assert self.spin_until(self.change_state.service_is_ready)
        future = self.change_state.call_async(ChangeState.Request(transition=Transition(id=transition_id)))
        assert self.spin_until(future.done)
        return future.result().success


def feedback_sink(feedback: list | None):
    return None if feedback is None else (lambda msg: feedback.append(msg.feedback))


@pytest.fixture
def judge_node(ros_node, tmp_path):
    data_root = tmp_path / "data"
    dataset = record(data_root, "night", [220.0, 60.0, 230.0])
    params = {
        "task": "stack the cups",
        "image_topics": ["image"],
        "model": {"base": "slow-brightness", "device": "cpu"},
        "interval_frames": 1,
        "judge": {"data_root": str(data_root), "queries_per_call": 2},
        "qos_overrides": {
            "/camera/image": {
                "subscription": {"reliability": "reliable", "depth": 100, "history": "keep_last"}
            }
        },
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({"reward_node": {"ros__parameters": params}}))
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    argv = [sys.executable, "-c", SLOW_ENGINE_MAIN, "--ros-args", "--params-file", str(params_file)]
    argv += ["-r", "image:=/camera/image"]
    process = NodeProcess(argv, tmp_path / "reward_node.log", env)
    yield Judge(ros_node, process), dataset, env
    process.stop()


def test_goal_carries_the_judge_settings_both_ways():
    from lrm_reward.refinement.judge import JudgeConfig
    from lrm_reward.ros.judge_action import config_from_goal, goal_for

    cfg = JudgeConfig(completion_last_n=2, success_threshold=0.6, progress_success_threshold=0.95)
    back = config_from_goal(goal_for("night", cfg), queries_per_call=4)
    assert back.thresholds() == cfg.thresholds()  # float32 on the wire, rounded back
    plain = config_from_goal(goal_for("night", JudgeConfig()), queries_per_call=4)
    assert plain.progress_success_threshold is None and plain.progress_threshold is None
    goal = goal_for("night", cfg)
    goal.progress_success_threshold = float("nan")
    with pytest.raises(ValueError, match="finite"):
        config_from_goal(goal, queries_per_call=4)


def test_judge_action_refuses_cancels_cleanly_resumes_and_shares_the_engine(judge_node, tmp_path):
    judge, dataset, env = judge_node
    judgments = dataset / "judgments"
    # the action server is up from the start; the model once configured (its reward publisher is made then)
    assert judge.spin_until(lambda: judge.node.count_publishers(f"{NODE}/reward") > 0, 120.0)

    # refused goals: a result code and a message each
    status, result = judge.judge(dataset="/etc")
    assert status == GoalStatus.STATUS_ABORTED and result.result == R.RESULT_OUTSIDE_DATA_ROOT, result.message
    status, result = judge.judge(dataset="missing")
    assert result.result == R.RESULT_NOT_FOUND and "missing" in result.message
    status, result = judge.judge(dataset="night", success_threshold=1.5)
    assert result.result == R.RESULT_BAD_REQUEST and "success_threshold" in result.message

    # every episode (3 x 4 model calls); cancel once episode 1 is half done, with camera frames coming in
    feedback: list = []
    handle = judge.send(feedback, dataset="night", curve_every_k=5)
    rewards_before = len(judge.rewards)
    k = 0
    while not any(f.episode_index == 1 and f.queries_done >= 4 for f in feedback):
        judge.publish_frame(k)  # 20 frames a second
        k += 1
        judge.spin_until(lambda: False, 0.05)
        assert k < 2000, judge.process.log()[-3000:]
    handle.cancel_goal_async()
    status, result = judge.result(handle)
    assert status == GoalStatus.STATUS_CANCELED and result.result == R.RESULT_CANCELED, result.message
    assert result.judged == 1 and [j.episode_index for j in result.judgments] == [0], result.message
    assert "stopped during episode 1" in result.message
    assert (judgments / "episode_000000.json").exists()
    assert not (judgments / "episode_000001.json").exists()  # no half judgment of the canceled episode
    assert not list(judgments.glob("*.tmp"))
    assert feedback[-1].episodes_total == 3
    # live scoring went on meanwhile: the camera frames got rewards from the same engine
    assert judge.spin_until(lambda: len(judge.rewards) > rewards_before + 3, 30.0), len(judge.rewards)
    assert any(r.queried for r in judge.rewards[rewards_before:])

    # the next goal resumes; a second goal meanwhile is refused as busy
    handle = judge.send(dataset=str(dataset), curve_every_k=5)
    judge.wait_judging()
    status, busy = judge.judge(dataset="night")
    assert busy.result == R.RESULT_BUSY and "one goal at a time" in busy.message
    status, result = judge.result(handle)
    assert status == GoalStatus.STATUS_SUCCEEDED and result.result == R.RESULT_OK, result.message
    assert (result.judged, result.reused) == (2, 1)
    assert [j.episode_index for j in result.judgments] == [0, 1, 2]
    assert [j.success for j in result.judgments] == [True, False, True]
    assert all(j.model_id == "slow-brightness-engine" for j in result.judgments)

    # the counters on /diagnostics
    assert judge.spin_until(lambda: judge.judge_values().get("ok") == "1", 10.0), judge.judge_values()
    values = judge.judge_values()
    assert values["action"] == ACTION
    assert {k: values[k] for k in ("canceled", "busy", "outside_data_root", "not_found", "bad_request")} == {
        "canceled": "1",
        "busy": "1",
        "outside_data_root": "1",
        "not_found": "1",
        "bad_request": "1",
    }
    assert values["episodes judged"] == "3" and "last error" not in values

    # lrm-judge --via-node: the CLI loads no model, the node judges
    argv = [sys.executable, "-m", "lrm_reward.refinement.judge_cli", str(dataset), "--via-node", NODE]
    cli = subprocess.run(
        [*argv, "--episodes", "2", "--force", "--every-k", "5", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert f"judged 1 by {NODE}" in cli.stdout, cli.stdout

    # releasing the model stops a running goal; without a model goals are refused
    handle = judge.send(dataset="night", force=True, curve_every_k=5)
    judge.wait_judging()
    assert judge.transition(Transition.TRANSITION_DEACTIVATE)
    assert judge.transition(Transition.TRANSITION_CLEANUP)
    status, result = judge.result(handle)
    assert status == GoalStatus.STATUS_ABORTED and result.result == R.RESULT_NO_MODEL, result.message
    assert "releasing its model" in result.message
    assert sorted(p.name for p in judgments.glob("episode_*")) == [f"episode_00000{i}.json" for i in range(3)]
    assert not list(judgments.glob("*.tmp"))
    status, result = judge.judge(dataset="night")
    assert result.result == R.RESULT_NO_MODEL and "holds no reward model" in result.message
    assert judge.process.stop() == 0, judge.process.log()[-3000:]
