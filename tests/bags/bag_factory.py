"""Bags the tests write themselves, with rosbags' own writer (MCAP or sqlite3), as `ros2 bag record` would:
serialized CDR with the message definitions, receive time as the bag time.

`samples(spec)` lists what the robot "published" (receive time, topic, stamp, values); `write_bag` turns
it into a bag, `feed_live` hands the same values to an EpisodeRecorder directly, as the refinement node's
callbacks would -- so a test can check that importing the bag gives what recording live gives.

Cameras carry a flat image whose brightness ramps with time (so a test can tell frames apart, through
lossy video too). Faults are injected by name (`BagSpec.faults`), so each bad-input test says exactly
what it breaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from lrm_reward.bags.bag_source import default_typestore

STORAGES = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}
STATE_NAMES = ("shoulder", "elbow", "wrist", "gripper")
ACTION_NAMES = ("dx", "dy", "dz", "grasp")
ENV_NAMES = ("cube_x", "cube_y", "goal_x")
SHAPE = (48, 64)  # height, width
T0 = 1_700_000_000.0  # stamps near a real epoch, as a robot's
MARKER_TOPIC = "/sim_robot_node/episode_result"


def level_at(rel: float, final: float = 220.0, duration: float = 2.0) -> int:
    """Brightness of a frame `rel` seconds into its episode: ramps from 20 to `final`."""
    return int(20 + (final - 20) * min(1.0, max(0.0, rel) / max(duration * 0.8, 1e-6)))


@dataclass
class EpisodeSpec:
    duration_s: float = 2.0
    task: str = "put the cube in the bowl"
    final_level: float = 220.0
    success: bool = True
    gap_before_s: float = 1.0  # silence before this episode


@dataclass
class BagSpec:
    storage: str = "mcap"
    episodes: list[EpisodeSpec] = field(default_factory=lambda: [EpisodeSpec()])
    cameras: dict[str, str] = field(default_factory=lambda: {"front": "/camera/image"})
    compressed: dict[str, str] = field(default_factory=dict)  # camera topic -> "jpeg" | "png"
    camera_hz: float = 20.0
    state_hz: float = 50.0
    action_hz: float = 20.0
    action_type: str = "joint_state"  # joint_state | float64_multi_array
    action_topic: str = "/action"
    environment_state: bool = False
    reward_hz: float = 0.0  # 0: no reward topic
    task_topic: bool = False  # each episode's task on /task just before it starts
    marker: str = (
        ""  # "" | "result": JSON String at each end (sim_robot_node) | "start": String at each start
    )
    shape: tuple[int, int] = SHAPE
    faults: dict = field(default_factory=dict)


@dataclass
class Sample:
    t: float  # receive time [s]
    topic: str
    kind: str  # camera | state | action | environment_state | reward | task | marker
    stamp: float
    value: Any
    episode: int
    camera: str = ""
    index: int = 0  # per episode and stream


def samples(spec: BagSpec) -> list[Sample]:
    out: list[Sample] = []
    start = T0
    for e, ep in enumerate(spec.episodes):
        start += ep.gap_before_s
        if spec.task_topic:
            out.append(Sample(start - 0.01, "/task", "task", start - 0.01, ep.task, e))
        if spec.marker == "start":
            out.append(
                Sample(start - 0.005, "/episode_start", "marker", start, json.dumps({"task": ep.task}), e)
            )
        for c, (cam, topic) in enumerate(spec.cameras.items()):
            for k, rel in enumerate(np.arange(0.0, ep.duration_s, 1.0 / spec.camera_hz)):
                level = level_at(rel, ep.final_level, ep.duration_s) + 3 * c
                pixels = np.full((*spec.shape, 3), level, dtype=np.uint8)
                out.append(Sample(start + rel + 0.002, topic, "camera", start + rel, pixels, e, cam, k))
        for k, rel in enumerate(np.arange(0.0, ep.duration_s, 1.0 / spec.state_hz)):
            values = np.array([rel, 2 * rel, -rel, float(e)])
            out.append(Sample(start + rel + 0.001, "/joint_states", "state", start + rel, values, e, index=k))
            if spec.environment_state:
                env = np.array([0.1, 0.2, rel])
                out.append(
                    Sample(
                        start + rel + 0.001, "/environment_state", "environment_state", start + rel, env, e
                    )
                )
        for k, rel in enumerate(np.arange(0.0, ep.duration_s, 1.0 / spec.action_hz)):
            values = np.array([rel, 0.1, 0.2, 1.0])
            out.append(
                Sample(start + rel + 0.001, spec.action_topic, "action", start + rel, values, e, index=k)
            )
        if spec.reward_hz:
            for rel in np.arange(0.0, ep.duration_s, 1.0 / spec.reward_hz):
                p = float(min(1.0, rel / ep.duration_s))
                out.append(Sample(start + rel + 0.003, "/reward", "reward", start + rel, p, e))
        end = start + ep.duration_s
        if spec.marker == "result":
            result = {"episode": e + 1, "success": ep.success, "task": ep.task, "note": ""}
            out.append(Sample(end + 0.05, MARKER_TOPIC, "marker", end, json.dumps(result), e))
        start = end
    out.sort(key=lambda s: s.t)
    return out


def feed_live(recorder, spec: BagSpec, episode: int) -> None:
    """Hand the samples of one episode to an EpisodeRecorder directly, as the refinement node would."""
    for s in samples(spec):
        if s.episode != episode:
            continue
        if s.kind == "camera":
            recorder.add_image(s.camera, s.stamp, s.value)
        elif s.kind == "state":
            recorder.add_state(s.stamp, s.value, list(STATE_NAMES))
        elif s.kind == "action":
            names = list(ACTION_NAMES) if spec.action_type == "joint_state" else None
            recorder.add_action(s.stamp, s.value, names)
        elif s.kind == "environment_state":
            recorder.add_environment_state(s.stamp, s.value, list(ENV_NAMES))
        elif s.kind == "reward":
            recorder.add_reward(s.stamp, s.value, s.value, s.value)


def write_bag(path: Path, spec: BagSpec, extra: list[tuple[float, str, str, bytes]] = ()) -> Path:
    """Write the bag folder `path` (as `ros2 bag record -o path -s <storage>`). `extra`: (time, topic, type,
    raw payload) written as is, the type defined as `float64 x` (a type the importer cannot use)."""
    store = default_typestore()
    T = store.types
    faults = spec.faults

    def header(stamp: float, frame: str = "base"):
        sec = int(np.floor(stamp))
        nsec = min(round((stamp - sec) * 1e9), 999_999_999)
        return T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](sec=sec, nanosec=nsec), frame_id=frame
        )

    def joint_state(stamp: float, names, values):
        empty = np.zeros(0, dtype=np.float64)
        return T["sensor_msgs/msg/JointState"](
            header=header(stamp),
            name=list(names),
            position=np.asarray(values, np.float64),
            velocity=empty,
            effort=empty,
        )

    def message(s: Sample) -> tuple[str, object]:
        if s.kind == "camera":
            fmt = spec.compressed.get(s.topic)
            key = (s.episode, s.camera, s.index)
            if fmt:
                ok, buf = cv2.imencode(".jpg" if fmt == "jpeg" else ".png", s.value[:, :, ::-1])
                assert ok
                data = np.frombuffer(buf.tobytes(), dtype=np.uint8)
                if faults.get("corrupt_jpeg_at") == key:
                    data = data[: len(data) // 2]
                msgtype = "sensor_msgs/msg/CompressedImage"
                return msgtype, T[msgtype](header=header(s.stamp, s.camera), format=fmt, data=data)
            data = s.value.reshape(-1)
            if faults.get("short_image_at") == key:
                data = data[: data.size // 2]
            encoding = "yuv_unknown" if faults.get("bad_encoding_at") == key else "rgb8"
            h, w = spec.shape
            return "sensor_msgs/msg/Image", T["sensor_msgs/msg/Image"](
                header=header(s.stamp, s.camera),
                height=h,
                width=w,
                encoding=encoding,
                is_bigendian=0,
                step=w * 3,
                data=data,
            )
        if s.kind == "state":
            stamp = s.stamp - 0.5 if faults.get("state_backwards_at") == (s.episode, s.index) else s.stamp
            return "sensor_msgs/msg/JointState", joint_state(stamp, STATE_NAMES, s.value)
        if s.kind == "environment_state":
            return "sensor_msgs/msg/JointState", joint_state(s.stamp, ENV_NAMES, s.value)
        if s.kind == "action":
            if spec.action_type == "joint_state":
                return "sensor_msgs/msg/JointState", joint_state(s.stamp, ACTION_NAMES, s.value)
            layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            return "std_msgs/msg/Float64MultiArray", T["std_msgs/msg/Float64MultiArray"](
                layout=layout, data=s.value
            )
        if s.kind == "reward":
            msgtype = "lrm_interfaces/msg/RewardSignal"
            return msgtype, T[msgtype](
                header=header(s.stamp),
                scored_stamp=header(s.stamp).stamp,
                stream="front",
                task="",
                episode_id=s.episode,
                frame_index=0,
                progress=s.value,
                contrastive=float("nan"),
                completion_prob=s.value,
                completed=False,
                reward=s.value,
                held=False,
                queried=True,
                student=False,
                unparsed=0,
                model_id="test",
                query_latency=0.0,
            )
        return "std_msgs/msg/String", T["std_msgs/msg/String"](data=s.value)

    events = [(s.t, s.topic, *message(s)) for s in samples(spec)]
    events += [(t, topic, msgtype, raw) for t, topic, msgtype, raw in extra]
    events.sort(key=lambda e: e[0])
    garbage = faults.get("garbage_at")  # (topic, n): the n-th message of topic is cut short
    seen: dict[str, int] = {}
    with Writer(path, version=9, storage_plugin=STORAGES[spec.storage]) as writer:
        connections: dict[str, object] = {}
        for t, topic, msgtype, msg in events:
            if topic not in connections:
                if isinstance(msg, bytes):  # a type of its own: float64 x
                    own = get_typestore(Stores.EMPTY)
                    own.register(get_types_from_msg("float64 x\n", msgtype))
                    connections[topic] = writer.add_connection(topic, msgtype, typestore=own)
                else:
                    connections[topic] = writer.add_connection(topic, msgtype, typestore=store)
            raw = msg if isinstance(msg, bytes) else store.serialize_cdr(msg, msgtype)
            seen[topic] = seen.get(topic, 0) + 1
            if garbage is not None and garbage == (topic, seen[topic] - 1):
                raw = bytes(raw[:10])
            writer.write(connections[topic], round(t * 1e9), raw)
    return path


def storage_file(bag: Path) -> Path:
    return next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))


def truncate(bag: Path, keep: float = 0.6) -> Path:
    """Cut the storage file short, as a recorder killed mid-write (or a copy that broke off) leaves it."""
    f = storage_file(bag)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    return bag
