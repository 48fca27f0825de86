"""Launch the day of the self-improvement loop: reward_node scores the camera, policy_node runs the current
policy, refinement_node records every episode and judges it through reward_node's loaded model; optionally
the simulated robot, rviz2 and PlotJuggler.

    ros2 launch lrm_reward self_improvement.launch.py task:="put the giraffe in the bowl" \
        image:=/camera/color/image_raw joint_states:=/joint_states action:=/arm/command \
        policy:=~/lrm/policies/act_pick data_root:=~/lrm_data \
        model_path:=~/models/Qwen3-VL-8B-Instruct adapters:=~/models/LRM-models
    ros2 launch lrm_reward self_improvement.launch.py use_sim:=true policy:=~/lrm/policies/act_pick
    ros2 launch lrm_reward self_improvement.launch.py --show-args     # every argument, with its description

One params file for every node (config/self_improvement.yaml by default, one section per node); an argument
given here overrides it, an argument left empty leaves the file's value. Shared settings are set once:
``data_root`` is refinement_node's data root and reward_node's judge data root, ``task`` goes to reward_node
and policy_node, ``policy`` is policy_node's policy and the nightly run's store + name.

One copy of the reward model: only reward_node loads it. refinement_node's ``~/judge_episode`` and the nightly
``~/run_nightly`` (``lrm-judge --via-node``) judge through reward_node's ``~/judge_episodes`` action
(docs/refinement.md, "One copy of the reward model for day and night").

Topics (each node's generic names, remapped here): ``image`` (camera), ``joint_states``, the environment
state (optional), ``action`` (what policy_node sends the robot) and the action the recorder records: a
stamped JointState, by default policy_node's ``~/action_stamped`` (or the simulator's applied action).
Episodes: an operator or a script calls ``refinement_node/start_episode``, ``policy_node/start_episode``
(and, with the simulator, ``sim_robot_node/start_episode``), then the matching ``stop_episode`` services.

If reward_node cannot configure (weights missing, a bad parameter), the launch logs an ERROR naming the fix
and ends with exit code 1, as reward.launch.py does (whose argument handling this file reuses).
What it is not: a lifecycle manager or an episode runner.
"""

from __future__ import annotations

import importlib.util
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessIO
from launch.logging import get_logger
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node
from launch_ros.event_handlers import OnStateTransition

PACKAGE = "lrm_reward"
PARAMS_FILE = "self_improvement.yaml"
# Seconds a node gets after Ctrl-C before launch escalates to SIGTERM (launch's default: 5). Freeing a model
# and closing torch in four processes at once takes longer on a busy machine; SIGTERM skips the clean exit.
SIGTERM_TIMEOUT_S = "30"

# (name, default, description). An empty default means "the params file's value" unless it says otherwise.
ARGUMENTS = [
    (
        "task",
        "",
        "task text: reward_node scores against it, policy_node is given it (empty: the params file's)",
    ),
    (
        "params_file",
        "",
        f"parameters YAML with a section per node (empty: lrm_reward's config/{PARAMS_FILE})",
    ),
    ("namespace", "", "ROS namespace of every node (their topics become /<namespace>/...)"),
    (
        "data_root",
        "",
        "folder of the recordings: refinement_node's data_root and the only folder reward_node judges in "
        "(empty: the params file's)",
    ),
    ("model_path", "", "reward model: base Qwen3-VL folder or Hub id (empty: the params file's model.base)"),
    (
        "adapters",
        "",
        "reward model: folder holding progress/, contrastive/, completion/ LoRA adapters (whichever "
        "exist), or 'progress=DIR,completion=DIR' (empty: the params file's)",
    ),
    ("device", "", "reward model's torch device: cuda, cuda:1, cpu (empty: the params file's)"),
    ("dtype", "", "reward model's dtype: auto, bfloat16, float16, float32 (empty: the params file's)"),
    (
        "image",
        "camera/image",
        "camera topic, remapped onto every node's 'image' (the simulator's by default)",
    ),
    ("joint_states", "joint_states", "the robot's sensor_msgs/JointState topic"),
    (
        "environment_state",
        "",
        "environment state topic (sensor_msgs/JointState, e.g. object poses) recorded and given to the "
        "policy; empty: none (with use_sim: the simulator's environment_state)",
    ),
    ("action", "action", "topic policy_node sends its actions on (std_msgs/Float64MultiArray)"),
    (
        "recorded_action",
        "",
        "stamped sensor_msgs/JointState topic refinement_node records as the action; empty: policy_node's "
        "~/action_stamped (with use_sim: the simulator's ~/applied_action)",
    ),
    (
        "policy",
        "",
        "policy to run: <store>/<name> (follows promotions of 'current'), a version or a checkpoint folder; "
        "also the nightly run's store and name. Empty: no policy_node (the robot is driven otherwise)",
    ),
    ("policy_device", "", "policy_node's torch device (empty: the params file's)"),
    (
        "use_sim",
        "false",
        "true: also start sim_robot_node (driven by policy_node when a policy is given, else by its expert)",
    ),
    ("use_sim_time", "", "true: every node takes time from /clock (empty: false)"),
    ("use_rviz", "false", "start rviz2 showing reward_node's annotated camera image (where installed)"),
    (
        "use_plotjuggler",
        "false",
        "start PlotJuggler plotting progress, completion and reward (where installed)",
    ),
]
# reward.launch.py's arguments this file passes on to its reward_node logic (the rest stay empty)
REWARD_ARGUMENTS = ("task", "model_path", "adapters", "device", "dtype", "use_sim_time", "image")


