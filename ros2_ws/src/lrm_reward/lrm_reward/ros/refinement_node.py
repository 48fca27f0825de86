"""refinement_node: records robot episodes into LeRobotDatasets, judges them, starts the nightly loop.

A thin shell around lrm_reward.refinement: subscription callbacks convert messages and append them to
the EpisodeRecorder (no encoding, no disk writes beyond the raw spool); services start and stop episodes
and judge recorded episodes with the reward model (loaded on first use); `~/run_nightly` starts judge +
refine as child processes. Optional auto-stop: when the reward topic's `completed` flag holds for
`auto_stop.completed_frames` messages, or after `auto_stop.timeout_s`.

Saving (resample at stop, then encode and write) runs in a niced saver process (`saver: process`), so it
never holds this process's GIL. `~/stop_episode` first lets the callbacks take what is still queued
(a loaded machine lags behind; stop_drain_timeout_s), seals the episode on disk, and answers when it is
saved (`stop_waits_for_save: true`, the StopEpisode contract) or at once with "saving in the background".

Topics (generic names, remapped in launch): `image` (or the names in `image_topics`, one per entry of
`cameras`; sensor_msgs/Image or CompressedImage with `compressed: true`), `joint_states`
(sensor_msgs/JointState), `action` (JointState or std_msgs/Float64MultiArray, `action_type`), `reward`
(lrm_interfaces/RewardSignal), optionally `environment_state_topic` (Float64MultiArray or JointState).
Services: `~/start_episode`, `~/stop_episode`, `~/judge_episode`, `~/run_nightly` (std_srvs/Trigger).
/diagnostics at 1 Hz: recorder state, saves in progress, messages received per stream (episode and
total), per-kind counters of rejected input, nightly run status and last exit code.

Executor: a thread per subscription, service and timer, each in its own mutually exclusive group (each
topic in order; ros/spinning.py and __init__ say why), so a stop waiting for the saver or a judge run
never holds up the recording callbacks; start/stop/auto-stop are serialised by one lock.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray
from std_srvs.srv import Trigger

from lrm_interfaces.msg import EpisodeJudgment, RewardSignal
from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode
from lrm_reward.refinement.data_root import OutsideDataRootError, resolve_inside
from lrm_reward.refinement.nightly import NightlyConfig, NightlyRunner
from lrm_reward.refinement.recorder import (
    EpisodeOutcome,
    EpisodeRecorder,
    RecorderBusyError,
    RecorderConfig,
    SaveStatus,
)
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.spinning import spin_until_shutdown, thread_per_entity

OUTCOMES = {
    StopEpisode.Request.OUTCOME_UNKNOWN: EpisodeOutcome.UNKNOWN,
    StopEpisode.Request.OUTCOME_SUCCESS: EpisodeOutcome.SUCCESS,
    StopEpisode.Request.OUTCOME_FAILURE: EpisodeOutcome.FAILURE,
    StopEpisode.Request.OUTCOME_DISCARD: EpisodeOutcome.DISCARD,
}
STOP_RESULTS = {
    SaveStatus.SAVED: StopEpisode.Response.RESULT_OK,
    SaveStatus.DISCARDED: StopEpisode.Response.RESULT_OK,
    SaveStatus.EMPTY: StopEpisode.Response.RESULT_EMPTY_EPISODE,
    SaveStatus.STORAGE_ERROR: StopEpisode.Response.RESULT_STORAGE_ERROR,
    SaveStatus.FAILED: StopEpisode.Response.RESULT_STORAGE_ERROR,
    SaveStatus.NOT_RECORDING: StopEpisode.Response.RESULT_NOT_RECORDING,
    SaveStatus.SAVING: StopEpisode.Response.RESULT_OK,  # stop_waits_for_save false: sealed, saving now
}
DRAIN_QUIET_S = 0.1  # a stream with no message for this long has nothing queued
DRAIN_FRESH_S = 0.05  # a message this close to the stream's best transit time is not from a backlog


class _StreamStats:
    """Messages of one stream (callbacks only): counted, lost ones found, lag measured, queue drained at stop.

    Loss: DDS numbers each publisher's messages (rmw MessageInfo: publisher gid + publication sequence
    number); a jump in one publisher's numbers is messages that never reached this node's callbacks
    (queue overflow while the node lagged, or best-effort loss on the wire). Works with several publishers
    on a topic; counts nothing where the middleware gives no sequence numbers.
    """

    MAX_PUBLISHERS = 64  # sequence numbers kept for this many publishers (they come and go)

    def __init__(self) -> None:
        self.total = 0  # while recording, since the node started
        self.episode = 0
        self.lost = 0  # this episode
        self.lost_total = 0
        self.counted = False  # the middleware gave sequence numbers (so `lost` means something)
        self.last = 0.0  # monotonic time of the last message
        self.best_delay = math.inf  # smallest receive - stamp this episode (transit time + clock offset)
        self.delay = math.inf  # receive - stamp of the last message
        # largest delay - best_delay this episode: how late the node took a message (after an overflow the
        # oldest are gone, so this understates how long the node was away)
        self.max_lag = 0.0
        self.stopped_at: float | None = None  # wall time the last episode was sealed
        self._last_seq: dict[bytes, int] = {}

    def new_episode(self) -> None:
        self.episode = 0
        self.lost = 0
        self.best_delay = math.inf
        self.delay = math.inf
        self.max_lag = 0.0

    def sequence_gap(self, info) -> int:
        """Messages of this message's publisher that were skipped since its previous one (0 if unknown)."""
        seq = info.get("publication_sequence_number") if info else None
        if seq is None or seq >= 2**63:  # not supported by this rmw
            return 0
        self.counted = True
        gid = info.get("publisher_gid")
        key = bytes(gid["data"]) if gid else b""
        previous = self._last_seq.pop(key, None)
        self._last_seq[key] = seq  # most recent last: the oldest publisher is forgotten first
        if len(self._last_seq) > self.MAX_PUBLISHERS:
            del self._last_seq[next(iter(self._last_seq))]
        return seq - previous - 1 if previous is not None and seq > previous else 0

    def received(self, header, gap: int) -> None:
        self.total += 1
        self.episode += 1
        self.lost += gap
        self.lost_total += gap
        self.last = time.monotonic()
        if header is not None and (header.stamp.sec or header.stamp.nanosec):
            self.delay = time.time() - (header.stamp.sec + header.stamp.nanosec * 1e-9)
            self.best_delay = min(self.best_delay, self.delay)
            self.max_lag = max(self.max_lag, self.delay - self.best_delay)

    def late_for_stopped_episode(self, header) -> bool:
        """A message taken between episodes that was sent before the last stop (it arrived too late)."""
        if self.stopped_at is None or header is None or not (header.stamp.sec or header.stamp.nanosec):
            return False
        sent = header.stamp.sec + header.stamp.nanosec * 1e-9 + self.best_delay  # on this node's clock
        return sent < self.stopped_at - DRAIN_FRESH_S

    def drained(self, since: float) -> bool:
        """Nothing queued: quiet for a while, or a message after `since` that came straight through."""
        now = time.monotonic()
        if now - self.last >= DRAIN_QUIET_S:
            return True
        return self.last > since and self.delay - self.best_delay <= DRAIN_FRESH_S

    def report(self) -> dict:
        """This episode, for the sidecar's "transport"."""
        return {
            "received": self.episode,
            "lost": self.lost if self.counted else None,
            "max_lag_s": round(self.max_lag, 3),
        }


