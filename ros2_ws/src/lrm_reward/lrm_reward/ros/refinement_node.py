"""refinement_node: records robot episodes into LeRobotDatasets and judges them on request.

A thin shell around lrm_reward.refinement: subscription callbacks convert messages and append them to
the EpisodeRecorder (no encoding, no disk writes beyond the raw spool); services start and stop episodes
(stop resamples, encodes and saves: seconds, between episodes) and judge recorded episodes with the
reward model (loaded on first use). Optional auto-stop: when the reward topic's `completed` flag holds
for `auto_stop.completed_frames` messages, or after `auto_stop.timeout_s`.

Topics (generic names, remapped in launch): `image` (or the names in `image_topics`, one per entry of
`cameras`; sensor_msgs/Image or CompressedImage with `compressed: true`), `joint_states`
(sensor_msgs/JointState), `action` (JointState or std_msgs/Float64MultiArray, `action_type`), `reward`
(lrm_interfaces/RewardSignal). Services: `~/start_episode`, `~/stop_episode`, `~/judge_episode`.
/diagnostics at 1 Hz: recorder state and per-kind counters of rejected input.

Callbacks run in a reentrant group on a MultiThreadedExecutor, so saving (in a service) or judging never
stops the recording callbacks; start/stop/auto-stop are serialised by one lock.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from pathlib import Path

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray

from lrm_interfaces.msg import EpisodeJudgment, RewardSignal
from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode
from lrm_reward.refinement.data_root import OutsideDataRootError
from lrm_reward.refinement.recorder import (
    EpisodeOutcome,
    EpisodeRecorder,
    RecorderBusyError,
    RecorderConfig,
    SaveStatus,
)
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from lrm_reward.ros.spinning import spin_until_shutdown

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
            image_writer_threads=p("image_writer_threads", 2, "PNG writer threads while saving"),
        )
        if topics == [""] or not topics:
            topics = ["image"] if len(cameras) == 1 else [f"image_{c}" for c in cameras]
        if len(topics) != len(cameras):
            raise ValueError(f"image_topics ({len(topics)}) must name one topic per camera ({len(cameras)})")
        if self.action_type not in ("joint_state", "float64_multi_array"):
            raise ValueError(
                f"action_type must be joint_state or float64_multi_array, not {self.action_type!r}"
            )
        self.recorder = EpisodeRecorder(cfg)
        self.data_root = cfg.data_root
        self.counters: dict[str, int] = {}
        self._warned: set[str] = set()
        self._control = threading.Lock()
        self._completed_run = 0
        self._auto_stop_reason = ""
        self._episode_started = 0.0
        self._last_message = "idle"
        self._last_level = DiagnosticStatus.OK
        self._engine = None
        self._engine_lock = threading.Lock()

        sensors = ReentrantCallbackGroup()
        recording = MutuallyExclusiveCallbackGroup()
        judging = MutuallyExclusiveCallbackGroup()
        image_type = CompressedImage if self.compressed else Image
        self._subs = []
        for cam, topic in zip(cameras, topics, strict=True):
            self._subs.append(
                self.create_subscription(
                    image_type,
                    topic,
                    lambda msg, cam=cam: self._on_image(cam, msg),
                    qos_profile_sensor_data,
                    callback_group=sensors,
                )
            )
        self._subs.append(
            self.create_subscription(JointState, "joint_states", self._on_state, 50, callback_group=sensors)
        )
        action_msg = JointState if self.action_type == "joint_state" else Float64MultiArray
        self._subs.append(
            self.create_subscription(action_msg, "action", self._on_action, 50, callback_group=sensors)
        )
        self._subs.append(
            self.create_subscription(RewardSignal, "reward", self._on_reward, 50, callback_group=sensors)
        )
        self.create_service(StartEpisode, "~/start_episode", self._start, callback_group=recording)
        self.create_service(StopEpisode, "~/stop_episode", self._stop, callback_group=recording)
        self.create_service(JudgeEpisode, "~/judge_episode", self._judge, callback_group=judging)
        self.create_timer(0.1, self._auto_stop_check, callback_group=recording)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(f"recording {list(cameras)} from {topics} into {self.data_root}")

    # ------------------------------------------------------------------ parameters
    def _param(self, name: str, default, description: str):
        return self.declare_parameter(name, default, ParameterDescriptor(description=description)).value

    # ------------------------------------------------------------------ callbacks: convert and append
    def _stamp(self, header) -> float:
        if self.stamp_source == "header" and (header.stamp.sec or header.stamp.nanosec):
            return header.stamp.sec + header.stamp.nanosec * 1e-9
        return self.get_clock().now().nanoseconds * 1e-9

    def _on_image(self, camera: str, msg) -> None:
        if not self.recorder.recording:
            return
        try:
            rgb = compressed_msg_to_rgb(msg) if self.compressed else image_msg_to_rgb(msg)
            self.recorder.add_image(camera, self._stamp(msg.header), rgb)
        except ImageConversionError as exc:
            self._count(f"image_{exc.kind}", f"camera {camera}: {exc}")
        except ValueError as exc:
            self._count("bad_image", f"camera {camera}: {exc}")

    def _on_state(self, msg: JointState) -> None:
        if not self.recorder.recording:
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

    def _on_action(self, msg) -> None:
        if not self.recorder.recording:
            return
        if isinstance(msg, JointState):
            values, names, stamp = (
                getattr(msg, self.action_field),
                list(msg.name) or None,
                self._stamp(msg.header),
            )
        else:
            values, names, stamp = msg.data, None, self.get_clock().now().nanoseconds * 1e-9
        if len(values) == 0:
            self._count("empty_action", "action without values")
            return
        try:
            if not self.recorder.add_action(stamp, np.asarray(values), names):
                self._count("nan_action", "action with NaN/inf dropped")
        except ValueError as exc:
            self._count("bad_action", str(exc))

    def _on_reward(self, msg: RewardSignal) -> None:
        if not self.recorder.recording:
            return
        self.recorder.add_reward(self._stamp(msg.header), msg.progress, msg.completion_prob, msg.reward)
        self._completed_run = self._completed_run + 1 if msg.completed else 0
        if self.auto_stop_frames > 0 and self._completed_run >= self.auto_stop_frames:
            self._auto_stop_reason = f"auto-stop: completed held for {self._completed_run} reward messages"

    def _count(self, kind: str, message: str) -> None:
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

    def _finish(self, outcome: EpisodeOutcome, notes: str, res: StopEpisode.Response) -> StopEpisode.Response:
        with self._control:
            result = self.recorder.stop(outcome, notes=notes)
        res.result = STOP_RESULTS[result.status]
        res.message = result.message
        res.episode_index = max(result.episode_index, 0)
        res.num_frames = result.num_frames
        if result.status is not SaveStatus.NOT_RECORDING:
            self._last_message = result.message
            failed = result.status in (SaveStatus.STORAGE_ERROR, SaveStatus.FAILED)
            self._last_level = DiagnosticStatus.ERROR if failed else DiagnosticStatus.OK
            log = self.get_logger().error if failed else self.get_logger().info
            log(result.message)
        return res

    def _auto_stop_check(self) -> None:
        if not self.recorder.recording:
            return
        reason = self._auto_stop_reason
        if not reason and self.timeout_s > 0 and time.monotonic() - self._episode_started > self.timeout_s:
            reason = f"auto-stop: timeout after {self.timeout_s:g} s"
        if reason:
            self._auto_stop_reason = ""
            self._finish(EpisodeOutcome.UNKNOWN, reason, StopEpisode.Response())

    def _judge(self, req: JudgeEpisode.Request, res: JudgeEpisode.Response) -> JudgeEpisode.Response:
        from lrm_reward.refinement.judge import (
            VERDICT_CODES,
            DatasetNotFoundError,
            JudgeBusyError,
            JudgeConfig,
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
            from lrm_reward.refinement.data_root import resolve_inside

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
        if self.counters and status.level == DiagnosticStatus.OK:
            status.level = DiagnosticStatus.WARN
        status.message = ("recording: " if self.recorder.recording else "") + self._last_message
        values = {
            "recording": str(self.recorder.recording),
            **{k: str(v) for k, v in self.recorder.totals.items()},
        }
        values.update({f"rejected {k}": str(v) for k, v in sorted(self.counters.items())})
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        msg = DiagnosticArray()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.status = [status]
        self._diag_pub.publish(msg)

    def shutdown_cleanly(self) -> None:
        with contextlib.suppress(Exception):
            if self.recorder.recording:
                self.get_logger().warning("shutting down while recording: the episode is discarded")
            self.recorder.close()
        with contextlib.suppress(Exception):
            if self._engine is not None:
                self._engine.close()


def main(args: list[str] | None = None, engine_factory=None) -> int:
    """Entry point of `ros2 run lrm_reward refinement_node`."""
    rclpy.init(args=args if args is not None else sys.argv)
    node = RefinementNode(engine_factory=engine_factory)
    return spin_until_shutdown(node, MultiThreadedExecutor(num_threads=4))


if __name__ == "__main__":
    sys.exit(main())
