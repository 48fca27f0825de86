"""Which bag topic becomes which LeRobot feature: the import mapping (YAML) and its defaults by message type.

What it is for: `lrm-import-bag` reads a mapping such as

    fps: 30
    task: put the cube in the bowl
    cameras: {front: /camera/image, wrist: /wrist/image_raw/compressed}
    state: {topic: /joint_states, field: position}
    action: {topic: /leader/joint_states, field: position}
    environment_state: /environment_state
    episodes: {split: marker, marker: /sim_robot_node/episode_result, marker_at: end}

into a `MappingSpec` (checked on load, before any bag is opened), then `resolve_mapping` holds it against
one bag's topics and their message types: every key left out is filled by message type (every
sensor_msgs/Image or CompressedImage topic is a camera; the JointState topic named ``joint_states`` is
the state; a topic named ``action`` or ``applied_action`` the action; ``environment_state``, a
lrm_interfaces/RewardSignal topic and a std_msgs/String ``task`` topic when present), and a mapped
topic that is missing or has a type the importer cannot read is refused by name. A key set to null
(``environment_state: null``) switches an optional stream off. Cameras, state and environment state end
up in a `FeatureTopics` (refinement/feature_topics.py), the one definition the recorder and the policy
runner share, so a bag mapped here produces the features a policy trained on recordings reads.

What it is not: no bag reading (bag_source.py), no message decoding, no ROS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lrm_reward.refinement.feature_topics import (
    ACTION_KEY,
    ENV_STATE_KEY,
    STATE_KEY,
    FeatureTopics,
    image_key,
)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_IMAGE_TYPE = "sensor_msgs/msg/CompressedImage"
JOINT_STATE_TYPE = "sensor_msgs/msg/JointState"
FLOAT64_ARRAY_TYPE = "std_msgs/msg/Float64MultiArray"
FLOAT32_ARRAY_TYPE = "std_msgs/msg/Float32MultiArray"
REWARD_TYPE = "lrm_interfaces/msg/RewardSignal"
STRING_TYPE = "std_msgs/msg/String"

CAMERA_TYPES = (IMAGE_TYPE, COMPRESSED_IMAGE_TYPE)
VECTOR_MSG_TYPES = (JOINT_STATE_TYPE, FLOAT64_ARRAY_TYPE, FLOAT32_ARRAY_TYPE)
# the FeatureTopics name of each vector message type (feature_topics.VECTOR_TYPES)
_FEATURE_VECTOR_TYPE = {
    JOINT_STATE_TYPE: "joint_state",
    FLOAT64_ARRAY_TYPE: "float64_multi_array",
    FLOAT32_ARRAY_TYPE: "float64_multi_array",
}
JOINT_STATE_FIELDS = ("position", "velocity", "effort")
SPLITS = ("bag", "gap", "marker")
MARKER_AT = ("start", "end")
STAMP_SOURCES = ("header", "receive")
ON_BAD_MESSAGE = ("fail", "skip")
AUTO = "auto"  # a topic left for resolve_mapping to find by message type and name
# Trailing topic parts that name the transport, not the camera (/wrist/image_raw/compressed -> wrist).
_IMAGE_SUFFIXES = {"image", "image_raw", "image_rect", "image_color", "image_rect_color", "compressed"}
_NAME_RE = re.compile(r"[^A-Za-z0-9_.-]+")


class MappingError(ValueError):
    """A mapping that is wrong in itself, or that does not fit the bag it is applied to."""


@dataclass(frozen=True)
class TopicSpec:
    """One vector stream: its topic (AUTO: found by name and type), JointState field, names to pick."""

    topic: str = AUTO
    field: str = "position"
    names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.field not in JOINT_STATE_FIELDS:
            raise MappingError(f"field must be one of {JOINT_STATE_FIELDS}, not {self.field!r}")
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if len(set(self.names)) != len(self.names):
            raise MappingError(f"names has duplicates: {self.names}")


@dataclass
class MappingSpec:
    """The mapping as written: topics may still be AUTO. See the module docstring for the YAML."""

    fps: int = 30
    task: str = ""  # every episode's task, unless a marker or task topic names one
    cameras: dict[str, str] | None = None  # camera name -> topic; None: every image topic of the bag
    state: TopicSpec = field(default_factory=TopicSpec)
    action: TopicSpec = field(default_factory=TopicSpec)
    environment_state: TopicSpec | None = field(default_factory=TopicSpec)  # None: off
    reward: str | None = AUTO  # lrm_interfaces/RewardSignal -> reward.*; None: off
    task_topic: str | None = AUTO  # std_msgs/String; None: off
    split: str = "bag"  # one episode per bag | split at time gaps | split at marker messages
    gap_s: float = 2.0  # split: gap -- a silence of every mapped stream longer than this ends an episode
    marker: str = ""  # split: marker -- the topic whose messages mark episode boundaries
    marker_at: str = "start"  # a marker starts an episode (start) or ends one (end)
    stamps: str = "header"  # header: the message's stamp (receive time where zero/absent) | receive
    max_gap_s: float = 0.5  # the recorder's dropout rule (RecorderConfig.max_gap_s)
    on_gap: str = "truncate"  # the recorder's RecorderConfig.on_gap
    on_bad_message: str = "fail"  # fail: the episode is not imported | skip: drop the message, count it

    def __post_init__(self) -> None:
        if not isinstance(self.fps, int) or not 1 <= self.fps <= 1000:
            raise MappingError(f"fps must be an integer in [1, 1000], got {self.fps!r}")
        self.task = str(self.task or "").strip()
        if self.cameras is not None:
            if not isinstance(self.cameras, dict) or not self.cameras:
                raise MappingError("cameras must map camera names to topics, e.g. {front: /camera/image}")
            self.cameras = {str(k): _topic(v, f"cameras.{k}") for k, v in self.cameras.items()}
        for label, choice, allowed in (
            ("episodes.split", self.split, SPLITS),
            ("episodes.marker_at", self.marker_at, MARKER_AT),
            ("stamps", self.stamps, STAMP_SOURCES),
            ("on_gap", self.on_gap, ("truncate", "hold")),
            ("on_bad_message", self.on_bad_message, ON_BAD_MESSAGE),
        ):
            if choice not in allowed:
                raise MappingError(f"{label} must be one of {allowed}, not {choice!r}")
        if self.split == "marker" and not self.marker:
            raise MappingError("episodes.split: marker needs episodes.marker (the marker topic)")
        if self.marker:
            self.marker = _topic(self.marker, "episodes.marker")
        if not self.gap_s > 0 or not self.max_gap_s > 0:
            raise MappingError("episodes.gap_s and max_gap_s must be > 0")

    @classmethod
    def from_dict(cls, data: dict | None) -> MappingSpec:
        """The YAML's content; unknown keys are refused (a typo must not silently fall back to a default)."""
        data = dict(data or {})
        episodes = data.pop("episodes", None) or {}
        if not isinstance(episodes, dict):
            raise MappingError("episodes must be a mapping (split, gap_s, marker, marker_at)")
        unknown = set(episodes) - {"split", "gap_s", "marker", "marker_at"}
        if unknown:
            raise MappingError(f"unknown keys under episodes: {sorted(unknown)}")
        known = {f.name for f in fields(cls)} - {"split", "gap_s", "marker", "marker_at"}
        unknown = set(data) - known
        if unknown:
            raise MappingError(
                f"unknown mapping keys {sorted(unknown)}; known: {sorted(known | {'episodes'})}"
            )
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in ("fps", "task", "cameras")}
        for key in ("stamps", "on_gap", "on_bad_message"):
            if key in data:
                kwargs[key] = str(data[key])
        if "max_gap_s" in data:
            kwargs["max_gap_s"] = float(data["max_gap_s"])
        for key in ("state", "action", "environment_state"):
            if key in data:
                kwargs[key] = _topic_spec(data[key], key, optional=key == "environment_state")
        for key in ("reward", "task_topic"):
            if key in data:
                kwargs[key] = None if data[key] is None else _topic(data[key], key)
        for key in ("split", "marker", "marker_at"):
            if key in episodes:
                kwargs[key] = str(episodes[key])
        if "gap_s" in episodes:
            kwargs["gap_s"] = float(episodes["gap_s"])
        return cls(**kwargs)


