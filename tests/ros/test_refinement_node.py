"""refinement_node over real ROS 2 topics and services (loopback-only namespace): record synthetic episodes,
auto-stop on completion, refuse bad requests, judge with the tiny reward model; stock lerobot loads the
dataset."""

from __future__ import annotations

import json
import math
import os
import signal
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
TINY_ACT = {
    "dim_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "n_vae_encoder_layers": 1,
    "latent_dim": 4,
    "chunk_size": 4,
    "n_action_steps": 4,
}


def _start_node(tmp_path: Path, params: dict) -> NodeProcess:
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
    return NodeProcess(argv, tmp_path / "node.log", env)


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
        "shutdown_save_timeout_s": 10.0,  # no saver left behind by a failed test
        "auto_stop.completed_frames": 3,
        # header-stamped like the other streams (a Float64MultiArray would be stamped on receipt, and
        # this test's stamps are synthetic); names from the first message
        "environment_state_topic": "object_pose",
        "environment_state_type": "joint_state",
        "judge.mode": "local",  # no reward_node here: the fallback that loads a model of its own
        "judge.model": str(tiny_lrm.base),
        "judge.adapters": ",".join(f"{m}={tiny_lrm.adapters[m]}" for m in ("progress", "completion")),
        "judge.device": "cpu",
        "nightly.datasets": ["run"],
        "nightly.store": str(tmp_path / "policies"),
        "nightly.policy": "act_pick",
        "nightly.demos": [str(tmp_path / "data" / "run")],  # the tiny judge may call nothing a success
        "nightly.steps": 2,
        "nightly.batch_size": 4,
        "nightly.refine_args": ["--from-scratch", "--policy-config", json.dumps(TINY_ACT)],
        "nightly.keep_best": True,  # no version yet: the step keeps current (none) and the night goes on
    }
    node = _start_node(tmp_path, params)
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
    node,
    pubs,
    t0: float,
    duration: float,
    completed_after: float | None = None,
    faults=False,
    freeze: tuple[NodeProcess, float, float] | None = None,
):
    """Publish one episode in real time; `freeze` = (process, at_s, for_s) SIGSTOPs the node meanwhile."""
    from sensor_msgs.msg import Image, JointState

    from lrm_interfaces.msg import RewardSignal

    events = [(t, "img") for t in np.arange(0, duration, 0.05)]
    events += [(t, "state") for t in np.arange(0, duration, 0.02)]
    events += [(t, "action") for t in np.arange(0, duration, 0.05)]
    events += [(t, "reward") for t in np.arange(0, duration, 0.1)]
    events += [(t, "env") for t in np.arange(0, duration, 0.05)]
    events.sort(key=lambda e: e[0])
    sent = {"action": 0}
    frozen = False
    wall0 = time.monotonic()
    for i, (rel, kind) in enumerate(events):
        if freeze is not None and not frozen and rel >= freeze[1]:
            freeze[0].proc.send_signal(signal.SIGSTOP)
            frozen = True
        if frozen and rel >= freeze[1] + freeze[2]:
            freeze[0].proc.send_signal(signal.SIGCONT)
            freeze, frozen = None, False
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
        elif kind == "env":
            msg = JointState(name=["cube_x", "cube_y"], position=[float(rel), 2.0 * float(rel)])
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


def _publishers(node) -> dict:
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    from lrm_interfaces.msg import RewardSignal

    # the publishers keep 4 s of messages, like a robot driver on reliable QoS: a node that falls behind
    # for a moment still gets everything (its own queues are the subject of these tests)
    return {
        "img": node.create_publisher(Image, "image", qos_profile_sensor_data),
        "state": node.create_publisher(JointState, "joint_states", 200),
        "action": node.create_publisher(JointState, "action", 200),
        "reward": node.create_publisher(RewardSignal, "reward", 200),
        "env": node.create_publisher(JointState, "object_pose", 200),
    }


def _connect(node, process):
    """Publishers, a /diagnostics collector and start/stop clients, once the node has subscribed."""
    from diagnostic_msgs.msg import DiagnosticArray

    from lrm_interfaces.srv import StartEpisode, StopEpisode

    pubs = _publishers(node)
    diagnostics: list = []
    node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    start = node.create_client(StartEpisode, f"/{NODE}/start_episode")
    stop = node.create_client(StopEpisode, f"/{NODE}/stop_episode")
    subscribed = spin_until(
        node, lambda: all(p.get_subscription_count() > 0 for p in pubs.values()), 60.0, process
    )
    assert subscribed, process.log()[-3000:]
    return pubs, diagnostics, start, stop


