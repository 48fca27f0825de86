"""refinement_node: records robot episodes into LeRobotDatasets, judges them, starts the nightly loop.

A thin shell around lrm_reward.refinement: subscription callbacks convert messages and append them to
the EpisodeRecorder (no encoding, no disk writes beyond the raw spool); services start and stop episodes
and judge recorded episodes; `~/run_nightly` starts judge + refine as child processes.

Judging loads no model here (`judge.mode: reward_node`, the default): `~/judge_episode` sends a goal to
reward_node's `~/judge_episodes` action (`judge.action`), which judges with the model it already holds, and
the nightly judge step is `lrm-judge --via-node` (one copy of the reward model per GPU, day and night).
`judge.mode: local` is the fallback for a machine without a reward node: a second copy, loaded here on
first use (`judge.model`, `judge.adapters`, ...).

Optional auto-stop: when the reward topic's `completed` flag holds for `auto_stop.completed_frames`
messages, or after `auto_stop.timeout_s`.

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

Where the pieces live: ``refinement_params`` (every parameter, declared, described and checked once),
``refinement_intake`` (the subscriptions and their callbacks, per-stream transport statistics). This
module is the node itself: episode control, judging, the nightly run, /diagnostics, shutdown and ``main``.
"""

from __future__ import annotations

import contextlib
import datetime
import sys
import threading
import time
from pathlib import Path

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_srvs.srv import Trigger

from lrm_interfaces.action import JudgeEpisodes
from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode
from lrm_reward.refinement.data_root import OutsideDataRootError, resolve_inside
from lrm_reward.refinement.nightly import NightlyConfig, NightlyRunner
from lrm_reward.refinement.recorder import EpisodeOutcome, EpisodeRecorder, RecorderBusyError, SaveStatus
from lrm_reward.ros.judge_action import JudgeActionClient, judgment_message
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.refinement_intake import RecordingIntakeMixin, StreamStats
from lrm_reward.ros.refinement_params import read_parameters
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
# reward_node's judge action result -> this node's JudgeEpisode answer (the rest: RESULT_MODEL_ERROR)
ACTION_RESULTS = {
    JudgeEpisodes.Result.RESULT_OK: JudgeEpisode.Response.RESULT_OK,
    JudgeEpisodes.Result.RESULT_OUTSIDE_DATA_ROOT: JudgeEpisode.Response.RESULT_OUTSIDE_DATA_ROOT,
    JudgeEpisodes.Result.RESULT_NOT_FOUND: JudgeEpisode.Response.RESULT_NOT_FOUND,
    JudgeEpisodes.Result.RESULT_BUSY: JudgeEpisode.Response.RESULT_BUSY,
}


