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
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Bool, Header
from std_srvs.srv import Trigger

from lrm_interfaces.msg import RewardSignal
from lrm_interfaces.srv import SetTask
from lrm_reward.core.annotation import RewardOverlay, annotate_frame
from lrm_reward.core.compiled_suffix import COMPILE_MODES
from lrm_reward.core.frame_slots import LatestFrameSlots
from lrm_reward.core.images import hstack_rgb
from lrm_reward.core.pairing import ApproximateTimePairer
from lrm_reward.core.serving_stats import FaultCounter, LatencyWindow, RateWindow
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX, EpisodeTracker, FramePlan, TrackerConfig, ask_engine
from lrm_reward.core.types import Modality, Readout, RewardResult
from lrm_reward.ros.diagnostics import ModelHealth, StreamHealth, build_diagnostics
from lrm_reward.ros.image_conversion import (
    ImageConversionError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_image_msg,
)
from lrm_reward.ros.log_bridge import forward_core_logging
from lrm_reward.ros.spinning import spin_until_shutdown

NODE_NAME = "reward_node"
MULTI_CAMERA_MODES = ("per_camera", "paired")
READOUTS = tuple(r.value for r in Readout)
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODALITY_NAMES = tuple(m.value for m in Modality)
DIAGNOSTICS_PERIOD_S = 1.0
WORKER_POLL_S = 0.2  # the worker re-checks for shutdown this often when no frame comes
SCORED_STAMPS_KEPT = 16  # per stream: exact stamps of recently queried frames, for scored_stamp

# Parameters that change how frames are scored: a change starts a new episode with the new settings.
TRACKER_PARAMETERS = (
    "modalities",
    "interval_frames",
    "interval_s",
    "between",
    "weights.progress",
    "weights.contrastive",
    "weights.completion",
    "completion_threshold",
    "completion_debounce",
    "chain_of_thought",
)
# Parameters read at configure: a change applies after cleanup + configure.
CONFIGURE_PARAMETERS = ("image_topics", "compressed", "multi_camera", "pair_slop_s")


def _describe(text: str, read_only: bool = False, dynamic: bool = False) -> ParameterDescriptor:
    return ParameterDescriptor(description=text, read_only=read_only, dynamic_typing=dynamic)


