"""A bag recorded from our own sim_robot_node imports into the recorder's layout.

The test records the way `ros2 bag record` does: raw (still serialized) messages off the wire, written
with their definitions and receive times -- here with rosbags' writer, as the PyPI ROS wheels have no
rosbag2. Then lrm-import-bag's importer splits it at silences and at the sim's episode_result markers.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import spin_until
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rosbags.rosbag2 import StoragePlugin, Writer
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger

from lrm_reward.bags.bag_source import default_typestore
from lrm_reward.bags.importer import EXIT_OK, ImportConfig, import_bags
from lrm_reward.bags.mapping import MappingSpec
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES

pytestmark = pytest.mark.ros

TOPICS = {
    "/camera/image": (Image, "sensor_msgs/msg/Image"),
    "/joint_states": (JointState, "sensor_msgs/msg/JointState"),
    "/environment_state": (JointState, "sensor_msgs/msg/JointState"),
    "/sim_robot_node/applied_action": (JointState, "sensor_msgs/msg/JointState"),
    "/sim_robot_node/episode_result": (String, "std_msgs/msg/String"),
}
RESULT = "/sim_robot_node/episode_result"


def record_two_episodes(start_node, ros_node, bag_path) -> list[dict]:
    sim = start_node(
        "lrm_reward",
        "sim_robot_node",
        params={"image_size": 32, "max_steps": 8, "rate_hz": 20.0, "controller": "expert", "seed": 3},
    )
    store = default_typestore()
    results: list[dict] = []
    writer = Writer(bag_path, version=9, storage_plugin=StoragePlugin.MCAP)
    writer.open()
    try:
        connections = {t: writer.add_connection(t, name, typestore=store) for t, (_, name) in TOPICS.items()}

        def on_message(topic: str, raw: bytes) -> None:
            writer.write(connections[topic], time.time_ns(), raw)
            if topic == RESULT:
                results.append(json.loads(store.deserialize_cdr(raw, TOPICS[RESULT][1]).data))

        qos = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE)
        for topic, (cls, _) in TOPICS.items():
            ros_node.create_subscription(cls, topic, lambda raw, t=topic: on_message(t, raw), qos, raw=True)
        start = ros_node.create_client(Trigger, "/sim_robot_node/start_episode")
        assert spin_until(
            ros_node,
            lambda: start.service_is_ready() and all(ros_node.count_publishers(t) for t in TOPICS),
            60.0,
            sim,
        ), sim.log()[-3000:]
        spin_until(ros_node, lambda: False, 1.0)  # let the sim's publishers match our subscriptions too
        for episode in (1, 2):
            future = start.call_async(Trigger.Request())
            assert spin_until(ros_node, future.done, 60.0, sim) and future.result().success, sim.log()[-3000:]
            assert spin_until(ros_node, lambda n=episode: len(results) >= n, 60.0, sim), sim.log()[-3000:]
            spin_until(ros_node, lambda: False, 1.5)  # a silence between episodes (the gap split's cue)
    finally:
        writer.close()
    return results


def test_a_bag_recorded_from_sim_robot_node_imports_split_at_gaps_and_at_markers(
    start_node, ros_node, tmp_path
):
    bag = tmp_path / "sim_bag"
    results = record_two_episodes(start_node, ros_node, bag)
    steps = [r["steps"] for r in results]

    # split at silences: every frame the sim published, one per 0.1 s of simulated time
    by_gap = import_bags(
        [bag],
        ImportConfig(
            tmp_path / "by_gap",
            MappingSpec(
                fps=10,
                task="put the cube in the bowl",
                cameras={"front": "/camera/image"},
                split="gap",
                gap_s=1.0,
            ),
            use_videos=False,
            image_writer_threads=0,
        ),
    )
    assert by_gap.exit_code() == EXIT_OK, by_gap.message
    assert [e.num_frames for e in by_gap.episodes] == [s + 1 for s in steps]
    side = json.loads((tmp_path / "by_gap" / "recording" / "episode_000000.json").read_text())
    assert side["provenance"]["topics"] == {
        "observation.images.front": "/camera/image",
        "observation.state": "/joint_states",
        "action": "/sim_robot_node/applied_action",
        "observation.environment_state": "/environment_state",
    }
    assert side["dataset_t0_s"] == pytest.approx(results[0]["first_stamp"], abs=1e-6)

    # split at the sim's own markers: task and outcome come from its episode_result
    by_marker = import_bags(
        [bag],
        ImportConfig(
            tmp_path / "by_marker",
            MappingSpec(
                fps=10, cameras={"front": "/camera/image"}, split="marker", marker=RESULT, marker_at="end"
            ),
            use_videos=False,
            image_writer_threads=0,
        ),
    )
    assert by_marker.exit_code() == EXIT_OK, by_marker.message
    assert [e.task for e in by_marker.episodes] == [r["task"] for r in results]
    for e, result in enumerate(results):
        side = json.loads((tmp_path / "by_marker" / "recording" / f"episode_{e:06d}.json").read_text())
        assert side["outcome"] == ("success" if result["success"] else "failure")
        # a frame published just before the marker may reach the recorder just after it
        assert result["steps"] <= side["num_frames"] <= result["steps"] + 1

    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("lrm/by_gap", root=tmp_path / "by_gap", video_backend="pyav")
    assert ds.meta.features["observation.environment_state"]["names"] == list(ENV_STATE_NAMES)
    assert ds.meta.features["observation.state"]["names"] == list(JOINT_NAMES)
    assert ds.meta.features["action"]["names"] == list(ACTION_NAMES)
    assert ds[0]["observation.images.front"].shape == (3, 32, 32)
