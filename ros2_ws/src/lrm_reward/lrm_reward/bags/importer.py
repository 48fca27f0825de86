"""`lrm-import-bag`: rosbag2 recordings (MCAP, sqlite3) -> a LeRobotDataset in the recorder's own layout.

What it is for: bags recorded with `ros2 bag record` become datasets that `lrm-judge`, `lrm-refine`,
`lrm-train-reward` and stock lerobot read unchanged, because they are written by the same code as a live
recording: every message of an episode goes into an EpisodeRecorder (refinement/recorder.py) exactly as
the refinement node's callbacks hand it over (images decoded by ros/image_conversion.py, stamps from the
header, receive time where it is zero or absent), and its stop() resamples by stamp and writes the
episode and its sidecar. The sidecar gains a "provenance" entry: bag path, storage, topic of every
feature, the bag's and the episode's time range, messages read and skipped.

How: mapping.py says which topic is which feature, episode_windows.py where episodes begin and end (one
per bag, at silences, or at marker messages); a bag is read once for its small topics (or receive times)
and once per episode window.

Bad input -- a truncated or corrupt bag, a mapped topic missing, a type the importer cannot read, a
message that does not deserialize or decode, stamps going backwards on a topic -- gives one error naming
the bag, topic and time. A bag that cannot be opened or mapped is left out whole; a bad message fails its
episode only (with on_bad_message=skip it is dropped and counted instead). The other episodes are
imported and every failure is listed in the report (printed, and kept in recording/import.json). The
dataset is built in a hidden staging folder beside the output and renamed into place at the end: it
appears whole or not at all (`strict`: not at all when any episode failed).

What it is not: no ROS (rosbags reads the bags), no resampling or dataset writing of its own.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lrm_reward.bags.bag_source import BagError, BagSource, describe_time
from lrm_reward.bags.episode_windows import (
    EpisodeWindow,
    MarkerInterpreter,
    WindowPlan,
    one_per_bag,
    split_at_gaps,
    split_at_markers,
    task_in_effect,
)
from lrm_reward.bags.mapping import (
    BagMapping,
    MappingError,
    MappingSpec,
    resolve_mapping,
)
from lrm_reward.durable_files import write_json_atomic
from lrm_reward.refinement.recorder import EpisodeOutcome, EpisodeRecorder, RecorderConfig, SaveStatus
from lrm_reward.refinement.recorder_config import SIDECAR_DIR
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb

log = logging.getLogger(__name__)

IMPORTER_VERSION = "lrm-import-bag/1"
IMPORT_REPORT = "import.json"  # <dataset>/recording/import.json
IMPORTED, FAILED, EMPTY = "imported", "failed", "empty"
EXIT_OK, EXIT_NOTHING, EXIT_USAGE, EXIT_SOME_FAILED = 0, 1, 2, 3
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ImportRefused(RuntimeError):
    """The import as a whole cannot run (output exists, bad output name)."""


class BadMessage(ValueError):
    """One message the importer cannot use; names its topic and receive time."""

    def __init__(self, topic: str, time_ns: int, reason: str) -> None:
        super().__init__(f"topic {topic} at {describe_time(time_ns)}: {reason}")
        self.topic, self.time_ns, self.reason = topic, time_ns, reason


@dataclass
class ImportConfig:
    output: Path  # the dataset folder to create; its name is the dataset's name
    mapping: MappingSpec = field(default_factory=MappingSpec)
    use_videos: bool = True  # False: PNG frames inside parquet (the recorder's use_videos)
    video_codec: str = "libsvtav1"  # the recorder's default
    video_crf: int | None = None
    video_preset: str | None = None
    robot_type: str | None = None
    image_writer_threads: int = 2
    strict: bool = False  # any failed episode or bag: write nothing

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if not _NAME_RE.match(self.output.name):
            raise ImportRefused(
                f"output {self.output}: the folder name is the dataset name; "
                "use letters, digits, '_', '-', '.'"
            )


@dataclass
class EpisodeReport:
    bag: str
    window_ns: tuple[int, int]
    status: str  # imported | failed | empty
    message: str
    episode_index: int | None = None
    num_frames: int = 0
    partial: bool = False
    task: str = ""
    topic: str | None = None  # where a failure happened
    time_ns: int | None = None
    skipped_messages: dict[str, int] = field(default_factory=dict)


@dataclass
class BagReport:
    bag: str
    storage: str = ""
    topics: dict[str, str] = field(default_factory=dict)  # feature -> topic
    time_range_ns: tuple[int, int] | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class ImportReport:
    output: Path
    dataset: Path | None = None  # None: nothing was written
    bags: list[BagReport] = field(default_factory=list)
    episodes: list[EpisodeReport] = field(default_factory=list)
    message: str = ""
    elapsed_s: float = 0.0

    @property
    def imported(self) -> list[EpisodeReport]:
        return [e for e in self.episodes if e.status == IMPORTED]

    @property
    def failed(self) -> list[EpisodeReport]:
        return [e for e in self.episodes if e.status == FAILED]

    @property
    def failed_bags(self) -> list[BagReport]:
        return [b for b in self.bags if b.error]

    @property
    def num_frames(self) -> int:
        return sum(e.num_frames for e in self.imported)

    def to_json(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["dataset"] = str(self.dataset) if self.dataset else None
        data["importer_version"] = IMPORTER_VERSION
        return data

    def exit_code(self) -> int:
        if self.dataset is None:
            return EXIT_NOTHING
        return EXIT_SOME_FAILED if self.failed or self.failed_bags else EXIT_OK


# ------------------------------------------------------------------------------------------ import
def import_bags(bags: list[Path | str], cfg: ImportConfig) -> ImportReport:
    """Import `bags` (in this order) into the new dataset cfg.output. See the module docstring."""
    started = time.monotonic()
    out = cfg.output.resolve()
    report = ImportReport(output=out)
    if out.exists():
        raise ImportRefused(
            f"{out} exists already: import into a new dataset (judge and refine take several)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    importer = _Importer(cfg, staging, out.name, report)
    try:
        for bag in bags:
            importer.import_bag(Path(bag))
        importer.close()
        failures = bool(report.failed or report.failed_bags)
        built = staging / out.name
        if not report.imported:
            report.message = "nothing imported: " + _first_problem(report)
        elif cfg.strict and failures:
            report.message = "nothing written (strict): " + _first_problem(report)
        else:
            report.elapsed_s = time.monotonic() - started
            report.dataset = out
            write_json_atomic(built / SIDECAR_DIR / IMPORT_REPORT, report.to_json())
            os.rename(built, out)  # the dataset appears whole, in one step
            report.message = (
                f"imported {len(report.imported)} episode(s), {report.num_frames} frames, into {out}"
                + (
                    f"; {len(report.failed)} episode(s) and {len(report.failed_bags)} bag(s) failed"
                    if failures
                    else ""
                )
            )
    finally:
        importer.close()
        shutil.rmtree(staging, ignore_errors=True)
    report.elapsed_s = time.monotonic() - started
    return report


def _first_problem(report: ImportReport) -> str:
    for b in report.failed_bags:
        return b.error or ""
    for e in report.failed:
        return e.message
    empties = [e for e in report.episodes if e.status == EMPTY]
    if empties:
        return empties[0].message
    notes = [n for b in report.bags for n in b.notes]
    return notes[0] if notes else "no episode in the bags"


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of imports that were killed (their process is gone)."""
    for folder in out.parent.glob(f".{out.name}.import-*"):
        try:
            pid = int(folder.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def plan_episodes(
    source: BagSource, mapping: BagMapping, spec: MappingSpec
) -> tuple[WindowPlan, list[tuple[int, str]]]:
    """The episode windows of one bag, and its task messages (receive time, text)."""
    tasks: list[tuple[int, str]] = []
    if mapping.task_topic:
        tasks = [(t, str(msg.data).strip()) for _, _, t, msg in source.messages([mapping.task_topic])]
    if spec.split == "bag":
        return one_per_bag(source.start_ns, source.end_ns), tasks
    if spec.split == "gap":
        return split_at_gaps(source.times(mapping.required_topics()), spec.gap_s), tasks
    interpreter = MarkerInterpreter()
    events = []
    for _, _, t, msg in source.messages([mapping.marker]):
        event = interpreter.event(t, msg)
        if event is not None:
            events.append(event)
    return split_at_markers(events, source.start_ns, source.end_ns, spec.marker_at), tasks


class _Importer:
    """Feeds the episodes of one bag after another into one EpisodeRecorder (created at the first bag)."""

    def __init__(self, cfg: ImportConfig, staging: Path, name: str, report: ImportReport) -> None:
        self.cfg = cfg
        self.spec = cfg.mapping
        self.staging = staging
        self.name = name
        self.report = report
        self.recorder: EpisodeRecorder | None = None
        self.cameras: tuple[str, ...] | None = None  # the dataset's, fixed by the first bag
        self.env = False

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def _recorder(self, mapping: BagMapping) -> EpisodeRecorder:
        cameras = tuple(c.name for c in mapping.cameras)
        if self.recorder is None:
            env = mapping.environment_state
            self.recorder = EpisodeRecorder(
                RecorderConfig(
                    data_root=self.staging,
                    cameras=cameras,
                    fps=self.spec.fps,
                    dataset_name=self.name,
                    state_names=mapping.state.names or None,
                    action_names=mapping.action.names or None,
                    environment_state_names=() if env is None else (env.names or None),
                    robot_type=self.cfg.robot_type,
                    use_videos=self.cfg.use_videos,
                    max_gap_s=self.spec.max_gap_s,
                    on_gap=self.spec.on_gap,
                    image_writer_threads=self.cfg.image_writer_threads,
                    video_codec=self.cfg.video_codec,
                    video_crf=self.cfg.video_crf,
                    video_preset=self.cfg.video_preset,
                    saver="inline",
                )
            )
            self.cameras = cameras
            self.env = env is not None
        elif cameras != self.cameras or (mapping.environment_state is not None) != self.env:
            raise MappingError(
                f"this bag maps cameras {list(cameras)}"
                f"{' with' if mapping.environment_state else ' without'} an environment state; the dataset "
                f"has cameras {list(self.cameras or ())}{' with' if self.env else ' without'} one: import it "
                "into another dataset"
            )
        return self.recorder

    def import_bag(self, path: Path) -> None:
        bag_report = BagReport(bag=str(path.resolve()) if path.exists() else str(path))
        self.report.bags.append(bag_report)
        try:
            source = BagSource(path)
        except BagError as exc:
            bag_report.error = str(exc)
            log.error(bag_report.error)
            return
        with source:
            bag_report.storage = source.storage
            bag_report.time_range_ns = (source.start_ns, source.end_ns)
            try:
                mapping = resolve_mapping(self.spec, source.topics)
                bag_report.topics = mapping.feature_topics()
                recorder = self._recorder(mapping)
                plan, tasks = plan_episodes(source, mapping, self.spec)
            except (MappingError, BagError) as exc:
                bag_report.error = f"{path}: {exc}" if isinstance(exc, MappingError) else str(exc)
                log.error(bag_report.error)
                return
            bag_report.notes.extend(plan.notes)
            for window in plan.windows:
                self.report.episodes.append(self._episode(recorder, source, mapping, window, tasks))

    def _episode(
        self,
        recorder: EpisodeRecorder,
        source: BagSource,
        mapping: BagMapping,
        window: EpisodeWindow,
        tasks: list[tuple[int, str]],
    ) -> EpisodeReport:
        ep = EpisodeReport(
            bag=str(source.path), window_ns=(window.start_ns, window.stop_ns), status=FAILED, message=""
        )
        span = f"{describe_time(window.start_ns)} .. +{window.duration_s:.2f} s"
        task = window.task or task_in_effect(tasks, window) or self.spec.task
        ep.task = task
        if not task:
            ep.message = (
                f"{source.path}: episode at {span}: no task (give --task, `task:` in the mapping, a task "
                "topic, or a marker that names it)"
            )
            return ep
        recorder.start(task, notes=window.notes, policy_version=window.policy_version)
        feeder = _Feeder(recorder, mapping, self.spec)
        try:
            for topic, msgtype, time_ns, msg in source.messages(
                feeder.topics, window.start_ns, window.stop_ns
            ):
                feeder.feed(topic, msgtype, time_ns, msg)
        except (BagError, BadMessage) as exc:
            recorder.abort()
            ep.topic, ep.time_ns = exc.topic, exc.time_ns
            ep.message = str(exc) if isinstance(exc, BagError) else f"{source.path}: {exc}"
            ep.message += f" -- episode at {span} not imported"
            log.error(ep.message)
            return ep
        except BaseException:
            recorder.abort()
            raise
        ep.skipped_messages = dict(feeder.skipped)
        if not feeder.received:
            recorder.abort()
            ep.status, ep.message = EMPTY, f"{source.path}: no message of a mapped topic at {span}"
            return ep
        provenance = {
            "kind": "rosbag2",
            "importer_version": IMPORTER_VERSION,
            "bag": str(source.path.resolve()),
            "storage": source.storage,
            "topics": mapping.feature_topics(),
            "task_topic": mapping.task_topic,
            "marker": mapping.marker,
            "split": self.spec.split,
            "stamps": self.spec.stamps,
            "bag_time_range_ns": [source.start_ns, source.end_ns],
            "window_ns": [window.start_ns, window.stop_ns],
            "window_start": describe_time(window.start_ns),
            "messages": dict(feeder.received),
            "skipped_messages": dict(feeder.skipped),
            "imported_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        outcome = window.outcome if window.outcome in {o.value for o in EpisodeOutcome} else "unknown"
        result = recorder.stop(outcome, provenance=provenance)
        ep.episode_index = result.episode_index if result.status is SaveStatus.SAVED else None
        ep.num_frames, ep.partial = result.num_frames, result.partial
        ep.status = {SaveStatus.SAVED: IMPORTED, SaveStatus.EMPTY: EMPTY}.get(result.status, FAILED)
        ep.message = f"{source.path}: episode at {span}: {result.message}"
        (log.info if ep.status == IMPORTED else log.warning)(ep.message)
        return ep


class _Feeder:
    """One episode's messages into the recorder, as the refinement node's callbacks do; stamps checked."""

    def __init__(self, recorder: EpisodeRecorder, mapping: BagMapping, spec: MappingSpec) -> None:
        self.recorder = recorder
        self.mapping = mapping
        self.spec = spec
        self.roles: dict[str, list[tuple[str, Any]]] = {}
        for cam in mapping.cameras:
            self.roles.setdefault(cam.topic, []).append(("camera", cam))
        self.roles.setdefault(mapping.state.topic, []).append(("state", mapping.state))
        self.roles.setdefault(mapping.action.topic, []).append(("action", mapping.action))
        if mapping.environment_state is not None:
            self.roles.setdefault(mapping.environment_state.topic, []).append(
                ("environment_state", mapping.environment_state)
            )
        if mapping.reward:
            self.roles.setdefault(mapping.reward, []).append(("reward", None))
        self.topics = list(self.roles)
        self.last_stamp: dict[str, float] = {}
        self.received: Counter = Counter()
        self.skipped: Counter = Counter()

    def feed(self, topic: str, msgtype: str, time_ns: int, msg: Any) -> None:
        self.received[topic] += 1
        try:
            stamp = self._stamp(topic, msg, time_ns)
            for role, spec in self.roles[topic]:
                self._add(role, spec, msg, stamp)
        except (ImageConversionError, ValueError) as exc:
            if self.spec.on_bad_message == "skip":
                self.skipped[topic] += 1
                if self.skipped[topic] == 1:
                    log.warning("skipping a bad message on %s at %s: %s", topic, describe_time(time_ns), exc)
                return
            raise BadMessage(topic, time_ns, str(exc)) from None

    def _stamp(self, topic: str, msg: Any, time_ns: int) -> float:
        header = getattr(msg, "header", None)
        stamp = time_ns * 1e-9
        if self.spec.stamps == "header" and header is not None and (header.stamp.sec or header.stamp.nanosec):
            stamp = header.stamp.sec + header.stamp.nanosec * 1e-9
        previous = self.last_stamp.get(topic)
        if previous is not None and stamp < previous:
            raise ValueError(
                f"stamps out of order: {stamp:.9f} s after {previous:.9f} s on the same topic "
                "(import with `stamps: receive` to order by receive time, or on_bad_message: skip)"
            )
        self.last_stamp[topic] = stamp
        return stamp

    def _add(self, role: str, spec: Any, msg: Any, stamp: float) -> None:
        rec = self.recorder
        if role == "camera":
            rgb = compressed_msg_to_rgb(msg) if spec.compressed else image_msg_to_rgb(msg)
            rec.add_image(spec.name, stamp, rgb)
        elif role == "reward":
            rec.add_reward(stamp, float(msg.progress), float(msg.completion_prob), float(msg.reward))
        else:
            if spec.joint_state:
                values, names = getattr(msg, spec.field), list(msg.name) or None
            else:
                values, names = msg.data, None
            values = np.asarray(values, dtype=np.float64)
            if values.size == 0:
                raise ValueError(
                    f"{role} message without values ({spec.field if spec.joint_state else 'data'})"
                )
            add = {
                "state": rec.add_state,
                "action": rec.add_action,
                "environment_state": rec.add_environment_state,
            }
            add[role](stamp, values, names)  # False: non-finite, counted by the recorder (its NaN policy)