# name -> (default, descriptor). Declared once, in this order; config/reward_node.yaml mirrors it.
PARAMETERS: dict[str, tuple[Any, ParameterDescriptor]] = {
    "autostart": (
        True,
        _describe("configure + activate at startup (false: wait for a lifecycle manager)", read_only=True),
    ),
    "task": ("", _describe("task text the model scores against; a change starts a new episode")),
    "image_topics": (
        ["image"],
        _describe("camera topics to subscribe to (generic names, remapped in launch); applied at configure"),
    ),
    "compressed": (
        False,
        _describe(
            "topics carry sensor_msgs/CompressedImage: one bool for all, or one per image_topics entry; "
            "applied at configure",
            dynamic=True,
        ),
    ),
    "multi_camera": (
        "per_camera",
        _describe("several cameras: 'per_camera' (one reward stream each) or 'paired' (joined side by side)"),
    ),
    "pair_slop_s": (
        0.05,
        _describe("[s] max stamp difference of frames joined in 'paired' mode; applied at configure"),
    ),
    "model.base": (
        "Qwen/Qwen3-VL-8B-Instruct",
        _describe("base Qwen3-VL checkpoint: local folder or Hub id", read_only=True),
    ),
    "model.adapters.progress": (
        "",
        _describe("progress LoRA adapter folder / Hub id ('' = none)", read_only=True),
    ),
    "model.adapters.contrastive": (
        "",
        _describe("contrastive LoRA adapter folder / Hub id ('' = none)", read_only=True),
    ),
    "model.adapters.completion": (
        "",
        _describe("completion LoRA adapter folder / Hub id ('' = none)", read_only=True),
    ),
    "model.processor": (
        "",
        _describe(
            "processor (tokenizer + image processor) folder / Hub id; '' = the base, else an adapter folder",
            read_only=True,
        ),
    ),
    "model.backend": (
        "local",
        _describe("engine backend: 'local' (in-process transformers)", read_only=True),
    ),
    "model.readout": ("logits", _describe(f"how answers are read: one of {READOUTS}", read_only=True)),
    "model.device": ("cuda", _describe("torch device: cpu, cuda, cuda:1, ...", read_only=True)),
    "model.dtype": ("auto", _describe(f"weights dtype: one of {DTYPES}", read_only=True)),
    "model.attn_implementation": (
        "",
        _describe("'' (default), 'sdpa', 'flash_attention_2', ...", read_only=True),
    ),
    "model.max_batch_size": (8, _describe("largest batch one engine forward takes", read_only=True)),
    "model.fast_path": (
        True,
        _describe("reuse each episode prompt-prefix KV cache; false = plain path", read_only=True),
    ),
    "model.compile": (
        "off",
        _describe(f"static suffix pass, one of {COMPILE_MODES} (GPU)", read_only=True),
    ),
    "model.local_files_only": (
        True,
        _describe("never download: Hub ids must already be in the local cache", read_only=True),
    ),
    "modalities": (
        ["progress", "completion"],
        _describe(f"adapters asked on a queried frame, of {MODALITY_NAMES}"),
    ),
    "interval_frames": (10, _describe("query the model every k frames (paper: k=10)")),
    "interval_s": (
        0.0,
        _describe("[s] query every T seconds of stamp time instead; 0 = use interval_frames"),
    ),
    "between": (
        "hold",
        _describe("between queries: 'hold' repeats the last values, 'zero' zeros the reward"),
    ),
    "weights.progress": (1.0, _describe("fusion weight of progress (>= 0)")),
    "weights.contrastive": (1.0, _describe("fusion weight of contrastive (>= 0)")),
    "weights.completion": (1.0, _describe("fusion weight of completion (>= 0)")),
    "completion_threshold": (0.5, _describe("P(done) at or above this counts as done, in [0, 1]")),
    "completion_debounce": (
        3,
        _describe("consecutive queries on one side of the threshold to flip completed"),
    ),
    "chain_of_thought": (False, _describe("contrastive step-by-step reasoning (generate readout; slow)")),
    "max_task_chars": (
        2000,
        _describe("longest task text accepted (also the engine's limit)", read_only=True),
    ),
    "camera_timeout_s": (
        2.0,
        _describe("[s] a camera silent this long turns WARN in /diagnostics (ERROR at 3x)"),
    ),
    "batch_window_s": (
        0.005,
        _describe(
            "[s] several cameras: wait up to this long for the others' due frames to share one model call"
        ),
    ),
    "publish_annotated": (True, _describe("publish ~/annotated (drawn only while it has subscribers)")),
}


