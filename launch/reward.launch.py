"""Launch the LRM reward node on one or more camera topics, optionally with rviz2 and PlotJuggler.

    ros2 launch lrm_reward reward.launch.py task:="put the giraffe in the bowl" image:=/camera/color/image_raw
    ros2 launch lrm_reward reward.launch.py task:="stack the cups" \
        image_topics:=/cam_left/image_raw,/cam_right/image_raw use_rviz:=true
    ros2 launch lrm_reward reward.launch.py --show-args     # every argument, with its description

The node subscribes to generic names (``image``, or ``image_0``..``image_N`` for several cameras) and this
file remaps them to the given topics. Everything else comes from the params file (config/reward_node.yaml
by default); an argument given here overrides the file, an argument left empty leaves the file's value.
``adapters:=DIR`` takes whichever of DIR/progress, DIR/contrastive, DIR/completion exist (as lrm-judge's
``--adapters`` does) and clears the others. rviz2 and PlotJuggler start only where they are installed;
elsewhere a WARN says so and the node runs alone.

If the node cannot configure (weights missing, a bad parameter) this file logs an ERROR naming the fix and,
when the node was meant to come up by itself (``autostart``), ends the launch with exit code 1: a reward node
that holds no model helps nobody, and its read-only model parameters need a relaunch anyway. With
``autostart:=false`` a lifecycle manager owns the node, so the launch only reports the failure.

What it is not: a lifecycle manager, or a check of the weights before the node tries them (the node's
own load is the one truth). Written for a ROS 2 Jazzy/Kilted install (or the launch stack from
../shared/ros2-launch that scripts/setup.sh installs without one).
"""

from __future__ import annotations

import os

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessIO
from launch.logging import get_logger
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition

from lrm_reward.refinement.judge import parse_adapters

PACKAGE = "lrm_reward"
NODE_NAME = "reward_node"
ADAPTERS = ("progress", "contrastive", "completion")
CONFIGURE_FAILED_LINE = "configure failed"  # reward_node logs every failed configure with this
DOWNLOAD_HINT = (
    "download the released weights once: "
    "huggingface-cli download Qwen/Qwen3-VL-8B-Instruct --local-dir ~/models/Qwen3-VL-8B-Instruct && "
    "huggingface-cli download USC-PSI-Lab/LRM-models --local-dir ~/models/LRM-models, then launch with "
    "model_path:=~/models/Qwen3-VL-8B-Instruct adapters:=~/models/LRM-models"
)

# (name, default, description). An empty default means "the params file's value".
ARGUMENTS = [
    ("task", "", "task text the reward model scores against (empty: the params file's, or ~/set_task later)"),
    ("image", "/camera/image_raw", "camera topic for a single camera (remapped onto the node's 'image')"),
    (
        "image_topics",
        "",
        "comma-separated camera topics for several cameras (remapped onto image_0, image_1, ...); "
        "overrides 'image' and the params file's image_topics when set",
    ),
    (
        "compressed",
        "",
        "true: the topics carry sensor_msgs/CompressedImage (give the .../compressed topics); "
        "or one true/false per camera, comma-separated (empty: the params file's)",
    ),
    (
        "multi_camera",
        "",
        "several cameras: per_camera (one reward stream each) or paired (joined side by side) "
        "(empty: the params file's)",
    ),
    ("model_path", "", "base Qwen3-VL checkpoint folder or Hub id (empty: the params file's model.base)"),
    (
        "adapters",
        "",
        "folder holding progress/, contrastive/, completion/ LoRA adapters (whichever exist are used), or "
        "'progress=DIR,completion=DIR' (empty: the params file's model.adapters)",
    ),
    ("device", "", "torch device, e.g. cuda, cuda:1, cpu (empty: the params file's model.device)"),
    ("dtype", "", "weights dtype: auto, bfloat16, float16 or float32 (empty: the params file's model.dtype)"),
    (
        "compile",
        "",
        "static suffix pass: off, cuda-graphs, compile+cuda-graphs, ... (GPU; empty: the params file's)",
    ),
    (
        "readout",
        "",
        "logits (reads the answer's token probabilities) or generate (greedy JSON) (empty: params file)",
    ),
    (
        "modalities",
        "",
        "comma-separated adapters asked on a queried frame, of progress, contrastive, completion "
        "(empty: the params file's)",
    ),
    ("interval_frames", "", "ask the model every k frames (paper: k=10) (empty: the params file's)"),
    (
        "autostart",
        "",
        "true: configure + activate at startup; false: leave it unconfigured for a lifecycle manager "
        "(empty: the params file's, true by default)",
    ),
    ("namespace", "", "ROS namespace of the node (its topics become /<namespace>/reward_node/...)"),
    ("use_sim_time", "", "true: take time from /clock, e.g. with a simulator or a bag (empty: false)"),
    ("params_file", "", "parameters YAML keyed by node name (empty: lrm_reward's config/reward_node.yaml)"),
    ("use_rviz", "false", "start rviz2 showing the annotated camera image (where rviz2 is installed)"),
    (
        "use_plotjuggler",
        "false",
        "start PlotJuggler plotting progress, completion_prob and reward over time (where installed)",
    ),
]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _topics(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _bool(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"launch argument {name}:={value!r} must be true or false")


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"launch argument {name}:={value!r} must be an integer") from None


