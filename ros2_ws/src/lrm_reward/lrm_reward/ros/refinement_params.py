"""refinement_node's parameters: declared once with a description each, read once at startup, checked.

``read_parameters(node)`` declares every parameter of refinement_node on the node (in the order the
node always declared them), checks the combinations a single value cannot (one image topic per camera,
the message types, environment state names) and returns them as one ``RefinementSettings``, with the
recorder's ``RecorderConfig`` and the image topics' QoS built from them. None of these parameters change
at run time (restart the node). Not where they are used: the node and its callbacks
(refinement_node, refinement_intake).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from lrm_reward.refinement.recorder import RecorderConfig

MESSAGE_TYPES = ("joint_state", "float64_multi_array")  # of action_type and environment_state_type
JUDGE_MODES = ("reward_node", "local")  # who runs the judge's model (judge.mode)


@dataclass(frozen=True)
class RefinementSettings:
    """What refinement_node reads from its parameters (see read_parameters for each one's description)."""

    recorder: RecorderConfig
    cameras: list[str]
    image_topics: list[str]  # one per camera (defaults filled in)
    compressed: bool
    stamp_source: str
    state_field: str
    action_type: str
    action_field: str
    environment_state_topic: str  # '' = not recorded
    environment_state_type: str
    auto_stop_frames: int
    auto_stop_timeout_s: float
    judge: dict[str, Any]  # judge.* without the prefix
    nightly: dict[str, Any]  # nightly.* without the prefix
    stop_waits_for_save: bool
    stop_drain_timeout_s: float
    shutdown_save_timeout_s: float
    queue_depth: int  # joint state, action, reward, environment state topics (reliable)
    image_qos: QoSProfile


def read_parameters(node: Node) -> RefinementSettings:
    """Declare and read every parameter of refinement_node; raises ValueError for an invalid combination."""

    def p(name: str, default, description: str):
        return node.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    data_root = p("data_root", "~/lrm_data", "folder holding one LeRobotDataset per day/run")
    cameras = p("cameras", ["front"], "camera names -> features observation.images.<name>")
    topics = p("image_topics", [""], "image topic per camera; '' = 'image' for one camera, image_<name>")
    compressed = p("compressed", False, "image topics carry sensor_msgs/CompressedImage")
    stamp_source = p("stamp_source", "header", "header (receive time when zero) | receive")
    state_field = p("state_field", "position", "JointState field recorded as observation.state")
    action_type = p("action_type", "joint_state", "joint_state | float64_multi_array")
    action_field = p("action_field", "position", "JointState field of the action topic")
    env_topic = p("environment_state_topic", "", "observation.environment_state topic; '' = off")
    env_type = p("environment_state_type", "float64_multi_array", "float64_multi_array | joint_state")
    env_names = [
        n for n in p("environment_state_names", [""], "names of its values (float64_multi_array)") if n
    ]
    auto_stop_frames = p("auto_stop.completed_frames", 0, "stop when `completed` holds N msgs; 0 off")
    timeout_s = p("auto_stop.timeout_s", 0.0, "[s] stop an episode after this long; 0 = off")
    judge = {
        "mode": p(
            "judge.mode",
            "reward_node",
            "reward_node: judge with reward_node's loaded model (judge.action); local: load a second "
            "copy here (judge.model ...), only where no reward_node runs",
        ),
        "action": p(
            "judge.action",
            "/reward_node/judge_episodes",
            "reward_node's judge action (judge.mode reward_node)",
        ),
        "server_timeout_s": p(
            "judge.server_timeout_s", 10.0, "[s] wait this long for the judge action server to appear"
        ),
        "model": p("judge.model", "", "judge.mode local: reward model (base) folder or Hub id"),
        "adapters": p("judge.adapters", "", "judge.mode local: 'progress=DIR,completion=DIR' or a folder"),
        "device": p("judge.device", "cpu", "judge.mode local: device of the judge model"),
        "dtype": p("judge.dtype", "auto", "judge.mode local: dtype of the judge model"),
        "completion_last_n": p("judge.completion_last_n", 3, "completion asked on the last N frames"),
        "curve_every_k": p("judge.curve_every_k", 10, "progress curve sampled every k frames"),
        "success_threshold": p("judge.success_threshold", 0.5, "mean completion prob for success"),
        "progress_threshold": p("judge.progress_threshold", -1.0, "final progress needed; < 0 = off"),
        "progress_success_threshold": p(
            "judge.progress_success_threshold", -1.0, "final progress that is a success alone; < 0 = off"
        ),
    }
    nightly = {
        "datasets": p("nightly.datasets", ["{today}"], "datasets (inside data_root); {today} = today's"),
        "store": p("nightly.store", "", "policy store root for lrm-refine; '' = ~/run_nightly refuses"),
        "policy": p("nightly.policy", "", "policy name inside the store"),
        "demos": p("nightly.demos", [""], "demonstration datasets added to every refinement"),
        "steps": p("nightly.steps", 2000, "training steps of lrm-refine"),
        "batch_size": p("nightly.batch_size", 8, "batch size of lrm-refine"),
        "device": p("nightly.device", "cpu", "training device of lrm-refine"),
        "judge": p(
            "nightly.judge",
            True,
            "judge the datasets first (judge.* parameters; judge.mode reward_node: lrm-judge --via-node)",
        ),
        "keep_best": p(
            "nightly.keep_best",
            False,
            "before refining, make current the version judged best on the robot (lrm-policy promote --best)",
        ),
        "keep_best_min_judged": p(
            "nightly.keep_best_min_judged", 10, "keep_best: judged episodes a version needs to compete"
        ),
        "judge_args": p("nightly.judge_args", [""], "extra lrm-judge arguments"),
        "refine_args": p("nightly.refine_args", [""], "extra lrm-refine arguments"),
    }
    cfg = RecorderConfig(
        data_root=Path(data_root).expanduser(),
        cameras=tuple(cameras),
        fps=p("fps", 30, "dataset frames per second (streams are resampled by stamp)"),
        dataset_name=p("dataset_name", "rec_{date}", "dataset folder; {date} -> YYYY-MM-DD (one per day)"),
        robot_type=p("robot_type", "", "stored in the dataset info") or None,
        use_videos=p("use_videos", True, "store cameras as video (encoded at stop)"),
        video_codec=p("video_codec", "libsvtav1", "lerobot video codec: libsvtav1, h264, hevc, ..."),
        max_gap_s=p("max_gap_s", 0.5, "[s] a stream silent longer than this is a dropout (partial)"),
        on_gap=p("on_gap", "truncate", "truncate | hold: what a dropout does to the episode"),
        spool_to_disk=p("spool_to_disk", True, "spool raw frames to disk while recording"),
        image_writer_threads=p("image_writer_threads", 2, "PNG writer threads (streaming_encoding off)"),
        saver=p("saver", "process", "process: a niced child process encodes and saves | inline"),
        saver_nice=p("saver_nice", 5, "niceness of the saver process"),
        streaming_encoding=p("streaming_encoding", True, "encode video frame by frame (no PNGs)"),
        # joint_state without names: the names come from the first message
        environment_state_names=(tuple(env_names) or None) if env_topic else (),
    )
    if topics == [""] or not topics:
        topics = ["image"] if len(cameras) == 1 else [f"image_{c}" for c in cameras]
    if len(topics) != len(cameras):
        raise ValueError(f"image_topics ({len(topics)}) must name one topic per camera ({len(cameras)})")
    for label, kind in (("action_type", action_type), ("environment_state_type", env_type)):
        if kind not in MESSAGE_TYPES:
            raise ValueError(f"{label} must be joint_state or float64_multi_array, not {kind!r}")
    if judge["mode"] not in JUDGE_MODES:
        raise ValueError(f"judge.mode must be one of {JUDGE_MODES}, not {judge['mode']!r}")
    if env_topic and env_type == "float64_multi_array" and not env_names:
        raise ValueError("environment_state_names is required for a float64_multi_array environment state")
    stop_waits = p(
        "stop_waits_for_save", True, "stop_episode answers once saved (false: once sealed on disk)"
    )
    drain_timeout_s = p(
        "stop_drain_timeout_s", 1.0, "[s] stop first takes the messages already queued, up to this long"
    )
    shutdown_save_timeout_s = p(
        "shutdown_save_timeout_s", 300.0, "[s] on shutdown, wait this long for saves in flight"
    )
    # deep queues: the DDS threads keep receiving while Python is busy (GIL, a loaded machine), and
    # whatever does not fit is lost (counted by sequence numbers). 1000 = 2 s of a 500 Hz arm driver.
    depth = p("queue_depth", 1000, "queue depth of the joint state, action, reward topics (reliable)")
    image_qos = QoSProfile(
        depth=p("image_queue_depth", 60, "queue depth of the image topics (best effort): 2 s at 30 Hz"),
        reliability=ReliabilityPolicy.BEST_EFFORT,
        history=HistoryPolicy.KEEP_LAST,
    )
    return RefinementSettings(
        recorder=cfg,
        cameras=cameras,
        image_topics=topics,
        compressed=compressed,
        stamp_source=stamp_source,
        state_field=state_field,
        action_type=action_type,
        action_field=action_field,
        environment_state_topic=env_topic,
        environment_state_type=env_type,
        auto_stop_frames=auto_stop_frames,
        auto_stop_timeout_s=timeout_s,
        judge=judge,
        nightly=nightly,
        stop_waits_for_save=stop_waits,
        stop_drain_timeout_s=drain_timeout_s,
        shutdown_save_timeout_s=shutdown_save_timeout_s,
        queue_depth=depth,
        image_qos=image_qos,
    )