def stamp_to_s(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def s_to_stamp(seconds: float) -> Time:
    total_ns = round(seconds * 1e9)
    return Time(sec=total_ns // 1_000_000_000, nanosec=total_ns % 1_000_000_000)


def engine_fault_kind(error: str) -> str:
    """Counter name for an engine failure message (out-of-memory gets its own)."""
    return "out_of_memory" if "out of memory" in error.lower() else "engine_error"


@dataclass
class Stream:
    """One reward stream: a camera (or the joined cameras) with its tracker and counters."""

    name: str
    topics: list[str]
    compressed: list[bool]
    tracker: EpisodeTracker | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards tracker and scored_stamps
    scored_stamps: OrderedDict[float, Time] = field(default_factory=OrderedDict)
    frames_in: int = 0
    rate: RateWindow = field(default_factory=RateWindow)


@dataclass
class PendingFrame:
    stream: Stream
    plan: FramePlan
    header: Header
    rgb: np.ndarray
    received_s: float  # monotonic time the frame arrived


class RewardNode(LifecycleNode):
    """See the module docstring; ``engine_factory`` (default make_engine) lets benchmarks fake the model."""

    def __init__(self, engine_factory=None, **kwargs) -> None:
        super().__init__(NODE_NAME, **kwargs)
        self._engine_factory = engine_factory
        for name, (default, descriptor) in PARAMETERS.items():
            self.declare_parameter(name, default, descriptor)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._engine = None
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

    # -- parameters ----------------------------------------------------------------------------------

    def _param(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _tracker_config(self, overrides: dict[str, Any] | None = None) -> TrackerConfig:
        """TrackerConfig from the current parameters (with overrides); raises ValueError when invalid."""
        values = {name: self._param(name) for name in TRACKER_PARAMETERS}
        values.update(overrides or {})
        modalities = tuple(values["modalities"] or ())
        weights = {m: float(values[f"weights.{m}"]) for m in modalities if f"weights.{m}" in values}
        interval_s = float(values["interval_s"])
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0 (0 = use interval_frames), got {interval_s}")
        return TrackerConfig(
            modalities=modalities,
            interval_frames=values["interval_frames"],
            interval_s=interval_s if interval_s > 0 else None,
            between=values["between"],
            weights=weights,
            completion_threshold=float(values["completion_threshold"]),
            completion_debounce=values["completion_debounce"],
            chain_of_thought=values["chain_of_thought"],
        )

    def _check_value(self, name: str, value: Any, pending: dict[str, Any]) -> str | None:
        """Why value is not acceptable for parameter name, or None."""
        if name == "task":
            if not value.strip() and self._task.strip():
                return "task must not be empty once set (the node keeps scoring the current task)"
            return self._check_task(value, pending.get("max_task_chars", self._param("max_task_chars")))
        if name == "image_topics":
            if not value or any(not str(t).strip() for t in value):
                return "image_topics must list at least one non-empty topic name"
            if len(set(value)) != len(value):
                return f"image_topics must not repeat: {list(value)}"
        if name == "compressed":
            topics = pending.get("image_topics", self._param("image_topics"))
            if isinstance(value, bool):
                return None
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, bool) for v in value):
                return "compressed must be a bool or a list of bools"
            if len(value) != len(topics):
                return f"compressed lists {len(value)} values for {len(topics)} image_topics"
        if name == "multi_camera" and value not in MULTI_CAMERA_MODES:
            return f"multi_camera must be one of {MULTI_CAMERA_MODES}, got {value!r}"
        if name == "pair_slop_s" and not (math.isfinite(value) and value >= 0):
            return f"pair_slop_s must be a finite number >= 0, got {value}"
        if name == "max_task_chars" and value < 1:
            return f"max_task_chars must be >= 1, got {value}"
        if name == "batch_window_s" and not (math.isfinite(value) and 0 <= value <= 1):
            return f"batch_window_s must be in [0, 1] s, got {value}"
        if name == "camera_timeout_s" and not (math.isfinite(value) and value > 0):
            return f"camera_timeout_s must be a finite number > 0, got {value}"
        if name == "model.readout" and value not in READOUTS:
            return f"model.readout must be one of {READOUTS}, got {value!r}"
        if name == "model.dtype" and value not in DTYPES:
            return f"model.dtype must be one of {DTYPES}, got {value!r}"
        if name == "model.compile" and value not in COMPILE_MODES:
            return f"model.compile must be one of {COMPILE_MODES}, got {value!r}"
        if name == "model.max_batch_size" and value < 1:
            return f"model.max_batch_size must be >= 1, got {value}"
        if name == "model.base" and not str(value).strip():
            return "model.base must name a checkpoint folder or Hub id"
        return None

    def _check_task(self, task: str, max_chars: int) -> str | None:
        if len(task) > max_chars:
            return f"task is {len(task)} characters, more than max_task_chars={max_chars}"
        return None  # empty is allowed here: it means "no task yet"; ~/set_task rejects it

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        pending = {p.name: p.value for p in params}
        for p in params:
            if p.name not in PARAMETERS:
                continue  # not ours (qos_overrides.*, use_sim_time): others validate those
            reason = self._check_value(p.name, p.value, pending)
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
        if names & set(CONFIGURE_PARAMETERS):
            self.get_logger().info(f"{sorted(names & set(CONFIGURE_PARAMETERS))} apply at the next configure")

    # -- lifecycle -----------------------------------------------------------------------------------

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        pending = {name: self._param(name) for name in PARAMETERS}
        for name, value in pending.items():
            reason = self._check_value(name, value, pending)
            if reason:
                self.get_logger().error(f"configure failed: parameter {name}: {reason}")
                return TransitionCallbackReturn.FAILURE
        try:
            tracker_cfg = self._tracker_config()
        except (ValueError, TypeError) as exc:
            self.get_logger().error(f"configure failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        try:
            engine_cfg = self._engine_config()
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
        self.get_logger().info(f"model {self._model_id} loaded in {time.monotonic() - started:.1f} s")

        self._task = self._param("task")
        self._build_streams(tracker_cfg)
        # Deep reliable history: a plotting tool or recorder that stalls for a moment must not lose rewards
        # or completion flags (with 10, a stalled test subscriber lost 5 of 40 flags in CI)
        self._reward_pub = self.create_lifecycle_publisher(RewardSignal, "~/reward", 1000)
        self._completed_pub = self.create_lifecycle_publisher(Bool, "~/completed", 1000)
        self._annotated_pub = self.create_lifecycle_publisher(
            Image,
            "~/annotated",
            qos_profile_sensor_data,
            qos_overriding_options=QoSOverridingOptions.with_default_policies(),
        )
        if not self._task.strip():
            self.get_logger().warning(
                "no task yet: frames are not scored until ~/set_task or the task parameter"
            )
        return super().on_configure(state)

    def _engine_config(self):
        from lrm_reward.core.engine import EngineConfig

        adapters = {m: self._param(f"model.adapters.{m}") for m in MODALITY_NAMES}
        adapters = {m: path for m, path in adapters.items() if path}
        return EngineConfig(
            base_model=self._param("model.base"),
            adapters=adapters or None,
            readout=Readout(self._param("model.readout")),
            device=self._param("model.device"),
            dtype=self._param("model.dtype"),
            attn_implementation=self._param("model.attn_implementation") or None,
            max_batch_size=self._param("model.max_batch_size"),
            fast_path=self._param("model.fast_path"),
            compile=self._param("model.compile"),
            local_files_only=self._param("model.local_files_only"),
            backend=self._param("model.backend"),
            processor=self._param("model.processor") or None,
            max_task_chars=self._param("max_task_chars"),
        )

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
        for stream in self._streams:
            topic, compressed = stream.topics[0], stream.compressed[0]
            msg_type = CompressedImage if compressed else Image

            def callback(msg, stream=stream, compressed=compressed):
                self._on_frame(stream, msg, compressed)

            self._image_subscriptions.append(
                self.create_subscription(
                    msg_type,
                    topic,
                    callback,
                    qos_profile_sensor_data,
                    qos_overriding_options=QoSOverridingOptions.with_default_policies(),
                )
            )
        self._activated_at = time.monotonic()
        self._last_frame_s.clear()
        self._active.set()
        self.get_logger().info(f"active: scoring {[s.name for s in self._streams]} for task {self._task!r}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_serving()
        self._release()
        return TransitionCallbackReturn.SUCCESS

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
        """Free the model (GPU memory) and forget the streams."""
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception as exc:  # cleanup goes on even if the backend complains
                self.get_logger().error(f"engine close failed: {exc}")
            self._engine = None
        for pub in (self._reward_pub, self._completed_pub, self._annotated_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._reward_pub = self._completed_pub = self._annotated_pub = None
        self._streams = []
        self._paired = None
        self._pairer = None

    def shutdown_cleanly(self) -> None:
        """Stop the worker and free the model whatever the lifecycle state (on SIGINT / SIGTERM)."""
        self._active.clear()
        self._slots.close()
        if self._worker is not None:
            self._worker.join()
            self._worker = None
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self._engine.close()
            self._engine = None

    # -- frames in -----------------------------------------------------------------------------------

    def _fault(self, kind: str, message: str) -> None:
        """Something went wrong: count it, keep it as the last error, log the first of each kind."""
        if self._faults.report(kind, message):
            self.get_logger().error(f"{kind}: {message} (logged once per kind; counted in /diagnostics)")

    def _notice(self, kind: str, message: str) -> None:
        """Something worth knowing but not an error (drops, unparsed answers): counted, logged once."""
        if self._notices.report(kind, message):
            self.get_logger().warning(f"{kind}: {message} (logged once; counted in /diagnostics)")

    def _on_frame(self, stream: Stream, msg: Image | CompressedImage, compressed: bool) -> None:
        received = time.monotonic()
        if not self._active.is_set():
            return
        with self._counts_lock:
            self._frames_in += 1
        stream.frames_in += 1
        stream.rate.add()
        self._last_frame_s[stream.name] = received
        try:
            rgb = compressed_msg_to_rgb(msg) if compressed else image_msg_to_rgb(msg)
        except ImageConversionError as exc:
            self._fault(f"conversion:{exc.kind}", f"{stream.name}: {exc}")
            return
        except Exception as exc:  # a converter bug must not kill the callback
            self._fault("conversion:unexpected", f"{stream.name}: {type(exc).__name__}: {exc}")
            return
        if self._pairer is None:
            self._handle_frame(stream, msg.header, rgb, received)
            return
        with self._pair_lock:
            dropped_before = sum(self._pairer.dropped.values())
            joined = self._pairer.push(stream.name, stamp_to_s(msg.header.stamp), (msg.header, rgb, received))
            unpaired = sum(self._pairer.dropped.values()) - dropped_before
        if unpaired:
            self._unpaired += unpaired
            self._notice(
                "unpaired", f"frames without a partner within pair_slop_s={self._param('pair_slop_s')}"
            )
        if joined is None:
            return
        parts = [joined.items[s.name] for s in self._streams]
        newest = max(parts, key=lambda part: stamp_to_s(part[0].stamp))
        try:
            rgb = hstack_rgb([part[1] for part in parts])
        except ValueError as exc:
            self._fault("conversion:join", str(exc))
            return
        self._handle_frame(self._paired, newest[0], rgb, min(part[2] for part in parts))

    def _handle_frame(self, stream: Stream, header: Header, rgb: np.ndarray, received: float) -> None:
        stamp_s = stamp_to_s(header.stamp)
        held: RewardResult | None = None
        with stream.lock:
            tracker = stream.tracker
            if tracker is None:
                self._notice("no_task", "frames arrive but there is no task: call ~/set_task")
                return
            plan = tracker.plan(rgb, stamp_s)
            if plan.queries:
                self._remember_scored_stamp(stream, stamp_s, header.stamp)
            else:
                held = tracker.update(plan, [])
        if held is not None:
            self._publish(stream, header, rgb, held, received, model_s=0.0)
            return
        replaced = self._slots.put(stream.name, PendingFrame(stream, plan, header, rgb, received))
        if replaced is not None:
            self._publish_dropped(replaced)

    @staticmethod
    def _remember_scored_stamp(stream: Stream, stamp_s: float, stamp: Time) -> None:
        # scored_stamp comes back from the tracker as float seconds; keep the exact message stamp.
        stream.scored_stamps[stamp_s] = stamp
        while len(stream.scored_stamps) > SCORED_STAMPS_KEPT:
            stream.scored_stamps.popitem(last=False)

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
        answers = ask_engine(self._engine, queries)
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
            self._publish(item.stream, item.header, item.rgb, result, item.received_s, model_s=model_s)

    def _publish_dropped(self, item: PendingFrame) -> None:
        with self._counts_lock:
            self._dropped += 1
        self._notice(
            "dropped", "a frame due for scoring was replaced by a newer one while the model was busy"
        )
        with item.stream.lock:
            tracker = item.stream.tracker
            if tracker is None:
                return
            result = tracker.dropped(item.plan)
        self._publish(item.stream, item.header, item.rgb, result, item.received_s, model_s=0.0)

    # -- outputs -------------------------------------------------------------------------------------

    def _publish(
        self,
        stream: Stream,
        header: Header,
        rgb: np.ndarray,
        result: RewardResult,
        received: float,
        model_s: float,
    ) -> None:
        pub = self._reward_pub
        if pub is None:
            return
        msg = RewardSignal()
        msg.header = header
        with stream.lock:
            exact = stream.scored_stamps.get(result.scored_stamp_s)
        if exact is not None:
            msg.scored_stamp = exact
        elif math.isfinite(result.scored_stamp_s):
            msg.scored_stamp = s_to_stamp(result.scored_stamp_s)
        # else: nothing scored yet in this episode -> scored_stamp stays zero
        msg.stream = stream.name
        msg.task = stream.tracker.task if stream.tracker is not None else self._task
        msg.episode_id = result.episode_id
        msg.frame_index = result.frame_index
        msg.progress = result.progress
        msg.contrastive = result.contrastive
        msg.completion_prob = result.completion_prob
        msg.completed = result.completed
        msg.reward = result.reward
        msg.held = result.held
        msg.queried = result.queried
        msg.unparsed = result.unparsed
        msg.model_id = self._model_id
        msg.query_latency = result.latency_s
        pub.publish(msg)
        if self._completed_pub is not None:
            self._completed_pub.publish(Bool(data=result.completed))
        self._overhead.add(max(0.0, time.monotonic() - received - model_s))
        with self._counts_lock:
            self._rewards_out += 1
        self._publish_annotated(header, rgb, msg, result)

    def _publish_annotated(
        self, header: Header, rgb: np.ndarray, msg: RewardSignal, result: RewardResult
    ) -> None:
        pub = self._annotated_pub
        if pub is None or not self._param("publish_annotated") or pub.get_subscription_count() == 0:
            return
        overlay = RewardOverlay(
            task=msg.task,
            progress=result.progress,
            completion_prob=result.completion_prob,
            completed=result.completed,
            reward=result.reward,
            held=result.held,
            latency_s=result.latency_s,
            episode_id=result.episode_id,
            frame_index=result.frame_index,
            reasoning=result.reasoning if self._param("chain_of_thought") else "",
        )
        try:
            pub.publish(rgb_to_image_msg(annotate_frame(rgb, overlay), header))
        except Exception as exc:  # the picture is optional, the reward is not
            self._fault("annotation", f"{type(exc).__name__}: {exc}")

    def _publish_diagnostics(self) -> None:
        now = time.monotonic()
        active = self._active.is_set()
        streams = []
        for stream in self._streams:
            last = self._last_frame_s.get(stream.name, self._activated_at)
            streams.append(
                StreamHealth(
                    stream.name, stream.frames_in, now - last if active else None, stream.rate.rate()
                )
            )
        faults = self._faults.snapshot()
        conversion = {k.split(":", 1)[1]: n for k, n in faults.counts.items() if k.startswith("conversion:")}
        engine = {k: n for k, n in faults.counts.items() if k in ("engine_error", "out_of_memory")}
        trackers = [s.tracker for s in self._scoring_streams() if s.tracker is not None]
        with self._counts_lock:
            health = ModelHealth(
                lifecycle_state=self._state_label(),
                loaded=self._engine is not None,
                model_id=self._model_id,
                load_error=self._load_error,
                task=self._task,
                episode_id=max((t.episode_id for t in trackers), default=0),
                query_rate_hz=self._query_rate.rate(),
                scored_rate_hz=self._scored_rate.rate(),
                latency_p50_s=self._model_latency.percentile(50),
                latency_p95_s=self._model_latency.percentile(95),
                overhead_p50_s=self._overhead.percentile(50),
                overhead_p95_s=self._overhead.percentile(95),
                frames_in=self._frames_in,
                rewards_out=self._rewards_out,
                dropped_frames=self._dropped,
                unpaired_frames=self._unpaired,
                unparsed_answers=self._unparsed,
                conversion_errors=conversion,
                engine_errors=engine,
                engine_error_age_s=time.monotonic() - self._last_engine_error_s,
                last_error=f"{faults.last_kind}: {faults.last_message}" if faults.last_kind else "",
            )
        stamp = self.get_clock().now().to_msg()
        array = build_diagnostics(self.get_name(), health, streams, self._param("camera_timeout_s"), stamp)
        if getattr(self._engine, "base_only", False):
            _flag_base_only(array.status[0])
        self._diagnostics_pub.publish(array)

    def _state_label(self) -> str:
        # The state machine's label ("unconfigured", "inactive", "active", ...).
        return self._state_machine.current_state[1]

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
        reason = self._check_task(task, self._param("max_task_chars"))
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
            self._task = task
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
                episode = max(episode, stream.tracker.episode_id)
        if self._pairer is not None:
            with self._pair_lock:
                self._pairer.reset()
        self.get_logger().info(f"episode {episode}: task {self._task[:80]!r}")
        return episode


BASE_ONLY = "base model only, not a reward model"


def _flag_base_only(status: DiagnosticStatus) -> None:
    """No adapters loaded (model.adapters.* empty): the model status says so, at WARN or worse."""
    status.level = max(status.level, DiagnosticStatus.WARN)
    status.message = f"{BASE_ONLY} (no adapters configured); {status.message}"
    status.values.append(KeyValue(key="adapters", value=f"none: {BASE_ONLY}"))


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