class RefinementNode(Node):
    def __init__(self, engine_factory=None) -> None:
        super().__init__("refinement_node")
        self._engine_factory = engine_factory
        p = self._param
        data_root = p("data_root", "~/lrm_data", "folder holding one LeRobotDataset per day/run")
        cameras = p("cameras", ["front"], "camera names -> features observation.images.<name>")
        topics = p("image_topics", [""], "image topic per camera; '' = 'image' for one camera, image_<name>")
        self.compressed = p("compressed", False, "image topics carry sensor_msgs/CompressedImage")
        self.stamp_source = p("stamp_source", "header", "header (receive time when zero) | receive")
        self.state_field = p("state_field", "position", "JointState field recorded as observation.state")
        self.action_type = p("action_type", "joint_state", "joint_state | float64_multi_array")
        self.action_field = p("action_field", "position", "JointState field of the action topic")
        env_topic = p("environment_state_topic", "", "observation.environment_state topic; '' = off")
        self.env_type = p(
            "environment_state_type", "float64_multi_array", "float64_multi_array | joint_state"
        )
        env_names = [
            n for n in p("environment_state_names", [""], "names of its values (float64_multi_array)") if n
        ]
        self.auto_stop_frames = p(
            "auto_stop.completed_frames", 0, "stop when `completed` holds N msgs; 0 off"
        )
        self.timeout_s = p("auto_stop.timeout_s", 0.0, "[s] stop an episode after this long; 0 = off")
        self.judge_params = {
            "model": p("judge.model", "", "reward model (base) folder or Hub id for ~/judge_episode"),
            "adapters": p("judge.adapters", "", "'progress=DIR,completion=DIR' or a folder of adapters"),
            "device": p("judge.device", "cpu", "device of the judge model"),
            "dtype": p("judge.dtype", "auto", "dtype of the judge model"),
            "completion_last_n": p("judge.completion_last_n", 3, "completion asked on the last N frames"),
            "curve_every_k": p("judge.curve_every_k", 10, "progress curve sampled every k frames"),
            "success_threshold": p("judge.success_threshold", 0.5, "mean completion prob for success"),
            "progress_threshold": p("judge.progress_threshold", -1.0, "final progress needed; < 0 = off"),
        }
        self.nightly_params = {
            "datasets": p("nightly.datasets", ["{today}"], "datasets (inside data_root); {today} = today's"),
            "store": p("nightly.store", "", "policy store root for lrm-refine; '' = ~/run_nightly refuses"),
            "policy": p("nightly.policy", "", "policy name inside the store"),
            "demos": p("nightly.demos", [""], "demonstration datasets added to every refinement"),
            "steps": p("nightly.steps", 2000, "training steps of lrm-refine"),
            "batch_size": p("nightly.batch_size", 8, "batch size of lrm-refine"),
            "device": p("nightly.device", "cpu", "training device of lrm-refine"),
            "judge": p("nightly.judge", True, "judge the datasets first (judge.* parameters)"),
            "judge_args": p("nightly.judge_args", [""], "extra lrm-judge arguments"),
            "refine_args": p("nightly.refine_args", [""], "extra lrm-refine arguments"),
        }
        cfg = RecorderConfig(
            data_root=Path(data_root).expanduser(),
            cameras=tuple(cameras),
            fps=p("fps", 30, "dataset frames per second (streams are resampled by stamp)"),
            dataset_name=p(
                "dataset_name", "rec_{date}", "dataset folder; {date} -> YYYY-MM-DD (one per day)"
            ),
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
        for label, kind in (("action_type", self.action_type), ("environment_state_type", self.env_type)):
            if kind not in ("joint_state", "float64_multi_array"):
                raise ValueError(f"{label} must be joint_state or float64_multi_array, not {kind!r}")
        if env_topic and self.env_type == "float64_multi_array" and not env_names:
            raise ValueError(
                "environment_state_names is required for a float64_multi_array environment state"
            )
        self.stop_waits = p(
            "stop_waits_for_save", True, "stop_episode answers once saved (false: once sealed on disk)"
        )
        self.drain_timeout_s = p(
            "stop_drain_timeout_s", 1.0, "[s] stop first takes the messages already queued, up to this long"
        )
        self.shutdown_save_timeout_s = p(
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
        self.recorder = EpisodeRecorder(cfg)
        self.recorder.on_saved = self._on_saved
        # per stream: messages received while recording (episode / since start), last callback time,
        # smallest and latest (receive time - header stamp): tells a backlog from fresh messages
        self.streams: dict[str, _StreamStats] = {}
        self.data_root = cfg.data_root
        self.counters: dict[str, int] = {}
        self._counters_lock = threading.Lock()
        self._warned: set[str] = set()
        self._control = threading.Lock()
        self._completed_run = 0
        self._auto_stop_reason = ""
        self._episode_started = 0.0
        self._last_message = "idle"
        self._last_level = DiagnosticStatus.OK
        self._engine = None
        self._engine_lock = threading.Lock()

        # One mutually exclusive group PER subscription, service and timer: each topic's messages are handled
        # in order, one at a time. Never several entities in one group: rclpy hands out a task for every
        # ready entity of an idle group and all but one bounce off the busy group and re-trigger (under load
        # that churn cost whole episodes of joint states, bench_recorder_node.py), and a stop waiting for
        # the saver would hold up everything sharing its group. The queue pile-up itself was rclpy's
        # resubmission of waiting tasks (ros/spinning.py). Start/stop are serialised by self._control; the
        # judge by its dataset lock.
        def own_group() -> MutuallyExclusiveCallbackGroup:
            return MutuallyExclusiveCallbackGroup()

        image_type = CompressedImage if self.compressed else Image
        self._subs = []
        for cam, topic in zip(cameras, topics, strict=True):
            self._subs.append(
                self.create_subscription(
                    image_type,
                    topic,
                    lambda msg, info, cam=cam: self._on_image(cam, msg, info),
                    image_qos,
                    callback_group=own_group(),
                )
            )
        self._subs.append(
            self.create_subscription(
                JointState, "joint_states", self._on_state, depth, callback_group=own_group()
            )
        )
        action_msg = JointState if self.action_type == "joint_state" else Float64MultiArray
        self._subs.append(
            self.create_subscription(action_msg, "action", self._on_action, depth, callback_group=own_group())
        )
        self._subs.append(
            self.create_subscription(
                RewardSignal, "reward", self._on_reward, depth, callback_group=own_group()
            )
        )
        if env_topic:
            env_msg = JointState if self.env_type == "joint_state" else Float64MultiArray
            self._subs.append(
                self.create_subscription(
                    env_msg, env_topic, self._on_environment_state, depth, callback_group=own_group()
                )
            )
        self.create_service(StartEpisode, "~/start_episode", self._start, callback_group=own_group())
        self.create_service(StopEpisode, "~/stop_episode", self._stop, callback_group=own_group())
        self.create_service(JudgeEpisode, "~/judge_episode", self._judge, callback_group=own_group())
        self.nightly = NightlyRunner(self.data_root / "nightly")
        self.create_service(Trigger, "~/run_nightly", self._run_nightly, callback_group=own_group())
        self.create_timer(0.1, self._auto_stop_check, callback_group=own_group())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=own_group())
        self.get_logger().info(f"recording {list(cameras)} from {topics} into {self.data_root}")

    # ------------------------------------------------------------------ parameters
    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    # ------------------------------------------------------------------ callbacks: convert and append
    def _stamp(self, header) -> float:
        if self.stamp_source == "header" and (header.stamp.sec or header.stamp.nanosec):
            return header.stamp.sec + header.stamp.nanosec * 1e-9
        return self.get_clock().now().nanoseconds * 1e-9

    def _received(self, stream: str, header, info) -> bool:
        """Count a message of `stream`; False when no episode is recording (the message is ignored).

        Sequence numbers are followed between episodes too, so a gap is not blamed on the wrong episode.
        """
        stats = self.streams.get(stream)
        if stats is None:
            stats = self.streams[stream] = _StreamStats()
        gap = stats.sequence_gap(info)
        if not self.recorder.recording:
            if stats.late_for_stopped_episode(header):
                self._count(
                    f"late_{stream}",
                    f"{stream}: a message of the stopped episode arrived after stop_episode (not recorded); "
                    "the node was behind: raise stop_drain_timeout_s",
                )
            return False
        stats.received(header, gap)
        return True

    def _on_image(self, camera: str, msg, info) -> None:
        if not self._received(f"camera:{camera}", msg.header, info):
            return
        try:
            rgb = compressed_msg_to_rgb(msg) if self.compressed else image_msg_to_rgb(msg)
            self.recorder.add_image(camera, self._stamp(msg.header), rgb)
        except ImageConversionError as exc:
            self._count(f"image_{exc.kind}", f"camera {camera}: {exc}")
        except ValueError as exc:
            self._count("bad_image", f"camera {camera}: {exc}")

    def _on_state(self, msg: JointState, info) -> None:
        if not self._received("state", msg.header, info):
            return
        values = getattr(msg, self.state_field)
        if len(values) == 0:
            self._count("empty_joint_state", f"joint state without {self.state_field}")
            return
        try:
            if not self.recorder.add_state(
                self._stamp(msg.header), np.asarray(values), list(msg.name) or None
            ):
                self._count("nan_joint_state", "joint state with NaN/inf dropped")
        except ValueError as exc:
            self._count("bad_joint_state", str(exc))

    def _on_action(self, msg, info) -> None:
        self._on_vector("action", self.recorder.add_action, msg, info)

    def _on_environment_state(self, msg, info) -> None:
        self._on_vector("environment_state", self.recorder.add_environment_state, msg, info)

    def _on_vector(self, kind: str, add, msg, info) -> None:
        """Action or environment state: JointState (field `action_field`) or Float64MultiArray."""
        if not self._received(kind, msg.header if isinstance(msg, JointState) else None, info):
            return
        if isinstance(msg, JointState):
            values, names, stamp = (
                getattr(msg, self.action_field),
                list(msg.name) or None,
                self._stamp(msg.header),
            )
        else:  # no header: stamped on receipt
            values, names, stamp = msg.data, None, self.get_clock().now().nanoseconds * 1e-9
        if len(values) == 0:
            self._count(f"empty_{kind}", f"{kind} without values")
            return
        try:
            if not add(stamp, np.asarray(values), names):
                self._count(f"nan_{kind}", f"{kind} with NaN/inf dropped")
        except ValueError as exc:
            self._count(f"bad_{kind}", str(exc))

    def _on_reward(self, msg: RewardSignal, info) -> None:
        if not self._received("reward", msg.header, info):
            return
        self.recorder.add_reward(self._stamp(msg.header), msg.progress, msg.completion_prob, msg.reward)
        self._completed_run = self._completed_run + 1 if msg.completed else 0
        if self.auto_stop_frames > 0 and self._completed_run >= self.auto_stop_frames:
            self._auto_stop_reason = f"auto-stop: completed held for {self._completed_run} reward messages"

    def _count(self, kind: str, message: str) -> None:
        with self._counters_lock:  # callbacks of different topics run on different threads
            self.counters[kind] = self.counters.get(kind, 0) + 1
        if kind not in self._warned:  # once per kind; the count is in /diagnostics
            self._warned.add(kind)
            self.get_logger().warning(f"{message} (further '{kind}' are only counted)")

    # ------------------------------------------------------------------ services
    def _start(self, req: StartEpisode.Request, res: StartEpisode.Response) -> StartEpisode.Response:
        with self._control:
            try:
                started = self.recorder.start(req.task, notes=req.notes, policy_version=req.policy_version)
            except ValueError as exc:
                res.result, res.message = StartEpisode.Response.RESULT_BAD_REQUEST, str(exc)
                return res
            except RecorderBusyError as exc:
                busy = self.recorder.recording
                res.result = (
                    StartEpisode.Response.RESULT_ALREADY_RECORDING
                    if busy
                    else StartEpisode.Response.RESULT_STORAGE_ERROR
                )
                res.message = str(exc)
                return res
            except OSError as exc:
                res.result, res.message = StartEpisode.Response.RESULT_STORAGE_ERROR, f"data root: {exc}"
                return res
            self._completed_run = 0
            self._auto_stop_reason = ""
            self._episode_started = time.monotonic()
            for stats in self.streams.values():
                stats.new_episode()
            res.result = StartEpisode.Response.RESULT_OK
            res.episode_index = started.episode_index
            res.dataset = str(started.dataset)
            res.message = f"recording episode {started.episode_index} of {started.dataset.name}"
            if started.recovered:
                res.message += f" ({started.recovered})"
            self._last_message = res.message
            self.get_logger().info(res.message)
            return res

    def _stop(self, req: StopEpisode.Request, res: StopEpisode.Response) -> StopEpisode.Response:
        outcome = OUTCOMES.get(req.outcome)
        notes = req.notes
        if outcome is None:  # keep the data; the label just is not known
            self._count("unknown_outcome", f"stop_episode outcome {req.outcome} is not an OUTCOME_* value")
            outcome, notes = EpisodeOutcome.UNKNOWN, f"{notes}\n(unknown outcome code {req.outcome})".strip()
        return self._finish(outcome, notes, res)

    def _finish(
        self, outcome: EpisodeOutcome, notes: str, res: StopEpisode.Response, wait: bool = True
    ) -> StopEpisode.Response:
        with self._control:
            drain_timed_out = self.recorder.recording and not self._drain()
            streams = sorted(self.streams.items())
            stopped_at = time.time()
            for _, stats in streams:
                stats.stopped_at = stopped_at
            received = ", ".join(f"{k} {v.episode}" for k, v in streams)
            lost = ", ".join(f"{k} {v.lost}" for k, v in streams if v.lost)
            lag = max((v.max_lag for _, v in streams), default=0.0)
            transport = {k: v.report() for k, v in streams}
            # the wait for the saver process blocks only this service's thread, not the callbacks
            result = self.recorder.stop(
                outcome, notes=notes, wait=wait and self.stop_waits, transport=transport
            )
        res.result = STOP_RESULTS[result.status]
        res.message = result.message
        if result.status not in (SaveStatus.NOT_RECORDING, SaveStatus.DISCARDED):
            res.message += f" (messages received: {received or 'none'}"
            res.message += f"; LOST before the node could take them: {lost}" if lost else ""
            res.message += f"; still {lag:.1f} s behind after the drain)" if drain_timed_out else ")"
        if lost and result.status is not SaveStatus.NOT_RECORDING:
            self.get_logger().warning(
                f"episode {result.episode_index}: messages lost ({lost}): the node's queues overflowed while "
                "it was not taking messages; raise queue_depth / image_queue_depth or lighten the load"
            )
        res.episode_index = max(result.episode_index, 0)
        res.num_frames = result.num_frames
        if result.status is not SaveStatus.NOT_RECORDING:
            self._last_message = result.message
            failed = result.status in (SaveStatus.STORAGE_ERROR, SaveStatus.FAILED)
            self._last_level = DiagnosticStatus.ERROR if failed else DiagnosticStatus.OK
            log = self.get_logger().error if failed else self.get_logger().info
            log(result.message)
        return res

    def _drain(self) -> bool:
        """Before sealing, let the callbacks take what is already queued (a loaded machine lags behind):
        until every stream is quiet or delivers fresh messages again, at most stop_drain_timeout_s.
        False when it timed out."""
        since = time.monotonic()
        deadline = since + self.drain_timeout_s
        while time.monotonic() < deadline:
            if all(stats.drained(since) for stats in list(self.streams.values())):
                return True
            time.sleep(0.01)
        return False

    def _on_saved(self, result) -> None:
        """A save finished in the saver process (any stop mode)."""
        failed = result.status in (SaveStatus.STORAGE_ERROR, SaveStatus.FAILED)
        self._last_message = result.message
        self._last_level = DiagnosticStatus.ERROR if failed else DiagnosticStatus.OK
        if not self.stop_waits or failed:
            (self.get_logger().error if failed else self.get_logger().info)(result.message)

    def _auto_stop_check(self) -> None:
        if not self.recorder.recording or self._control.locked():  # idle, or a start/stop is under way
            return
        reason = self._auto_stop_reason
        if not reason and self.timeout_s > 0 and time.monotonic() - self._episode_started > self.timeout_s:
            reason = f"auto-stop: timeout after {self.timeout_s:g} s"
        if reason:
            self._auto_stop_reason = ""
            # nobody waits for an auto-stop: seal and let the saver work while the timer group is free
            self._finish(EpisodeOutcome.UNKNOWN, reason, StopEpisode.Response(), wait=False)

    def _judge(self, req: JudgeEpisode.Request, res: JudgeEpisode.Response) -> JudgeEpisode.Response:
        from lrm_reward.refinement.judge import (
            VERDICT_CODES,
            DatasetNotFoundError,
            JudgeBusyError,
            JudgeConfig,
            calibrate_against_operator,
            judge_dataset,
        )

        jp = self.judge_params
        try:
            cfg = JudgeConfig(
                completion_last_n=jp["completion_last_n"],
                curve_every_k=jp["curve_every_k"],
                success_threshold=jp["success_threshold"],
                progress_threshold=None if jp["progress_threshold"] < 0 else jp["progress_threshold"],
            )
            target = resolve_inside(self.data_root, req.dataset)  # refuse before loading any model
            if not (target / "meta" / "info.json").exists():
                raise DatasetNotFoundError(f"no recorded dataset at {target}")
            engine = self._judge_engine()
            episodes = None if req.episode_index < 0 else [req.episode_index]
            run = judge_dataset(
                req.dataset,
                engine,
                cfg,
                episodes=episodes,
                force=req.force,
                progress_bar=False,
                data_root=self.data_root,
            )
        except OutsideDataRootError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_OUTSIDE_DATA_ROOT, str(exc)
            return res
        except (DatasetNotFoundError, IndexError) as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_NOT_FOUND, str(exc)
            return res
        except JudgeBusyError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_BUSY, str(exc)
            return res
        except Exception as exc:  # model load or inference failure: report, stay up
            res.result, res.message = JudgeEpisode.Response.RESULT_MODEL_ERROR, f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"judge failed: {res.message}")
            return res
        from lrm_reward.refinement.judge import load_judgments

        stored = load_judgments(run.dataset)
        wanted = [req.episode_index] if req.episode_index >= 0 else sorted(stored)
        for e in wanted:
            j = stored.get(e)
            if j is None:
                continue
            msg = EpisodeJudgment()
            msg.dataset = str(run.dataset)
            msg.episode_index = j.episode_index
            msg.task = j.task
            msg.verdict = VERDICT_CODES[j.verdict]
            msg.success = j.success
            msg.confidence = float(j.confidence)
            msg.completion_prob = float(j.completion_prob)
            msg.final_progress = float(j.final_progress)
            msg.curve_frame_indices = [int(i) for i in j.curve_frame_indices]
            msg.progress_curve = [float(v) for v in j.progress_curve]
            msg.model_id = j.model_id
            res.judgments.append(msg)
        res.result = JudgeEpisode.Response.RESULT_OK
        ok = sum(1 for m in res.judgments if m.success)
        res.message = (
            f"judged {len(run.judged)}, reused {len(run.skipped)} stored judgments; {ok} of "
            f"{len(res.judgments)} successful"
        )
        try:
            res.message += f"; {calibrate_against_operator(run.dataset, cfg, stored)}"
        except Exception as exc:  # the judgments are written: a failed plot must not fail the call
            self.get_logger().warning(f"judge calibration failed: {type(exc).__name__}: {exc}")
        return res

    def _run_nightly(self, _req: Trigger.Request, res: Trigger.Response) -> Trigger.Response:
        """Start judge + refine in child processes (non-blocking); refuse while a run is going."""
        np_, jp = self.nightly_params, self.judge_params
        try:
            today = self.recorder.cfg.dataset_name_for(datetime.datetime.now())
            datasets = [
                resolve_inside(self.data_root, d.replace("{today}", today)) for d in np_["datasets"] if d
            ]
            missing = [str(d) for d in datasets if not (d / "meta" / "info.json").exists()]
            if missing:
                raise ValueError(f"no recorded dataset at {', '.join(missing)}")
            if np_["judge"] and not jp["model"]:
                raise ValueError("nightly.judge is true but no judge model is configured (judge.model)")
            cfg = NightlyConfig(
                datasets=datasets,
                store=Path(np_["store"]).expanduser(),
                policy=np_["policy"],
                judge_model=jp["model"] if np_["judge"] else "",
                judge_adapters=jp["adapters"],
                judge_device=jp["device"],
                judge_dtype=jp["dtype"],
                last_n=jp["completion_last_n"],
                every_k=jp["curve_every_k"],
                success_threshold=jp["success_threshold"],
                progress_threshold=None if jp["progress_threshold"] < 0 else jp["progress_threshold"],
                data_root=self.data_root,
                demos=[Path(d).expanduser() for d in np_["demos"] if d],
                steps=np_["steps"],
                batch_size=np_["batch_size"],
                device=np_["device"],
                judge_args=[a for a in np_["judge_args"] if a],
                refine_args=[a for a in np_["refine_args"] if a],
            )
            res.message = self.nightly.start(cfg)
            res.success = True
            self.get_logger().info(f"nightly: {res.message}")
        except (ValueError, RuntimeError, OSError) as exc:  # refused: bad settings, or a run is going
            res.success, res.message = False, str(exc)
        return res

    def _judge_engine(self):
        with self._engine_lock:
            if self._engine is None:
                jp = self.judge_params
                if self._engine_factory is not None:
                    self._engine = self._engine_factory(jp)
                else:
                    if not jp["model"]:
                        raise ValueError("no judge model configured (parameter judge.model)")
                    from lrm_reward.core.engine import EngineConfig, make_engine
                    from lrm_reward.refinement.judge import parse_adapters

                    self._engine = make_engine(
                        EngineConfig(
                            base_model=jp["model"],
                            adapters=parse_adapters(jp["adapters"]),
                            device=jp["device"],
                            dtype=jp["dtype"],
                        )
                    )
            return self._engine

    # ------------------------------------------------------------------ diagnostics and shutdown
    def _publish_diagnostics(self) -> None:
        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: recorder"
        status.hardware_id = str(self.data_root)
        status.level = self._last_level
        lost_any = any(stats.lost_total for stats in self.streams.values())
        if (self.counters or lost_any) and status.level == DiagnosticStatus.OK:
            status.level = DiagnosticStatus.WARN
        status.message = ("recording: " if self.recorder.recording else "") + self._last_message
        values = {
            "recording": str(self.recorder.recording),
            "saves in progress": str(self.recorder.saves_pending),
            **{k: str(v) for k, v in self.recorder.totals.items()},
        }
        for name, stats in sorted(self.streams.items()):
            values[f"received {name} (episode)"] = str(stats.episode)
            values[f"received {name} (total)"] = str(stats.total)
            if stats.counted:
                values[f"lost {name} (episode)"] = str(stats.lost)
                values[f"lost {name} (total)"] = str(stats.lost_total)
            values[f"lag {name} (episode max, s)"] = f"{stats.max_lag:.3f}"
        values.update({f"rejected {k}": str(v) for k, v in sorted(self.counters.items())})
        values.update(self.nightly.status())
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self._diag_pub.publish(msg)

    def shutdown_cleanly(self) -> None:
        with contextlib.suppress(Exception):
            if self.recorder.recording:
                self.get_logger().warning("shutting down while recording: the episode is discarded")
            self.recorder.close(save_timeout_s=self.shutdown_save_timeout_s)
        with contextlib.suppress(Exception):
            if self._engine is not None:
                self._engine.close()


def main(args: list[str] | None = None, engine_factory=None) -> int:
    """Entry point of `ros2 run lrm_reward refinement_node`."""
    rclpy.init(args=args if args is not None else sys.argv)
    node = RefinementNode(engine_factory=engine_factory)
    # a thread per entity: a stop waiting for the saver or a judge run never holds up a callback
    with forward_core_logging(node):  # the core's Python logging -> this node's logger and /rosout
        return spin_until_shutdown(node, thread_per_entity(node))


if __name__ == "__main__":
    sys.exit(main())
