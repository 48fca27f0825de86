"""What callers of the EpisodeRecorder (recorder.py) pass and get back: its configuration, the operator's
outcome labels, save statuses and results, and the names of the dataset's recorder-owned files.

Kept apart from the recorder so the ROS parameters, the bag importer and the tools that read sidecars
need not import the recording machinery.
"""

from __future__ import annotations

import datetime as _dt
import enum
import re
from dataclasses import dataclass
from pathlib import Path

RECORDER_VERSION = "lrm-recorder/1"
SIDECAR_SCHEMA = "lrm.episode/1"
SIDECAR_DIR = "recording"
REPO_PREFIX = "lrm"  # local repo_id = "lrm/<dataset name>"; never pushed anywhere
REWARD_KEYS = ("reward.progress", "reward.completion", "reward.fused")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class EpisodeOutcome(enum.StrEnum):
    """Operator label given at stop (StopEpisode.OUTCOME_*)."""

    UNKNOWN = "unknown"
    SUCCESS = "success"
    FAILURE = "failure"
    DISCARD = "discard"


class SaveStatus(enum.StrEnum):
    SAVED = "saved"
    EMPTY = "empty"  # no complete frame: nothing written
    DISCARDED = "discarded"  # operator said discard, or the episode was aborted
    STORAGE_ERROR = "storage_error"  # disk full or not writable: nothing of this episode kept
    FAILED = "failed"  # anything else that prevented saving (e.g. the dataset has other features)
    NOT_RECORDING = "not_recording"
    SAVING = "saving"  # stop(wait=False): sealed on disk, the saver process writes it into the dataset


class RecorderBusyError(RuntimeError):
    """start() while an episode is recording, or another process records into the same dataset."""


@dataclass
class RecorderConfig:
    data_root: Path
    cameras: tuple[str, ...] = ("front",)  # camera names -> features observation.images.<name>
    fps: int = 30
    dataset_name: str = "rec_{date}"  # "{date}" -> YYYY-MM-DD (local): one dataset per day; fixed: per run
    state_names: tuple[str, ...] | None = None  # None: taken from the first joint state (or joint_<i>)
    action_names: tuple[str, ...] | None = None  # None: taken from the first action (or action_<i>)
    robot_type: str | None = None
    use_videos: bool = True  # False stores PNG images inside parquet (small tests, no codec)
    max_gap_s: float = 0.5  # a required stream silent for longer than this is a dropout
    on_gap: str = "truncate"  # "truncate" | "hold"
    spool_to_disk: bool = True  # False keeps raw frames in RAM
    image_writer_threads: int = 2  # PNG writer threads used while saving (lerobot)
    rewards: bool = True  # add the reward.* features
    video_codec: str = "libsvtav1"  # lerobot's default (AV1); or h264, hevc, *_nvenc, ... (lerobot list)
    video_crf: int | None = None  # None: lerobot's default quality for the codec
    video_preset: str | None = None  # None: lerobot's default for the codec
    # Names of the values of observation.environment_state (e.g. object poses); () = no such feature,
    # None = the feature is on and the names come from the first sample (like state_names). When on, it
    # is a required stream like the joint state (every frame needs a sample).
    environment_state_names: tuple[str, ...] | None = ()
    # "inline": stop() encodes and writes in the calling process; "process": a niced child process does
    # (a recorder inside a ROS node: encoding must not take the GIL or the CPU from its callbacks)
    saver: str = "inline"
    saver_nice: int = 5  # niceness of the saver process (10+ starves it on a busy machine)
    streaming_encoding: bool = True  # encode video while adding frames (no PNG round trip, faster)

    def __post_init__(self) -> None:
        self.data_root = Path(self.data_root)
        self.cameras = tuple(self.cameras)
        if not self.cameras:
            raise ValueError("RecorderConfig.cameras: at least one camera is required")
        if len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"RecorderConfig.cameras has duplicates: {self.cameras}")
        for cam in self.cameras:
            if not _NAME_RE.match(cam):
                raise ValueError(f"camera name {cam!r}: use letters, digits, '_', '-', '.'")
        if not (1 <= self.fps <= 1000):
            raise ValueError(f"RecorderConfig.fps must be in [1, 1000], got {self.fps}")
        if self.max_gap_s <= 0:
            raise ValueError("RecorderConfig.max_gap_s must be > 0")
        if self.on_gap not in ("truncate", "hold"):
            raise ValueError(f"RecorderConfig.on_gap must be 'truncate' or 'hold', got {self.on_gap!r}")
        probe = self.dataset_name.replace("{date}", "2000-01-01")
        if "/" in probe or not _NAME_RE.match(probe):
            raise ValueError(f"RecorderConfig.dataset_name {self.dataset_name!r} is not a plain folder name")
        for label, names in (("state_names", self.state_names), ("action_names", self.action_names)):
            if names is not None:
                names = tuple(names)
                if not names or len(set(names)) != len(names):
                    raise ValueError(f"RecorderConfig.{label} must be non-empty and unique")
                setattr(self, label, names)
        if self.environment_state_names is not None:
            self.environment_state_names = tuple(str(n) for n in self.environment_state_names)
            if len(set(self.environment_state_names)) != len(self.environment_state_names):
                raise ValueError(
                    f"RecorderConfig.environment_state_names has duplicates: {self.environment_state_names}"
                )

        if self.saver not in ("inline", "process"):
            raise ValueError(f"RecorderConfig.saver must be 'inline' or 'process', got {self.saver!r}")
        if self.saver == "process" and not self.spool_to_disk:
            raise ValueError("RecorderConfig.saver='process' needs spool_to_disk=True (frames on disk)")
        if self.image_writer_threads < 0:
            raise ValueError("RecorderConfig.image_writer_threads must be >= 0")

    @property
    def environment_state(self) -> bool:
        """Whether the dataset has observation.environment_state."""
        return self.environment_state_names is None or len(self.environment_state_names) > 0

    def dataset_name_for(self, when: _dt.datetime) -> str:
        return self.dataset_name.replace("{date}", when.strftime("%Y-%m-%d"))


@dataclass
class StartResult:
    episode_index: int
    dataset: Path
    recovered: str | None = None  # what recovery did to an unfinished earlier append, if anything


@dataclass
class StopResult:
    status: SaveStatus
    message: str
    episode_index: int = -1
    num_frames: int = 0
    dataset: Path | None = None
    partial: bool = False
    sidecar: Path | None = None
