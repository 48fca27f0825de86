"""reward_node's outputs: the ``~/reward``, ``~/completed`` and ``~/annotated`` publishers, the
RewardSignal built from a tracker's RewardResult, the annotated picture, and the /diagnostics snapshot.

``RewardOutputsMixin`` holds the publishing side of ``RewardNode``: it creates the lifecycle publishers
at configure and destroys them at cleanup, publishes one RewardSignal (plus completion flag and, while
someone watches, the annotated frame) per answered frame, and assembles ``ModelHealth`` / ``StreamHealth``
for ``ros.diagnostics`` from the node's counters. Not where frames come from (reward_intake) or are
scored (the worker in reward_node), and not the diagnostics layout itself (ros.diagnostics).
"""

from __future__ import annotations

import math
import time

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import Image
from std_msgs.msg import Bool, Header

from lrm_interfaces.msg import RewardSignal
from lrm_reward.core.annotation import RewardOverlay, annotate_frame
from lrm_reward.core.types import RewardResult
from lrm_reward.ros.diagnostics import ModelHealth, StreamHealth, build_diagnostics
from lrm_reward.ros.image_conversion import rgb_to_image_msg
from lrm_reward.ros.reward_intake import Stream, s_to_stamp

BASE_ONLY = "base model only, not a reward model"


def _flag_base_only(status: DiagnosticStatus) -> None:
    """No adapters loaded (model.adapters.* empty): the model status says so, at WARN or worse."""
    status.level = max(status.level, DiagnosticStatus.WARN)
    status.message = f"{BASE_ONLY} (no adapters configured); {status.message}"
    status.values.append(KeyValue(key="adapters", value=f"none: {BASE_ONLY}"))


def _flag_server_health(status: DiagnosticStatus, engine) -> None:
    """A served backend (model.backend vllm): whether its servers answer, and its faults by kind. A server
    that does not answer is an ERROR: no frame gets a new score until it is back (frames are held)."""
    try:
        ok, line = engine.health()
    except Exception as exc:  # diagnostics must not fail on a backend's report
        ok, line = False, f"server health unknown: {type(exc).__name__}: {exc}"
    if not ok:
        status.level = DiagnosticStatus.ERROR
        status.message = f"{line}; {status.message}"
    status.values.append(KeyValue(key="server", value=line))
    stats = getattr(engine, "stats", None)
    for kind, count in sorted((getattr(stats, "server_faults", None) or {}).items()):
        status.values.append(KeyValue(key=f"server faults {kind}", value=str(count)))
    if stats is not None and hasattr(stats, "reconnects"):
        status.values.append(KeyValue(key="server reconnects", value=str(stats.reconnects)))
        status.values.append(KeyValue(key="server failed fast", value=str(stats.failed_fast)))


class RewardOutputsMixin:
    """Outputs of ``RewardNode``: uses its parameters, counters, engine and model id, streams and task."""

    def _create_output_publishers(self) -> None:
        """The lifecycle publishers (at configure): they publish only while the node is active."""
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

    def _destroy_output_publishers(self) -> None:
        for pub in (self._reward_pub, self._completed_pub, self._annotated_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._reward_pub = self._completed_pub = self._annotated_pub = None

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
        msg.student = result.student
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
        if callable(getattr(self._engine, "health", None)):
            _flag_server_health(array.status[0], self._engine)
        array.status.append(self._judging.diagnostic_status())
        student = self._student_diagnostic_status()
        if student is not None:
            array.status.append(student)
        self._diagnostics_pub.publish(array)