def test_records_judges_and_refuses_bad_requests(ros_node, refinement_node):

    from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode

    process, data_root = refinement_node
    node = ros_node
    pubs, diagnostics, start, stop = _connect(node, process)
    judge = node.create_client(JudgeEpisode, f"/{NODE}/judge_episode")

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
        # stop answers once the saver process has written the episode: slow on a loaded machine
        request = StopEpisode.Request(outcome=StopEpisode.Request.OUTCOME_SUCCESS)
        res = _call(node, stop, request, process, timeout=600.0)
        assert res.result == StopEpisode.Response.RESULT_OK, res.message
        assert res.episode_index == index and 15 <= res.num_frames <= 20, res.message
        assert "messages received: action 40, camera:front 40" in res.message
        side = json.loads((data_root / "run" / "recording" / f"episode_{index:06d}.json").read_text())
        # every message of the episode reached the recorder (the stop drains what is still queued)
        assert side["received"]["camera:front"] == 40, side["received"]
        assert side["received"]["state"] + side["dropped"]["nan_states"] == 100, side
        assert side["received"]["action"] + side["dropped"]["bad_actions"] == 40, side
        # no gap in any publisher's sequence numbers, and the node's count agrees with the recorder's
        assert all(t["lost"] == 0 for t in side["transport"].values()), side["transport"]
        assert side["transport"]["state"]["received"] == 100, side["transport"]

    # episode 2: the reward node reports completion from 1.2 s on -> the node stops by itself
    res = _call(node, start, StartEpisode.Request(task="put the giraffe in the bowl"), process)
    assert res.result == StartEpisode.Response.RESULT_OK
    _publish_episode(node, pubs, 2000.0, 2.0, completed_after=1.2)
    sidecar = data_root / "run" / "recording" / "episode_000002.json"
    assert spin_until(node, sidecar.exists, 600.0, process), process.log()[-3000:]
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
    # episodes 0 and 1 were stopped as successes: the judge is compared with those labels
    assert "operator labels on 2 episodes (2 success, 0 failure)" in res.message, res.message
    assert all(j.verdict in (0, 1, 2) and j.model_id for j in res.judgments)
    assert (data_root / "run" / "judgments" / "episode_000002.json").exists()

    # stock lerobot loads what the node wrote
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("lrm/run", root=data_root / "run", video_backend="pyav")
    assert ds.num_episodes == 3
    assert ds.features["observation.state"]["names"] == ["shoulder", "elbow"]
    assert ds.features["observation.environment_state"]["names"] == ["cube_x", "cube_y"]
    env = ds[5]["observation.environment_state"].numpy()
    assert env[1] == pytest.approx(2.0 * env[0], abs=1e-5)
    states = np.stack([ds[i]["observation.state"].numpy() for i in range(len(ds))])
    assert np.all(np.isfinite(states))
    assert process.alive()
    values = {}
    for msg in diagnostics:
        for status in msg.status:
            values.update({kv.key: kv.value for kv in status.values})
    assert int(values["received camera:front (total)"]) >= 80
    assert values["saves in progress"] == "0"

    # the nightly loop on demand: judge (already done: reused) + refine a tiny ACT, in a child process
    from std_srvs.srv import Trigger

    nightly = node.create_client(Trigger, f"/{NODE}/run_nightly")
    res = _call(node, nightly, Trigger.Request(), process)
    assert res.success, res.message
    again = _call(node, nightly, Trigger.Request(), process)
    assert not again.success and "already running" in again.message

    def nightly_status() -> dict[str, str]:
        out: dict[str, str] = {}
        for msg in diagnostics[-3:]:
            for status in msg.status:
                out.update({kv.key: kv.value for kv in status.values})
        return out

    finished = spin_until(node, lambda: "nightly last exit code" in nightly_status(), 600.0, process)
    log_path = Path(nightly_status().get("nightly log", "/nonexistent"))
    log = log_path.read_text() if log_path.exists() else ""
    assert finished, log[-3000:]
    assert nightly_status()["nightly last exit code"] == "0", log[-3000:]
    assert log_path.is_relative_to(data_root / "nightly")
    assert "current stays" in log and "=== keep best exited with 0" in log, log[-3000:]
    assert (process_root := data_root.parent / "policies" / "act_pick" / "v0001").is_dir(), log[-3000:]
    assert (process_root.parent / "current").exists()