def reward_launch():
    """reward.launch.py (installed beside this file) as a module: its argument and failure handling."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward.launch.py")
    spec = importlib.util.spec_from_file_location("lrm_reward_reward_launch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolved(namespace: str, name: str) -> str:
    """The absolute name of a node-relative topic or node in `namespace` ('' = the root)."""
    return name if name.startswith("/") else (f"/{namespace}/{name}" if namespace else f"/{name}")


def node_settings(arg, parse_bool) -> dict:
    """Every node's parameter overrides and remappings from the given arguments (arg(name) -> str).

    Returns {"reward": (overrides, remappings), "refinement": ..., "policy": ... or None, "sim": ... or None}.
    """
    rl = reward_launch()
    namespace = arg("namespace").strip("/")
    use_sim = parse_bool("use_sim", arg("use_sim"))
    policy = os.path.expanduser(arg("policy"))
    image, joint_states, action = arg("image"), arg("joint_states"), arg("action")
    env_topic = arg("environment_state") or ("environment_state" if use_sim else "")
    recorded_action = arg("recorded_action") or (
        "sim_robot_node/applied_action" if use_sim else "policy_node/action_stamped"
    )

    reward, reward_remaps = rl.node_parameters(lambda name: arg(name) if name in REWARD_ARGUMENTS else "")
    shared: dict = {}
    if arg("use_sim_time"):
        shared["use_sim_time"] = parse_bool("use_sim_time", arg("use_sim_time"))
    if arg("data_root"):
        reward["judge.data_root"] = os.path.expanduser(arg("data_root"))

    refinement = {
        **shared,
        "environment_state_topic": env_topic,
        "judge.action": resolved(namespace, "reward_node/judge_episodes"),  # used with judge.mode reward_node
    }
    if arg("data_root"):
        refinement["data_root"] = os.path.expanduser(arg("data_root"))
    if policy:
        store, name = os.path.split(policy.rstrip("/"))
        if name == "current" or name.startswith("v"):  # <store>/<name>/current or /vNNNN
            store, name = os.path.split(store)
        refinement["nightly.store"], refinement["nightly.policy"] = store, name
    refinement_remaps = [
        ("image", image),
        ("joint_states", joint_states),
        ("action", recorded_action),
        ("reward", "reward_node/reward"),
    ]

    policy_settings = None
    if policy:
        overrides = {**shared, "policy_path": policy, "environment_state_topic": env_topic}
        if arg("task"):
            overrides["task"] = arg("task")
        if arg("policy_device"):
            overrides["device"] = arg("policy_device")
        policy_settings = (overrides, [("image", image), ("joint_states", joint_states), ("action", action)])

    sim_settings = None
    if use_sim:
        remaps = [("camera/image", image), ("joint_states", joint_states), ("action", action)]
        remaps.append(("environment_state", env_topic))
        sim_settings = ({**shared, "controller": "external" if policy else "expert"}, remaps)
    return {
        "reward": (reward, reward_remaps),
        "refinement": (refinement, refinement_remaps),
        "policy": policy_settings,
        "sim": sim_settings,
    }


def _launch(context) -> list:
    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context).strip()

    rl = reward_launch()
    share = get_package_share_directory(PACKAGE)
    params_file = os.path.expanduser(arg("params_file")) or os.path.join(share, "config", PARAMS_FILE)
    namespace = arg("namespace").strip("/")
    settings = node_settings(arg, rl._bool)
    reward_overrides, reward_remaps = settings["reward"]
    effective = {**rl.file_parameters(params_file), **reward_overrides}
    autostart = bool(effective.get("autostart", True))

    reward = LifecycleNode(
        package=PACKAGE,
        executable="reward_node",
        name="reward_node",
        namespace=namespace,
        parameters=[params_file, reward_overrides],
        remappings=reward_remaps,
        output="screen",
        emulate_tty=True,
        sigterm_timeout=SIGTERM_TIMEOUT_S,
    )
    overrides, remaps = settings["refinement"]
    nodes = [
        reward,
        Node(
            package=PACKAGE,
            executable="refinement_node",
            name="refinement_node",
            namespace=namespace,
            parameters=[params_file, overrides],
            remappings=remaps,
            output="screen",
            emulate_tty=True,
            sigterm_timeout=SIGTERM_TIMEOUT_S,
        ),
    ]
    if settings["policy"] is not None:
        overrides, remaps = settings["policy"]
        nodes.append(
            LifecycleNode(
                package=PACKAGE,
                executable="policy_node",
                name="policy_node",
                namespace=namespace,
                parameters=[params_file, overrides],
                remappings=remaps,
                output="screen",
                emulate_tty=True,
                sigterm_timeout=SIGTERM_TIMEOUT_S,
            )
        )
    else:
        get_logger("lrm_reward.launch").info(
            "no policy given (policy:=<store>/<name>): policy_node is not started; the robot is driven "
            "otherwise"
        )
    if settings["sim"] is not None:
        overrides, remaps = settings["sim"]
        nodes.append(
            Node(
                package=PACKAGE,
                executable="sim_robot_node",
                name="sim_robot_node",
                namespace=namespace,
                parameters=[params_file, overrides],
                remappings=remaps,
                output="screen",
                emulate_tty=True,
                sigterm_timeout=SIGTERM_TIMEOUT_S,
            )
        )

    reported = []

    def configure_failed(_context) -> None:
        if reported:
            return
        reported.append(True)
        where = resolved(namespace, "reward_node")
        fix = rl.configure_failure_hint(effective)
        get_logger("lrm_reward.launch").error(
            f"{where} could not configure and holds no reward model. Fix: {fix}"
        )
        if autostart:  # raising from an action ends the launch with exit code 1 and stops every node
            raise RuntimeError(f"{where} could not configure (see the ERROR above): stopping the launch")

    seen = [""]

    def on_output(event) -> list | None:
        seen[0] = (seen[0] + event.text.decode(errors="replace"))[-4096:]
        if rl.CONFIGURE_FAILED_LINE in seen[0]:
            seen[0] = ""
            return [OpaqueFunction(function=configure_failed)]
        return None

    watchers = [
        RegisterEventHandler(
            OnStateTransition(
                target_lifecycle_node=reward,
                start_state="configuring",
                goal_state="unconfigured",
                entities=[OpaqueFunction(function=configure_failed)],
            )
        ),
        RegisterEventHandler(OnProcessIO(target_action=reward, on_stdout=on_output, on_stderr=on_output)),
    ]
    gui_remaps = (
        [("/reward_node/annotated", resolved(namespace, "reward_node/annotated"))] if namespace else []
    )
    tools = []
    if rl._bool("use_rviz", arg("use_rviz")):
        tools += rl._optional_tool(
            "rviz2", "rviz2", ["-d", os.path.join(share, "config", "reward.rviz")], gui_remaps
        )
    if rl._bool("use_plotjuggler", arg("use_plotjuggler")):
        layout = os.path.join(share, "config", "reward_plotjuggler.xml")
        tools += rl._optional_tool("plotjuggler", "plotjuggler", ["--layout", layout], [])
    return [*watchers, *nodes, *tools]


def generate_launch_description() -> LaunchDescription:
    declared = [
        DeclareLaunchArgument(name, default_value=default, description=text)
        for name, default, text in ARGUMENTS
    ]
    return LaunchDescription([*declared, OpaqueFunction(function=_launch)])