def file_parameters(params_file: str) -> dict:
    """The node's parameters in a params file (keyed by node name or '/**'), flattened to dotted names."""
    with open(params_file) as f:
        data = yaml.safe_load(f) or {}
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}{key}.", sub)
        else:
            flat[prefix[:-1]] = value

    for key in ("/**", NODE_NAME, f"/{NODE_NAME}"):
        walk("", (data.get(key) or {}).get("ros__parameters", {}))
    return flat


def node_parameters(arg) -> tuple[dict, list[tuple[str, str]]]:
    """Parameter overrides and remappings from the launch arguments that were given (arg(name) -> str)."""
    overrides: dict = {}
    remappings: list[tuple[str, str]] = []
    topics = _topics(arg("image_topics"))
    if len(topics) > 1:
        generic = [f"image_{i}" for i in range(len(topics))]
        remappings = list(zip(generic, topics, strict=True))
        overrides["image_topics"] = generic
    else:
        remappings = [("image", topics[0] if topics else arg("image"))]
        if topics:
            overrides["image_topics"] = ["image"]
    if arg("compressed"):
        flags = [_bool("compressed", v) for v in _topics(arg("compressed"))]
        overrides["compressed"] = flags[0] if len(flags) == 1 else flags
    if arg("autostart"):
        overrides["autostart"] = _bool("autostart", arg("autostart"))
    if arg("use_sim_time"):
        overrides["use_sim_time"] = _bool("use_sim_time", arg("use_sim_time"))
    if arg("interval_frames"):
        overrides["interval_frames"] = _int("interval_frames", arg("interval_frames"))
    if arg("modalities"):
        overrides["modalities"] = _topics(arg("modalities"))
    for name, parameter in (
        ("task", "task"),
        ("multi_camera", "multi_camera"),
        ("device", "model.device"),
        ("dtype", "model.dtype"),
        ("compile", "model.compile"),
        ("readout", "model.readout"),
    ):
        if arg(name):
            overrides[parameter] = arg(name)
    if arg("model_path"):
        overrides["model.base"] = os.path.expanduser(arg("model_path"))
    if arg("adapters"):
        found = parse_adapters(os.path.expanduser(arg("adapters"))) or {}
        for name in ADAPTERS:
            overrides[f"model.adapters.{name}"] = found.get(name, "")
    return overrides, remappings


