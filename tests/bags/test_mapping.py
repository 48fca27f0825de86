"""The import mapping: YAML in, defaults by message type, and a clear refusal for what does not fit."""

from __future__ import annotations

import pytest

from lrm_reward.bags.mapping import (
    AUTO,
    MappingError,
    MappingSpec,
    TopicSpec,
    camera_name_from_topic,
    load_mapping,
    resolve_mapping,
)

# What a sim_robot_node run recorded with `ros2 bag record -a` holds.
SIM_TOPICS = {
    "/camera/image": "sensor_msgs/msg/Image",
    "/joint_states": "sensor_msgs/msg/JointState",
    "/environment_state": "sensor_msgs/msg/JointState",
    "/sim_robot_node/applied_action": "sensor_msgs/msg/JointState",
    "/sim_robot_node/success": "std_msgs/msg/Bool",
    "/sim_robot_node/episode_result": "std_msgs/msg/String",
    "/reward": "lrm_interfaces/msg/RewardSignal",
    "/rosout": "rcl_interfaces/msg/Log",
}


def test_defaults_by_message_type_and_name_cover_a_sim_robot_bag():
    m = resolve_mapping(MappingSpec(), SIM_TOPICS)
    assert [(c.name, c.topic, c.compressed) for c in m.cameras] == [("camera", "/camera/image", False)]
    assert m.state.topic == "/joint_states" and m.state.field == "position"
    assert m.action.topic == "/sim_robot_node/applied_action" and m.action.joint_state
    assert m.environment_state is not None and m.environment_state.topic == "/environment_state"
    assert m.reward == "/reward" and m.task_topic is None and m.marker is None
    assert m.feature_topics() == {
        "observation.images.camera": "/camera/image",
        "observation.state": "/joint_states",
        "action": "/sim_robot_node/applied_action",
        "observation.environment_state": "/environment_state",
        "reward.*": "/reward",
    }
    # the shared FeatureTopics definition: what a policy trained on it would read
    assert m.features.environment_state and m.features.camera_topics() == {"camera": "/camera/image"}


def test_yaml_mapping_names_cameras_fields_and_markers(tmp_path):
    path = tmp_path / "mapping.yaml"
    path.write_text(
        """
fps: 10
task: put the cube in the bowl
cameras: {front: camera/image}
state: {topic: /joint_states, field: velocity, names: [b, a]}
action: /sim_robot_node/applied_action
environment_state: null
reward: null
episodes: {split: marker, marker: /sim_robot_node/episode_result, marker_at: end}
stamps: receive
"""
    )
    spec = load_mapping(path)
    assert spec.fps == 10 and spec.cameras == {"front": "/camera/image"} and spec.stamps == "receive"
    assert spec.state == TopicSpec("/joint_states", "velocity", ("b", "a"))
    m = resolve_mapping(spec, SIM_TOPICS)
    assert m.cameras[0].name == "front" and m.environment_state is None and m.reward is None
    assert m.marker == "/sim_robot_node/episode_result" and m.marker_type == "std_msgs/msg/String"
    assert m.features.state_names == ("b", "a") and m.features.state_field == "velocity"
    assert "/sim_robot_node/episode_result" in m.topics()


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("camras: {front: /x}", "unknown mapping keys ['camras']"),
        ("episodes: {split: marker}", "needs episodes.marker"),
        ("episodes: {split: sometimes}", "episodes.split must be one of"),
        ("state: {topic: /j, field: torque}", "field must be one of"),
        ("fps: 0", "fps must be an integer"),
        ("state: null", "state is required"),
        ("- a list", "must be a YAML mapping"),
    ],
)
def test_bad_mappings_are_refused_on_load(tmp_path, yaml_text, message):
    path = tmp_path / "m.yaml"
    path.write_text(yaml_text)
    with pytest.raises(MappingError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_mapping(path)


def test_a_mapped_topic_missing_from_the_bag_is_named():
    spec = MappingSpec(action=TopicSpec("/leader/joint_states"))
    with pytest.raises(
        MappingError, match=r"topic /leader/joint_states \(mapped as action\) is not in the bag"
    ):
        resolve_mapping(spec, SIM_TOPICS)


def test_a_mapped_topic_of_a_type_the_importer_cannot_read_is_named():
    topics = {**SIM_TOPICS, "/lidar": "sensor_msgs/msg/PointCloud2"}
    with pytest.raises(
        MappingError, match=r"/lidar \(mapped as camera front\) has message type sensor_msgs/msg/Point"
    ):
        resolve_mapping(MappingSpec(cameras={"front": "/lidar"}), topics)
    with pytest.raises(MappingError, match="mixed types"):
        resolve_mapping(MappingSpec(state=TopicSpec("/joint_states")), {**SIM_TOPICS, "/joint_states": None})


def test_defaults_that_are_absent_or_ambiguous_ask_for_a_mapping():
    no_action = {k: v for k, v in SIM_TOPICS.items() if "applied_action" not in k}
    with pytest.raises(MappingError, match=r"no action topic.*map it"):
        resolve_mapping(MappingSpec(), no_action)
    two_actions = {**SIM_TOPICS, "/action": "std_msgs/msg/Float64MultiArray"}
    with pytest.raises(MappingError, match="several topics could be the action"):
        resolve_mapping(MappingSpec(), two_actions)
    with pytest.raises(MappingError, match="no sensor_msgs/Image or CompressedImage topic"):
        resolve_mapping(MappingSpec(), {"/joint_states": "sensor_msgs/msg/JointState"})


def test_one_topic_cannot_be_two_features_but_state_and_action_may_share_a_joint_state():
    with pytest.raises(MappingError, match="mapped to more than one feature"):
        resolve_mapping(MappingSpec(action=TopicSpec("/joint_states")), SIM_TOPICS)
    m = resolve_mapping(MappingSpec(action=TopicSpec("/joint_states", field="effort")), SIM_TOPICS)
    assert m.action.topic == m.state.topic and m.action.field == "effort"


def test_float_array_environment_state_needs_names():
    topics = {**SIM_TOPICS, "/environment_state": "std_msgs/msg/Float64MultiArray"}
    with pytest.raises(MappingError, match="environment_state_names is required"):
        resolve_mapping(MappingSpec(), topics)
    spec = MappingSpec(environment_state=TopicSpec(AUTO, names=("x", "y")))
    assert resolve_mapping(spec, topics).features.environment_state_names == ("x", "y")


def test_camera_names_come_from_the_topic_without_its_transport_suffixes():
    assert camera_name_from_topic("/wrist/image_raw/compressed") == "wrist"
    assert camera_name_from_topic("/camera/image") == "camera"
    assert camera_name_from_topic("/image") == "image"
    assert camera_name_from_topic("/robot/cam front/color/image_rect_color") == "color"
    topics = {"/a/cam/image": "sensor_msgs/msg/Image", "/b/cam/image": "sensor_msgs/msg/CompressedImage"}
    topics.update({"/joint_states": "sensor_msgs/msg/JointState", "/action": "sensor_msgs/msg/JointState"})
    names = [c.name for c in resolve_mapping(MappingSpec(), topics).cameras]
    assert names == ["cam", "cam_"]