def test_counts_messages_lost_while_the_node_is_frozen(ros_node, tmp_path):
    """With tiny queues and the node process stopped for 1 s, messages are lost, and the node says exactly
    how many (publisher sequence numbers): received + lost = published, per stream."""

    from lrm_interfaces.srv import StartEpisode, StopEpisode

    params = {
        "data_root": str(tmp_path / "data"),
        "dataset_name": "run",
        "fps": 10,
        "cameras": ["front"],
        "use_videos": False,
        "saver": "inline",
        "max_gap_s": 5.0,
        "queue_depth": 5,
        "image_queue_depth": 5,
        "environment_state_topic": "object_pose",
        "environment_state_type": "joint_state",
    }
    process = _start_node(tmp_path, params)
    try:
        node = ros_node
        pubs, diagnostics, start, stop = _connect(node, process)
        res = _call(node, start, StartEpisode.Request(task="pick"), process)
        assert res.result == StartEpisode.Response.RESULT_OK, res.message
        _publish_episode(node, pubs, 3000.0, 2.0, freeze=(process, 0.5, 1.0))
        spin_until(node, lambda: False, 1.0)
        res = _call(node, stop, StopEpisode.Request(outcome=StopEpisode.Request.OUTCOME_SUCCESS), process)
        assert res.result == StopEpisode.Response.RESULT_OK, res.message
        assert "LOST before the node could take them" in res.message, res.message
        side = json.loads((tmp_path / "data" / "run" / "recording" / "episode_000000.json").read_text())
        transport = side["transport"]
        published = {"state": 100, "camera:front": 40, "action": 40, "environment_state": 40, "reward": 20}
        for stream, count in published.items():
            assert transport[stream]["received"] + transport[stream]["lost"] == count, (stream, transport)
        # 50 states were sent while the node was stopped; its queue holds 5
        assert transport["state"]["lost"] >= 30, transport

        def lost_on_diagnostics() -> int | None:
            for msg in reversed(diagnostics):
                for status in msg.status:
                    for kv in status.values:
                        if kv.key == "lost state (total)":
                            return int(kv.value)
            return None

        assert spin_until(node, lambda: lost_on_diagnostics() is not None, 5.0, process)
        assert lost_on_diagnostics() == transport["state"]["lost"]
        assert process.alive()
    finally:
        process.stop()


def test_sequence_gaps_are_followed_per_publisher():
    """Two publishers on one topic interleave their numbers: only real jumps count as lost."""
    from lrm_reward.ros.refinement_intake import StreamStats as _StreamStats

    def info(publisher: int, seq: int | None) -> dict:
        return {"publication_sequence_number": seq, "publisher_gid": {"data": bytes([publisher]) * 16}}

    stats = _StreamStats()
    gaps = [stats.sequence_gap(info(p, q)) for p, q in [(1, 1), (2, 1), (1, 2), (2, 2), (1, 5), (2, 3)]]
    assert gaps == [0, 0, 0, 0, 2, 0] and stats.counted
    assert stats.sequence_gap(info(1, 1)) == 0  # a restarted publisher starts again: not a loss
    unsupported = _StreamStats()
    assert unsupported.sequence_gap(info(1, None)) == 0 and not unsupported.counted
    assert unsupported.report()["lost"] is None


def test_messages_of_a_stopped_episode_that_arrive_late_are_recognised():
    from std_msgs.msg import Header

    from lrm_reward.ros.refinement_intake import StreamStats as _StreamStats

    def header(t: float) -> Header:
        h = Header()
        h.stamp.sec, h.stamp.nanosec = int(t), round((t - int(t)) * 1e9)
        return h

    stats = _StreamStats()
    # synthetic stamps (t = 100 s) arriving with ~1e9 s of clock offset: best transit = now - 100
    stats.received(header(100.0), 0)
    offset = stats.best_delay
    assert not stats.late_for_stopped_episode(header(100.0))  # no stop yet
    stats.stopped_at = 100.0 + offset + 0.5  # stopped half a second after that message was sent
    assert stats.late_for_stopped_episode(header(100.2))  # sent before the stop, taken after it
    assert not stats.late_for_stopped_episode(header(100.6))  # sent after the stop: not the episode's
    assert not stats.late_for_stopped_episode(Header())  # no stamp: cannot tell