def configure_failure_hint(parameters: dict) -> str:
    """What to do when the node could not configure: the local model paths that are missing, or how to get
    the weights. parameters: the node's effective parameters (params file + overrides)."""
    wanted = [("model_path", parameters.get("model.base", ""))]
    wanted += [(f"adapters ({m})", parameters.get(f"model.adapters.{m}", "")) for m in ADAPTERS]
    missing = [
        f"{what} {path} does not exist"
        for what, path in wanted
        if path and os.path.isabs(os.path.expanduser(path)) and not os.path.exists(os.path.expanduser(path))
    ]
    hub = [path for _, path in wanted if path and not os.path.isabs(os.path.expanduser(path))]
    parts = []
    if missing:
        parts.append("; ".join(missing))
    if hub or missing:
        parts.append(DOWNLOAD_HINT)
    parts.append("if the weights are there, the node's ERROR above says what else failed (a bad parameter?)")
    return ". ".join(parts)


def _optional_tool(package: str, executable: str, arguments: list[str], remappings) -> list:
    """A GUI tool's Node where its package is installed; otherwise a WARN and nothing."""
    try:
        get_package_share_directory(package)
    except PackageNotFoundError:
        get_logger("lrm_reward.launch").warning(
            f"{package} is not installed: not starting it (the reward node runs without it). "
            f"Install it with: sudo apt install ros-$ROS_DISTRO-{package.replace('_', '-')}"
        )
        return []
    return [Node(package=package, executable=executable, arguments=arguments, remappings=remappings)]


def _launch(context) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    share = get_package_share_directory(PACKAGE)
    params_file = os.path.expanduser(arg("params_file")) or os.path.join(share, "config", "reward_node.yaml")
    overrides, remappings = node_parameters(arg)
    effective = {**file_parameters(params_file), **overrides}
    autostart = bool(effective.get("autostart", True))
    namespace = arg("namespace").strip("/")

    node = LifecycleNode(
        package=PACKAGE,
        executable="reward_node",
        name=NODE_NAME,
        namespace=namespace,
        parameters=[params_file, overrides],
        remappings=remappings,
        output="screen",
        emulate_tty=True,
    )

    reported = []

    def configure_failed(_context) -> None:
        if reported:
            return
        reported.append(True)
        where = f"/{namespace}/{NODE_NAME}" if namespace else f"/{NODE_NAME}"
        get_logger("lrm_reward.launch").error(
            f"{where} could not configure and holds no reward model. Fix: {configure_failure_hint(effective)}"
        )
        if autostart:
            # Raising from an action ends the launch with exit code 1 and stops every process it started.
            raise RuntimeError(f"{where} could not configure (see the ERROR above): stopping the launch")

    # Two witnesses of a failed configure: the lifecycle transition event (any cause), and the node's own
    # "configure failed" ERROR line, for a failure so early that the event is published before this
    # launch's subscription is matched (discovery takes seconds on a busy machine; the event is not latched).
    seen = [""]

    def on_output(event) -> list | None:
        seen[0] = (seen[0] + event.text.decode(errors="replace"))[-4096:]
        if CONFIGURE_FAILED_LINE in seen[0]:
            seen[0] = ""
            return [OpaqueFunction(function=configure_failed)]
        return None

    watchers = [
        RegisterEventHandler(
            OnStateTransition(
                target_lifecycle_node=node,
                start_state="configuring",
                goal_state="unconfigured",
                entities=[OpaqueFunction(function=configure_failed)],
            )
        ),
        RegisterEventHandler(OnProcessIO(target_action=node, on_stdout=on_output, on_stderr=on_output)),
    ]
    # The GUI tools' configs name /reward_node/...: follow the node into its namespace.
    gui_remaps = [(f"/{NODE_NAME}/annotated", f"/{namespace}/{NODE_NAME}/annotated")] if namespace else []
    tools = []
    if _bool("use_rviz", arg("use_rviz")):
        rviz_config = os.path.join(share, "config", "reward.rviz")
        tools += _optional_tool("rviz2", "rviz2", ["-d", rviz_config], gui_remaps)
    if _bool("use_plotjuggler", arg("use_plotjuggler")):
        layout = os.path.join(share, "config", "reward_plotjuggler.xml")
        tools += _optional_tool("plotjuggler", "plotjuggler", ["--layout", layout], [])
    return [*watchers, node, *tools]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=text)
        for name, default, text in ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_launch)])
