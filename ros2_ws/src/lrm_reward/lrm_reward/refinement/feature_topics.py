"""Which topic is which LeRobot feature: the one definition the recorder and the policy runner share.

What it is for: the refinement node records `observation.images.<camera>`, `observation.state` and
`observation.environment_state` from camera, joint-state and environment-state topics; the policy node
feeds a policy trained on those recordings from the same topics. Both build a FeatureTopics from the same
parameters (cameras, image_topics, state_field, environment_state_*), so a robot set up for recording
is set up for running the policy it trains, and a policy that reads a feature no configured topic
provides is refused by name (`missing_inputs`).

What it is not: no ROS (the nodes subscribe), no message conversion, no dataset writing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
ACTION_KEY = "action"
IMAGE_KEY_PREFIX = "observation.images."
STATE_TOPIC = "joint_states"  # generic names, remapped in launch
ACTION_TOPIC = "action"
VECTOR_TYPES = ("float64_multi_array", "joint_state")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def image_key(camera: str) -> str:
    """The feature of a camera: observation.images.<camera>."""
    return IMAGE_KEY_PREFIX + camera


def default_image_topics(cameras: Iterable[str]) -> tuple[str, ...]:
    """`image` for one camera, `image_<name>` for each of several."""
    cameras = tuple(cameras)
    return ("image",) if len(cameras) == 1 else tuple(f"image_{c}" for c in cameras)


def _names(values: Iterable[str] | None) -> tuple[str, ...]:
    # ROS string-array parameters cannot be empty: [""] means "none"
    return tuple(str(v) for v in (values or ()) if str(v))


@dataclass(frozen=True)
class FeatureTopics:
    """The observation topics of a robot and the features they become.

    `image_topics` empty (or [""]): default_image_topics(cameras). `state_names` empty: the joint state's
    own order; else those joints are picked by name. `environment_state_topic` empty: no
    observation.environment_state.
    """

    cameras: tuple[str, ...] = ("front",)
    image_topics: tuple[str, ...] = ()
    state_field: str = "position"
    state_names: tuple[str, ...] = ()
    environment_state_topic: str = ""
    environment_state_type: str = "float64_multi_array"
    environment_state_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        cameras = _names(self.cameras)
        topics = _names(self.image_topics) or default_image_topics(cameras)
        object.__setattr__(self, "cameras", cameras)
        object.__setattr__(self, "image_topics", topics)
        object.__setattr__(self, "state_names", _names(self.state_names))
        object.__setattr__(self, "environment_state_names", _names(self.environment_state_names))
        if len(set(cameras)) != len(cameras):
            raise ValueError(f"cameras has duplicates: {cameras}")
        for cam in cameras:
            if not _NAME_RE.match(cam):
                raise ValueError(f"camera name {cam!r}: use letters, digits, '_', '-', '.'")
        if len(topics) != len(cameras):
            raise ValueError(f"image_topics ({len(topics)}) must name one topic per camera ({len(cameras)})")
        if self.state_field not in ("position", "velocity", "effort"):
            raise ValueError(f"state_field must be position, velocity or effort, not {self.state_field!r}")
        if self.environment_state_type not in VECTOR_TYPES:
            raise ValueError(
                f"environment_state_type must be one of {VECTOR_TYPES}, not {self.environment_state_type!r}"
            )
        if (
            self.environment_state_topic
            and self.environment_state_type == "float64_multi_array"
            and not self.environment_state_names
        ):
            raise ValueError(
                "environment_state_names is required for a float64_multi_array environment state"
            )

    @property
    def environment_state(self) -> bool:
        return bool(self.environment_state_topic)

    def camera_topics(self) -> dict[str, str]:
        """camera name -> image topic."""
        return dict(zip(self.cameras, self.image_topics, strict=True))

    def feature_topics(self) -> dict[str, str]:
        """feature key -> the topic it comes from."""
        out = {image_key(cam): topic for cam, topic in self.camera_topics().items()}
        out[STATE_KEY] = STATE_TOPIC
        if self.environment_state:
            out[ENV_STATE_KEY] = self.environment_state_topic
        return out

    def feature_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """feature key -> its shape where the configuration fixes it (None: known from the first message)."""
        shapes: dict[str, tuple[int, ...] | None] = {image_key(cam): None for cam in self.cameras}
        shapes[STATE_KEY] = (len(self.state_names),) if self.state_names else None
        if self.environment_state:
            names = self.environment_state_names
            shapes[ENV_STATE_KEY] = (len(names),) if names else None
        return shapes

    def missing_inputs(self, input_features: Iterable[str]) -> list[str]:
        """The features of `input_features` that no configured topic provides."""
        provided = self.feature_topics()
        return [key for key in input_features if key not in provided]
