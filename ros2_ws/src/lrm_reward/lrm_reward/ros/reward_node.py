"""reward_node: camera topics in, dense LRM rewards (arXiv 2603.16065) and completion flags out.

A lifecycle node and a thin shell: it converts image messages, lets one ``EpisodeTracker`` per stream
decide which frames the model sees (interval-hold), hands those to a worker thread that runs the
``RewardEngine``, and publishes. No model logic lives here.

Lifecycle: configure loads the engine and builds the trackers, activate subscribes and starts the
worker, deactivate stops both, cleanup frees the model. The ``autostart`` parameter (default true)
runs configure + activate at startup so a plain ``ros2 run`` or a test comes up scoring; set it false
when a lifecycle manager drives the transitions.

Topics: subscribes to ``image`` (one camera) or the names in ``image_topics`` (generic names such as
``image_0``, remapped in launch), sensor-data QoS (override with the standard ``qos_overrides.<topic>``
parameters). Publishes ``~/reward`` (lrm_interfaces/RewardSignal), ``~/completed`` (std_msgs/Bool),
``~/annotated`` (sensor_msgs/Image, only drawn while someone subscribes) and ``/diagnostics`` at 1 Hz.
Services: ``~/set_task`` (lrm_interfaces/SetTask), ``~/reset_episode`` (std_srvs/Trigger).
Action: ``~/judge_episodes`` (lrm_interfaces/JudgeEpisodes) judges recorded episodes with the model this node
has loaded, whenever it holds one (inactive or active), so the refinement node and the nightly ``lrm-judge
--via-node`` need no copy of their own (ros/judge_action.py; it runs on its own executor thread).

How live scoring and judging share the one engine (core/engine_sharing.py, ``SharedEngine``): one model call
at a time; the scoring worker's calls go first, a judge call runs in between and holds the model for at most
``judge.queries_per_call`` queries, so a live frame waits at most one such call; a judge call waiting longer
than ``judge.max_yield_s`` behind live calls goes next, so judging always progresses. Camera callbacks never
touch the model and are never held up by judging (they run on this node's executor, the judge on its own).
Releasing the model (deactivate + cleanup, shutdown) first stops a running judge goal between two calls.

Frame rule — every decoded frame of an active node with a task gets exactly one RewardSignal:
- a frame the tracker holds (not due for a query) is answered at once from the callback, with held=True
  and scored_stamp = the last frame the model really scored;
- a frame due for a query goes into its stream's latest-wins slot; the worker takes every pending slot at
  once (one batched engine call across streams; with several cameras it first waits up to
  ``batch_window_s`` for the others' due frames) and publishes its reward with queried=True;
- a due frame replaced in its slot by a newer due frame before the worker took it is dropped: counted in
  ``dropped frames`` and answered right away as held (values of the last scored frame). The tracker has
  already made it the contrastive reference, which is fine: "is B closer than A" needs no score for A;
- an engine exception or out-of-memory answers the batch's frames with the last good values
  (unparsed > 0, scored_stamp unchanged), is counted per kind, logged once per kind, and the node goes on;
- a frame that cannot be decoded gets no reward (it is no frame): counted per kind, logged once per kind;
- before any task is set, frames are counted but not answered (diagnostics say "no task").
Held frames are published as they arrive and a queried frame after its model call, so on ``~/reward``
messages of one stream may come out of stamp order; ``header.stamp`` always names the frame answered.
A camera that stops simply gets no more rewards (nothing repeats) and turns WARN, later ERROR, in
/diagnostics. With ``multi_camera: paired`` frames are joined side by side by approximate stamp and one
reward per joined set is published (stream = the topics joined by '+'); frames that never pair are counted.

Where the pieces live: ``reward_params`` (the parameter table, validation, the configs built from it),
``reward_intake`` (camera subscriptions, conversion, pairing, the latest-wins slots), ``reward_publishing``
(reward, completion and annotated messages, /diagnostics), ``judge_action`` (the judge action server). This
module is the node itself: state, lifecycle, the worker that calls the engine, the services and ``main``.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rcl_interfaces.msg import SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from std_srvs.srv import Trigger

from lrm_interfaces.srv import SetTask
from lrm_reward.core.engine_sharing import SharedEngine
from lrm_reward.core.frame_slots import LatestFrameSlots
from lrm_reward.core.pairing import ApproximateTimePairer
from lrm_reward.core.serving_stats import FaultCounter, LatencyWindow, RateWindow
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX, EpisodeTracker, TrackerConfig, ask_engine
from lrm_reward.ros.judge_action import JudgeActionServer, JudgeServerSettings
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.reward_intake import FrameIntakeMixin, PendingFrame, Stream
from lrm_reward.ros.reward_params import (
    CONFIGURE_PARAMETERS,
    PARAMETERS,
    TRACKER_PARAMETERS,
    check_parameter,
    check_task,
    engine_config_from,
    tracker_config_from,
)
from lrm_reward.ros.reward_publishing import RewardOutputsMixin
from lrm_reward.ros.reward_student import STUDENT_PARAMETERS, StudentMixin
from lrm_reward.ros.serving_lifecycle import ServingLifecycleMixin
from lrm_reward.ros.spinning import spin_until_shutdown

NODE_NAME = "reward_node"
DIAGNOSTICS_PERIOD_S = 1.0
WORKER_POLL_S = 0.2  # the worker re-checks for shutdown this often when no frame comes


def engine_fault_kind(error: str) -> str:
    """Counter name for an engine failure message (out-of-memory gets its own)."""
    return "out_of_memory" if "out of memory" in error.lower() else "engine_error"


class RewardNode(FrameIntakeMixin, RewardOutputsMixin, StudentMixin, ServingLifecycleMixin, LifecycleNode):
    """See the module docstring; ``engine_factory`` (default make_engine) lets benchmarks fake the model."""

    def __init__(self, engine_factory=None, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._engine_factory = engine_factory
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._engine = None
        self._shared: SharedEngine | None = None  # the engine as live scoring and judging share it
        self._model_id = ""
        self._load_error = ""
        self._task = ""
        self._streams: list[Stream] = []
        self._paired: Stream | None = None
        self._pairer: ApproximateTimePairer | None = None
        self._pair_lock = threading.Lock()
        self._image_subscriptions: list = []
        self._slots: LatestFrameSlots[PendingFrame] = LatestFrameSlots()
        self._worker: threading.Thread | None = None
        self._active = threading.Event()
        self._activated_at = time.monotonic()
        self._last_frame_s: dict[str, float] = {}

        self._faults = FaultCounter()  # conversion, engine and other faults, per kind
        self._notices = FaultCounter()  # drops, unparsed answers, frames before a task: not errors
        self._model_latency = LatencyWindow()
        self._overhead = LatencyWindow()
        self._query_rate = RateWindow()
        self._scored_rate = RateWindow()
        self._counts_lock = threading.Lock()
        self._frames_in = 0
        self._rewards_out = 0
        self._dropped = 0
        self._unparsed = 0
        self._unpaired = 0
        self._last_engine_error_s = -math.inf

        self._reward_pub = None
        self._completed_pub = None
        self._annotated_pub = None
        self._diagnostics_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._publish_diagnostics)
        self.create_service(SetTask, "~/set_task", self._on_set_task)
        self.create_service(Trigger, "~/reset_episode", self._on_reset_episode)
        self._judging = JudgeActionServer(self, lambda: self._shared, self._judge_settings)

    # -- parameters ----------------------------------------------------------------------------------

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _judge_settings(self) -> JudgeServerSettings:
        return JudgeServerSettings(
            data_root=Path(self._param("judge.data_root")).expanduser(),
            queries_per_call=self._param("judge.queries_per_call"),
        )

    def _tracker_config(self, overrides: dict[str, Any] | None = None) -> TrackerConfig:
        """TrackerConfig from the current parameters (with overrides); raises ValueError when invalid."""
        values = {name: self._param(name) for name in TRACKER_PARAMETERS}
        values.update(overrides or {})
        return tracker_config_from(values)

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        pending = {p.name: p.value for p in params}
        for p in params:
            if p.name not in PARAMETERS:
                continue  # not ours (qos_overrides.*, use_sim_time): others validate those
            reason = check_parameter(p.name, p.value, pending, self._param, self._task)
            if reason:
                return SetParametersResult(successful=False, reason=reason)
        if any(name in TRACKER_PARAMETERS for name in pending):
            try:
                self._tracker_config({k: v for k, v in pending.items() if k in TRACKER_PARAMETERS})
            except (ValueError, TypeError) as exc:
                return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        names = {p.name for p in params}
        if not self._streams:
            return  # not configured: configure reads the parameters
        if "task" in names and self._param("task") != self._task:
            task = self._param("task")
            if task.strip():
                self._start_new_episode(task)
        if names & set(TRACKER_PARAMETERS):
            self._start_new_episode(None, self._tracker_config())
            self.get_logger().info("scoring parameters changed: a new episode started with them")
        if names & {"between", *STUDENT_PARAMETERS}:
            self._load_student_for_task()
        if names & set(CONFIGURE_PARAMETERS):
            self.get_logger().info(f"{sorted(names & set(CONFIGURE_PARAMETERS))} apply at the next configure")

    # -- lifecycle -----------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        pending = {name: self._param(name) for name in PARAMETERS}
        for name, value in pending.items():
            reason = check_parameter(name, value, pending, self._param, self._task)
            if reason:
                self.get_logger().error(f"configure failed: parameter {name}: {reason}")
                return TransitionCallbackReturn.FAILURE
        try:
            tracker_cfg = self._tracker_config()
        except (ValueError, TypeError) as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        try:
            engine_cfg = engine_config_from(self._param)
            factory = self._engine_factory or _default_engine_factory()
            self.get_logger().info(f"loading reward model {engine_cfg.base_model} on {engine_cfg.device} ...")
            started = time.monotonic()
            self._engine = factory(engine_cfg)
        except Exception as exc:  # any load failure must leave the node up and say why
            self._load_error = f"{type(exc).__name__}: {exc}"
            self._faults.report("model_load", self._load_error)
            self.get_logger().error(f"configure failed: could not load the reward model: {self._load_error}")
            return TransitionCallbackReturn.FAILURE
        self._load_error = ""
        self._model_id = str(getattr(self._engine, "model_id", engine_cfg.base_model))
        self._shared = SharedEngine(self._engine, max_yield_s=self._param("judge.max_yield_s"))
        self.get_logger().info(f"model {self._model_id} loaded in {time.monotonic() - started:.1f} s")

        self._task = self._param("task")
        self._build_streams(tracker_cfg)
        self._load_student_for_task()
        self._create_output_publishers()
        if not self._task.strip():
            self.get_logger().warning(
                "no task yet: frames are not scored until ~/set_task or the task parameter"
            )
        return super().on_configure(state)

    def _build_streams(self, tracker_cfg: TrackerConfig) -> None:
        topics = list(self._param("image_topics"))
        compressed = self._param("compressed")
        flags = [compressed] * len(topics) if isinstance(compressed, bool) else list(compressed)
        resolved = [self.resolve_topic_name(t) for t in topics]
        self._streams = [Stream(name, [t], [c]) for name, t, c in zip(resolved, topics, flags, strict=True)]
        self._paired = None
        self._pairer = None
        if self._param("multi_camera") == "paired" and len(topics) > 1:
            self._paired = Stream("+".join(resolved), topics, flags)
            self._pairer = ApproximateTimePairer(resolved, self._param("pair_slop_s"))
        for stream in self._scoring_streams():
            if self._task.strip():
                stream.tracker = EpisodeTracker(self._task, tracker_cfg, stream.name)

    def _scoring_streams(self) -> list[Stream]:
        """The streams that own trackers: each camera, or the one paired stream."""
        return [self._paired] if self._paired is not None else self._streams

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._slots.reopen()
        self._worker = threading.Thread(target=self._work, name="reward_worker", daemon=True)
        self._worker.start()
        self._subscribe_cameras()
        self._activated_at = time.monotonic()
        self._last_frame_s.clear()
        self._active.set()
        self.get_logger().info(f"active: scoring {[s.name for s in self._streams]} for task {self._task!r}")
        return super().on_activate(state)

    def _stop_serving(self) -> None:
        """Unsubscribe, let the worker finish its batch, answer what is still pending (as dropped)."""
        self._active.clear()
        for sub in self._image_subscriptions:
            self.destroy_subscription(sub)
        self._image_subscriptions.clear()
        self._slots.close()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        for item in self._slots.drain().values():
            self._publish_dropped(item)

    def _release(self) -> None:
        """Stop a running judge goal, free the model (GPU memory) and forget the streams."""
        self._shared = None  # no new judge goal gets the engine from here on
        self._judging.stop_running_goal()
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception as exc:  # cleanup goes on even if the backend complains
                self.get_logger().error(f"engine close failed: {exc}")
            self._engine = None
        self._destroy_output_publishers()
        self._streams = []
        self._paired = None
        self._pairer = None
        self._student, self._student_stream = None, None
        self._student_status = "not configured"

    def shutdown_cleanly(self) -> None:
        """Stop the worker and the judge, free the model whatever the lifecycle state (SIGINT / SIGTERM)."""
        self._active.clear()
        self._slots.close()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        self._shared = None
        self._judging.close()
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.close()
            self._engine = None

    def _state_label(self) -> str:
        # The state machine's label ("unconfigured", "inactive", "active", ...).
        return self._state_machine.current_state[1]

    # -- faults and notices --------------------------------------------------------------------------

    def _fault(self, kind: str, message: str) -> None:
        """Something went wrong: count it, keep it as the last error, log the first of each kind."""
        if self._faults.report(kind, message):
            self.get_logger().error(f"{kind}: {message} (logged once per kind; counted in /diagnostics)")

    def _notice(self, kind: str, message: str) -> None:
        """Something worth knowing but not an error (drops, unparsed answers): counted, logged once."""
        if self._notices.report(kind, message):
            self.get_logger().warning(f"{kind}: {message} (logged once; counted in /diagnostics)")

    # -- worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            pending = self._slots.take_all(
                timeout_s=WORKER_POLL_S,
                gather_s=self._param("batch_window_s"),
                expected=len(self._scoring_streams()),
            )
            if pending:
                try:
                    self._score(list(pending.values()))
                except Exception as exc:  # the worker must outlive any one batch
                    if not self.context.ok():
                        return  # shutting down: publishers are gone
                    self._fault("worker", f"{type(exc).__name__}: {exc}")
            elif self._slots.closed:
                return

    def _score(self, items: list[PendingFrame]) -> None:
        """One engine call for every pending frame of every stream, then publish each frame's reward."""
        queries = [q for item in items for q in item.plan.queries]
        started = time.monotonic()
        answers = ask_engine(self._shared, queries)
        engine_failed = False
        for answer in answers:
            if answer.parsed:
                continue
            error = answer.error or f"unparsed output {answer.raw_text[:200]!r}"
            kind = engine_fault_kind(error)
            raised = error.startswith(ENGINE_ERROR_PREFIX)
            if raised or kind == "out_of_memory":  # OOM here: the engine's own half-batch retry failed too
                if not engine_failed:  # one fault per batch, not per query
                    self._fault(kind, error.removeprefix(ENGINE_ERROR_PREFIX))
                    self._last_engine_error_s = time.monotonic()
                engine_failed = raised or engine_failed
            else:
                with self._counts_lock:
                    self._unparsed += 1
                self._notice("unparsed", f"{answer.modality.value}: {error}")
        model_s = time.monotonic() - started
        self._model_latency.add(model_s)
        self._query_rate.add(len(queries))
        self._scored_rate.add(len(items))
        start = 0
        for item in items:
            stop = start + len(item.plan.queries)
            frame_answers = answers[start:stop]
            start = stop
            with item.stream.lock:
                tracker = item.stream.tracker
                if tracker is None:
                    continue
                result = tracker.update(item.plan, frame_answers)
                if result.queried:
                    self._student_anchor(item.stream, frame_answers, item.rgb, item.plan.stamp_s)
            self._publish(item.stream, item.header, item.rgb, result, item.received_s, model_s=model_s)

    # -- services ------------------------------------------------------------------------------------

    def _on_set_task(self, request: SetTask.Request, response: SetTask.Response) -> SetTask.Response:
        if not self._active.is_set():
            response.result = SetTask.Response.RESULT_NOT_ACTIVE
            response.message = f"node is {self._state_label()}, not active: activate it first"
            return response
        task = self._task if request.reset_only else request.task
        if not task.strip():
            response.result = SetTask.Response.RESULT_EMPTY_TASK
            response.message = "task is empty" if not request.reset_only else "no task set yet to reset"
            return response
        reason = check_task(task, self._param("max_task_chars"))
        if reason:
            response.result = SetTask.Response.RESULT_TASK_TOO_LONG
            response.message = reason
            return response
        response.episode_id = self._start_new_episode(task)
        if self._param("task") != task:
            self.set_parameters([Parameter("task", value=task)])  # keep `ros2 param get` truthful
        response.result = SetTask.Response.RESULT_OK
        response.message = f"episode {response.episode_id} started for task {task[:80]!r}"
        return response

    def _on_reset_episode(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        if not self._active.is_set():
            response.success = False
            response.message = f"node is {self._state_label()}, not active"
        elif not self._task.strip():
            response.success = False
            response.message = "no task set yet: call ~/set_task"
        else:
            episode = self._start_new_episode(None)
            response.success = True
            response.message = f"episode {episode} started"
        return response

    def _start_new_episode(self, task: str | None, cfg: TrackerConfig | None = None) -> int:
        """New episode on every stream (new task and/or new scoring settings); returns its id.

        A frame still waiting for the model belongs to the old episode: it is answered now as dropped.
        A frame the model is scoring right now is answered with the old episode's id (the tracker does
        not apply its answers to the new episode).
        """
        if task is not None:
            task_changed = task != self._task
            self._task = task
        else:
            task_changed = False
        if not self._task.strip():
            return 0  # nothing to reset: trackers are built when the first task arrives
        episode = 0
        for stream in self._scoring_streams():
            waiting = self._slots.take(stream.name)
            if waiting is not None:
                self._publish_dropped(waiting)
            with stream.lock:
                old = stream.tracker
                if old is None or cfg is not None:
                    tracker = EpisodeTracker(self._task, cfg or self._tracker_config(), stream.name)
                    tracker.episode_id = 0 if old is None else old.episode_id + 1
                    stream.tracker = tracker
                else:
                    old.reset(task)
                self._student_reset(stream)
                episode = max(episode, stream.tracker.episode_id)
        if self._pairer is not None:
            with self._pair_lock:
                self._pairer.reset()
        if task_changed:
            self._load_student_for_task()  # a student is made for one task
        self.get_logger().info(f"episode {episode}: task {self._task[:80]!r}")
        return episode


def _default_engine_factory():
    from lrm_reward.core.engine import make_engine  # torch/transformers load only when a node configures

    return make_engine


def main(args: list[str] | None = None, engine_factory=None) -> int:
    """Entry point of ``ros2 run lrm_reward reward_node``; engine_factory is for fault-injection tests."""
    rclpy.init(args=args if args is not None else sys.argv)
    node = RewardNode(engine_factory=engine_factory)

    def autostart() -> None:
        if (
            node.get_parameter("autostart").value
            and node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        ):
            node.trigger_activate()

    with forward_core_logging(node):  # the core's Python logging -> this node's logger and /rosout
        return spin_until_shutdown(node, startup=autostart)


if __name__ == "__main__":
    sys.exit(main())