class RefinementNode(RecordingIntakeMixin, Node):
    """See the module docstring; ``engine_factory`` (judge parameters -> engine) lets tests fake the judge."""

    def __init__(self, engine_factory=None) -> None:
        super().__init__("refinement_node")
        self._engine_factory = engine_factory
        settings = read_parameters(self)
        self.compressed = settings.compressed
        self.stamp_source = settings.stamp_source
        self.state_field = settings.state_field
        self.action_field = settings.action_field
        self.auto_stop_frames = settings.auto_stop_frames
        self.timeout_s = settings.auto_stop_timeout_s
        self.judge_params = settings.judge
        self.nightly_params = settings.nightly
        self.stop_waits = settings.stop_waits_for_save
        self.drain_timeout_s = settings.stop_drain_timeout_s
        self.shutdown_save_timeout_s = settings.shutdown_save_timeout_s
        self.recorder = EpisodeRecorder(settings.recorder)
        self.recorder.on_saved = self._on_saved
        # per stream: messages received while recording (episode / since start), last callback time,
        # smallest and latest (receive time - header stamp): tells a backlog from fresh messages
        self.streams: dict[str, StreamStats] = {}
        self.data_root = settings.recorder.data_root
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

        self._subscribe_inputs(settings, own_group)
        self.create_service(StartEpisode, "~/start_episode", self._start, callback_group=own_group())
        self.create_service(StopEpisode, "~/stop_episode", self._stop, callback_group=own_group())
        self.create_service(JudgeEpisode, "~/judge_episode", self._judge, callback_group=own_group())
        # judge.mode reward_node: the judge service waits (in its own thread) for reward_node's action
        self._judge_client = (
            JudgeActionClient(self, self.judge_params["action"])
            if self.judge_params["mode"] != "local"
            else None
        )
        self.nightly = NightlyRunner(self.data_root / "nightly")
        self.create_service(Trigger, "~/run_nightly", self._run_nightly, callback_group=own_group())
        self.create_timer(0.1, self._auto_stop_check, callback_group=own_group())
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0, self._publish_diagnostics, callback_group=own_group())
        self.get_logger().info(
            f"recording {list(settings.cameras)} from {settings.image_topics} into {self.data_root}"
        )

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
        """Judge through reward_node's ~/judge_episodes (judge.mode reward_node: its loaded model, no copy
        here), or with a model of this node's own (judge.mode local, loaded on first use)."""
        from lrm_reward.refinement.judge import (
            DatasetNotFoundError,
            JudgeConfig,
            calibrate_against_operator,
            load_judgments,
        )

        jp = self.judge_params
        try:
            cfg = JudgeConfig(
                completion_last_n=jp["completion_last_n"],
                curve_every_k=jp["curve_every_k"],
                success_threshold=jp["success_threshold"],
                progress_threshold=_off_if_negative(jp["progress_threshold"]),
                progress_success_threshold=_off_if_negative(jp["progress_success_threshold"]),
            )
            target = resolve_inside(self.data_root, req.dataset)  # refuse before asking any model
            if not (target / "meta" / "info.json").exists():
                raise DatasetNotFoundError(f"no recorded dataset at {target}")
        except OutsideDataRootError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_OUTSIDE_DATA_ROOT, str(exc)
            return res
        except DatasetNotFoundError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_NOT_FOUND, str(exc)
            return res
        except ValueError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_MODEL_ERROR, f"judge settings: {exc}"
            return res
        episodes = None if req.episode_index < 0 else [req.episode_index]
        if jp["mode"] == "local":
            judged, summary = self._judge_locally(target, cfg, episodes, req.force, res)
        else:
            judged, summary = self._judge_via_reward_node(target, cfg, episodes, req.force, res)
        if judged is None:
            if res.result == JudgeEpisode.Response.RESULT_MODEL_ERROR:
                self.get_logger().error(f"judge failed: {res.message}")
            return res
        stored = load_judgments(judged)
        wanted = episodes if episodes is not None else sorted(stored)
        res.judgments = [judgment_message(stored[e], str(judged)) for e in wanted if e in stored]
        res.result = JudgeEpisode.Response.RESULT_OK
        ok = sum(1 for m in res.judgments if m.success)
        res.message = f"{summary}; {ok} of {len(res.judgments)} successful"
        try:
            res.message += f"; {calibrate_against_operator(judged, cfg, stored)}"
        except Exception as exc:  # the judgments are written: a failed plot must not fail the call
            self.get_logger().warning(f"judge calibration failed: {type(exc).__name__}: {exc}")
        return res

    def _judge_via_reward_node(
        self, target: Path, cfg, episodes, force: bool, res
    ) -> tuple[Path | None, str]:
        """(dataset judged, summary), or (None, _) with res.result / res.message set."""
        from lrm_reward.ros.judge_action import JudgeServerUnavailableError, goal_for

        jp = self.judge_params
        try:
            _status, result = self._judge_client.judge(
                goal_for(target, cfg, episodes, force), server_timeout_s=jp["server_timeout_s"]
            )
        except JudgeServerUnavailableError as exc:
            res.result = JudgeEpisode.Response.RESULT_MODEL_ERROR
            res.message = f"{exc} (judge.mode is reward_node; judge.mode local loads a model here instead)"
            return None, ""
        except TimeoutError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_MODEL_ERROR, str(exc)
            return None, ""
        if result.result != JudgeEpisodes.Result.RESULT_OK:
            res.result = ACTION_RESULTS.get(result.result, JudgeEpisode.Response.RESULT_MODEL_ERROR)
            res.message = f"{jp['action']}: {result.message}"
            return None, ""
        return Path(result.dataset), f"{jp['action']}: {result.message}"

    def _judge_locally(self, target: Path, cfg, episodes, force: bool, res) -> tuple[Path | None, str]:
        """The fallback (judge.mode local): a model of this node's own, loaded on first use."""
        from lrm_reward.refinement.judge import DatasetNotFoundError, JudgeBusyError, judge_dataset

        try:
            run = judge_dataset(
                target,
                self._judge_engine(),
                cfg,
                episodes=episodes,
                force=force,
                progress_bar=False,
                data_root=self.data_root,
            )
        except OutsideDataRootError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_OUTSIDE_DATA_ROOT, str(exc)
            return None, ""
        except (DatasetNotFoundError, IndexError) as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_NOT_FOUND, str(exc)
            return None, ""
        except JudgeBusyError as exc:
            res.result, res.message = JudgeEpisode.Response.RESULT_BUSY, str(exc)
            return None, ""
        except Exception as exc:  # model load or inference failure: report, stay up
            res.result, res.message = JudgeEpisode.Response.RESULT_MODEL_ERROR, f"{type(exc).__name__}: {exc}"
            return None, ""
        return run.dataset, f"judged {len(run.judged)}, reused {len(run.skipped)} stored judgments"

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
            via_node = jp["mode"] != "local"
            if np_["judge"] and not via_node and not jp["model"]:
                raise ValueError("nightly.judge is true but no judge model is configured (judge.model)")
            cfg = NightlyConfig(
                datasets=datasets,
                store=Path(np_["store"]).expanduser(),
                policy=np_["policy"],
                judge_model=jp["model"] if np_["judge"] and not via_node else "",
                judge_via_node=jp["action"] if np_["judge"] and via_node else "",
                judge_adapters=jp["adapters"],
                judge_device=jp["device"],
                judge_dtype=jp["dtype"],
                last_n=jp["completion_last_n"],
                every_k=jp["curve_every_k"],
                success_threshold=jp["success_threshold"],
                progress_threshold=_off_if_negative(jp["progress_threshold"]),
                progress_success_threshold=_off_if_negative(jp["progress_success_threshold"]),
                data_root=self.data_root,
                demos=[Path(d).expanduser() for d in np_["demos"] if d],
                steps=np_["steps"],
                batch_size=np_["batch_size"],
                device=np_["device"],
                keep_best=np_["keep_best"],
                keep_best_min_judged=np_["keep_best_min_judged"],
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


def _off_if_negative(value: float) -> float | None:
    """ROS parameters have no None: a negative threshold means off."""
    return None if value < 0 else value


def main(args: list[str] | None = None, engine_factory=None) -> int:
    """Entry point of `ros2 run lrm_reward refinement_node`."""
    rclpy.init(args=args if args is not None else sys.argv)
    node = RefinementNode(engine_factory=engine_factory)
    # a thread per entity: a stop waiting for the saver or a judge run never holds up a callback
    with forward_core_logging(node):  # the core's Python logging -> this node's logger and /rosout
        # + a thread for the judge action client: the judge service waits for its result
        executor = thread_per_entity(node, extra=0 if getattr(node, "_judge_client", None) is None else 1)
        return spin_until_shutdown(node, executor)


if __name__ == "__main__":
    sys.exit(main())
