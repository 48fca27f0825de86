"""Launch the LRM reward node on one or more camera topics, optionally with rviz2 and PlotJuggler.

    ros2 launch lrm_reward reward.launch.py task:="put the giraffe in the bowl" image:=/camera/color/image_raw
    ros2 launch lrm_reward reward.launch.py task:="stack the cups" \
        image_topics:=/cam_left/image_raw,/cam_right/image_raw use_rviz:=true

The node subscribes to generic names (``image``, or ``image_0``..``image_N`` for several cameras) and this
file remaps them to the given topics. Everything else comes from the params file (config/reward_node.yaml
by default); a non-empty argument here overrides the file. Written for a ROS 2 Jazzy/Kilted install.
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.substitutions import FindPackageShare

PACKAGE = "lrm_reward"
ADAPTERS = ("progress", "contrastive", "completion")

ARGUMENTS = [
    ("task", "", "task text the reward model scores against (empty: the params file's, or ~/set_task later)"),
    ("image", "/camera/image_raw", "camera topic for a single camera (remapped onto the node's 'image')"),
    ("image_topics", "", "comma-separated camera topics for several cameras; overrides 'image' when set"),
    (
        "compressed",
        "false",
        "true: the topics carry sensor_msgs/CompressedImage (give the .../compressed topics)",
    ),
    (
        "multi_camera",
        "",
        "several cameras: per_camera (one reward stream each) or paired (joined side by side)",
    ),
    ("model_path", "", "base Qwen3-VL checkpoint folder or Hub id (empty: the params file's model.base)"),
    (
        "adapters",
        "",
        "folder holding the progress/, contrastive/, completion/ LoRA adapters (empty: params file)",
    ),
    ("device", "", "torch device, e.g. cuda, cuda:1, cpu (empty: the params file's model.device)"),
    ("readout", "", "logits (one forward pass per answer) or generate (greedy JSON) (empty: params file)"),
    ("autostart", "true", "configure + activate the lifecycle node at startup; false to drive it yourself"),
    ("params_file", "", "parameters YAML keyed by node name (empty: lrm_reward's config/reward_node.yaml)"),
    ("use_rviz", "false", "start rviz2 showing the annotated camera image"),
    ("use_plotjuggler", "false", "start PlotJuggler plotting progress, completion_prob and reward over time"),
]


def _topics(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _reward_node(context):
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    share = FindPackageShare(PACKAGE).perform(context)
    params_file = arg("params_file") or os.path.join(share, "config", "reward_node.yaml")

    overrides: dict = {"autostart": arg("autostart").lower() == "true"}
    if arg("task"):
        overrides["task"] = arg("task")
    topics = _topics(arg("image_topics")) or [arg("image")]
    if len(topics) == 1:
        remappings = [("image", topics[0])]
        overrides["image_topics"] = ["image"]
    else:
        generic = [f"image_{i}" for i in range(len(topics))]
        remappings = list(zip(generic, topics, strict=True))
        overrides["image_topics"] = generic
    overrides["compressed"] = arg("compressed").lower() == "true"
    if arg("multi_camera"):
        overrides["multi_camera"] = arg("multi_camera")
    if arg("model_path"):
        overrides["model.base"] = arg("model_path")
    if arg("adapters"):
        for name in ADAPTERS:
            overrides[f"model.adapters.{name}"] = os.path.join(arg("adapters"), name)
    if arg("device"):
        overrides["model.device"] = arg("device")
    if arg("readout"):
        overrides["model.readout"] = arg("readout")

    node = LifecycleNode(
        package=PACKAGE,
        executable="reward_node",
        name="reward_node",
        namespace="",
        parameters=[params_file, overrides],
        remappings=remappings,
        output="screen",
        emulate_tty=True,
    )
    return [node]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=text)
        for name, default, text in ARGUMENTS
    ]
    share = FindPackageShare(PACKAGE)
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "reward.rviz"])],
        condition=IfCondition(LaunchConfiguration("use_rviz")),
        output="log",
    )
    plotjuggler = Node(
        package="plotjuggler",
        executable="plotjuggler",
        arguments=["--layout", PathJoinSubstitution([share, "config", "reward_plotjuggler.xml"])],
        condition=IfCondition(LaunchConfiguration("use_plotjuggler")),
        output="log",
    )
    return LaunchDescription([*declared, OpaqueFunction(function=_reward_node), rviz, plotjuggler])