def load_mapping(path: Path | str | None) -> MappingSpec:
    """A mapping YAML file (None: every default)."""
    if path is None:
        return MappingSpec()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MappingError(f"cannot read the mapping {path}: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise MappingError(f"mapping {path} must be a YAML mapping, not {type(data).__name__}")
    return MappingSpec.from_dict(data)


def _topic(value: Any, label: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MappingError(f"{label} must be a topic name, got {value!r}")
    value = value.strip()
    return value if value == AUTO or value.startswith("/") else "/" + value


def _topic_spec(value: Any, label: str, optional: bool) -> TopicSpec | None:
    if value is None:
        if not optional:
            raise MappingError(f"{label} is required (a topic, or {{topic, field, names}})")
        return None
    if isinstance(value, str):
        return TopicSpec(topic=_topic(value, label))
    if not isinstance(value, dict):
        raise MappingError(f"{label} must be a topic or {{topic, field, names}}, got {value!r}")
    unknown = set(value) - {"topic", "field", "names"}
    if unknown:
        raise MappingError(f"unknown keys under {label}: {sorted(unknown)}")
    names = value.get("names") or ()
    if isinstance(names, str):
        raise MappingError(f"{label}.names must be a list of names")
    return TopicSpec(
        topic=_topic(value.get("topic", AUTO), f"{label}.topic"),
        field=str(value.get("field", "position")),
        names=tuple(names),
    )


# ------------------------------------------------------------------------------------------- resolved
@dataclass(frozen=True)
class VectorTopic:
    topic: str
    msgtype: str
    field: str = "position"  # JointState field read (arrays: their data)
    names: tuple[str, ...] = ()  # picked by name from a JointState; () = the message's own order

    @property
    def joint_state(self) -> bool:
        return self.msgtype == JOINT_STATE_TYPE


@dataclass(frozen=True)
class CameraTopic:
    name: str
    topic: str
    msgtype: str

    @property
    def compressed(self) -> bool:
        return self.msgtype == COMPRESSED_IMAGE_TYPE


@dataclass(frozen=True)
class BagMapping:
    """A mapping held against one bag: concrete topics and their message types."""

    spec: MappingSpec
    cameras: tuple[CameraTopic, ...]
    state: VectorTopic
    action: VectorTopic
    environment_state: VectorTopic | None
    reward: str | None
    task_topic: str | None
    marker: str | None
    marker_type: str | None
    features: FeatureTopics

    def streams(self) -> dict[str, str]:
        """Recorder stream -> topic, for every recorded (not control) topic."""
        out = {f"camera:{c.name}": c.topic for c in self.cameras}
        out["state"] = self.state.topic
        out["action"] = self.action.topic
        if self.environment_state is not None:
            out["environment_state"] = self.environment_state.topic
        if self.reward:
            out["reward"] = self.reward
        return out

    def required_topics(self) -> tuple[str, ...]:
        """The topics every frame needs (the recorder's required streams)."""
        topics = [c.topic for c in self.cameras] + [self.state.topic, self.action.topic]
        if self.environment_state is not None:
            topics.append(self.environment_state.topic)
        return tuple(topics)

    def topics(self) -> tuple[str, ...]:
        """Every topic the importer reads."""
        extra = [t for t in (self.reward, self.task_topic, self.marker) if t]
        return tuple(dict.fromkeys([*self.required_topics(), *extra]))

    def feature_topics(self) -> dict[str, str]:
        """Feature key -> bag topic (the sidecar's provenance)."""
        out = {image_key(c.name): c.topic for c in self.cameras}
        out[STATE_KEY] = self.state.topic
        out[ACTION_KEY] = self.action.topic
        if self.environment_state is not None:
            out[ENV_STATE_KEY] = self.environment_state.topic
        if self.reward:
            out["reward.*"] = self.reward
        return out


def camera_name_from_topic(topic: str) -> str:
    """/wrist/image_raw/compressed -> wrist; /camera/image -> camera; /image -> image."""
    parts = [p for p in topic.split("/") if p]
    while len(parts) > 1 and parts[-1] in _IMAGE_SUFFIXES:
        parts.pop()
    name = _NAME_RE.sub("_", parts[-1] if parts else "camera").strip("_.-") or "camera"
    return name if name[0].isalnum() else f"cam{name}"


def resolve_mapping(spec: MappingSpec, topics: dict[str, str | None]) -> BagMapping:
    """Hold `spec` against a bag's topics (topic -> message type; None where the bag mixes types).

    Raises MappingError naming the topic for a mapped topic the bag lacks, a type the importer cannot
    read, or a default that is ambiguous (two candidates) or absent.
    """

    def typed(topic: str, role: str, allowed: tuple[str, ...]) -> str:
        if topic not in topics:
            have = ", ".join(sorted(topics)) or "no topics"
            raise MappingError(f"topic {topic} (mapped as {role}) is not in the bag; the bag has: {have}")
        msgtype = topics[topic]
        if msgtype not in allowed:
            raise MappingError(
                f"topic {topic} (mapped as {role}) has message type {msgtype or 'mixed types'}; "
                f"{role} must be one of {', '.join(allowed)}"
            )
        return msgtype

    def find(role: str, allowed: tuple[str, ...], names: tuple[str, ...], required: bool) -> str | None:
        candidates = [
            t for t, ty in topics.items() if ty in allowed and t.rstrip("/").rsplit("/", 1)[-1] in names
        ]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise MappingError(
                f"several topics could be the {role} ({', '.join(sorted(candidates))}): map one"
            )
        if required:
            typed_as = [t for t, ty in topics.items() if ty in allowed]
            hint = (
                f" ({', '.join(allowed)} topics in the bag: {', '.join(sorted(typed_as))})"
                if typed_as
                else ""
            )
            raise MappingError(
                f"no {role} topic: the bag has no {' / '.join(allowed)} topic named "
                f"{' or '.join(names)}; map it (e.g. {role}: {{topic: /my/{names[0]}}}){hint}"
            )
        return None

    if spec.cameras is None:
        image_topics = sorted(t for t, ty in topics.items() if ty in CAMERA_TYPES)
        if not image_topics:
            raise MappingError(
                "the bag has no sensor_msgs/Image or CompressedImage topic: there is nothing to record"
            )
        named: dict[str, str] = {}
        for topic in image_topics:
            name = camera_name_from_topic(topic)
            while name in named:
                name += "_"
            named[name] = topic
    else:
        named = dict(spec.cameras)
    cameras = tuple(
        CameraTopic(name, topic, typed(topic, f"camera {name}", CAMERA_TYPES))
        for name, topic in named.items()
    )

    def vector(role: str, ts: TopicSpec, names: tuple[str, ...], allowed: tuple[str, ...]) -> VectorTopic:
        topic = ts.topic if ts.topic != AUTO else find(role, allowed, names, required=True)
        assert topic is not None
        return VectorTopic(topic, typed(topic, role, allowed), ts.field, ts.names)

    state = vector("state", spec.state, ("joint_states",), (JOINT_STATE_TYPE,))
    action = vector("action", spec.action, ("action", "applied_action", "joint_commands"), VECTOR_MSG_TYPES)
    env = None
    if spec.environment_state is not None:
        ts = spec.environment_state
        topic = (
            ts.topic
            if ts.topic != AUTO
            else find("environment_state", VECTOR_MSG_TYPES, ("environment_state",), False)
        )
        if topic is not None:
            env = VectorTopic(topic, typed(topic, "environment_state", VECTOR_MSG_TYPES), ts.field, ts.names)
    reward = spec.reward
    if reward == AUTO:
        found = sorted(t for t, ty in topics.items() if ty == REWARD_TYPE)
        if len(found) > 1:
            raise MappingError(
                f"several RewardSignal topics ({', '.join(found)}): map one as reward, or null"
            )
        reward = found[0] if found else None
    elif reward is not None:
        typed(reward, "reward", (REWARD_TYPE,))
    task_topic = spec.task_topic
    if task_topic == AUTO:
        task_topic = find("task", (STRING_TYPE,), ("task",), required=False)
    elif task_topic is not None:
        typed(task_topic, "task_topic", (STRING_TYPE,))
    marker, marker_type = None, None
    if spec.split == "marker":
        marker = spec.marker
        if marker not in topics:
            raise MappingError(
                f"marker topic {marker} is not in the bag; the bag has: {', '.join(sorted(topics))}"
            )
        marker_type = topics[marker]
    # One topic, one feature; except state and action from two fields of one JointState topic.
    used = [c.topic for c in cameras] + [state.topic] + ([env.topic] if env else [])
    if action.topic != state.topic or action.field == state.field:
        used.append(action.topic)
    twice = sorted({t for t in used if used.count(t) > 1})
    if twice:
        raise MappingError(f"topic(s) {', '.join(twice)} mapped to more than one feature")
    try:
        features = FeatureTopics(
            cameras=tuple(c.name for c in cameras),
            image_topics=tuple(c.topic for c in cameras),
            state_field=state.field,
            state_names=state.names,
            environment_state_topic=env.topic if env else "",
            environment_state_type=_FEATURE_VECTOR_TYPE[env.msgtype] if env else "float64_multi_array",
            environment_state_names=env.names if env else (),
        )
    except ValueError as exc:
        raise MappingError(str(exc)) from None
    return BagMapping(
        spec=spec,
        cameras=cameras,
        state=state,
        action=action,
        environment_state=env,
        reward=reward,
        task_topic=task_topic,
        marker=marker,
        marker_type=marker_type,
        features=features,
    )
