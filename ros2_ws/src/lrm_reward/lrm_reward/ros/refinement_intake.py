"""refinement_node's intake: the subscriptions, and the callbacks that count each message, convert it
and append it to the EpisodeRecorder (no encoding, no disk writes beyond the raw spool).

``StreamStats`` follows one subscribed stream's transport: messages received per episode and in total,
messages lost before the callbacks took them (DDS sequence numbers), how far the node lagged, and when
its queue is drained at a stop. ``RecordingIntakeMixin`` holds the callbacks of ``RefinementNode``.
Not the episode control (start / stop / auto-stop: refinement_node) and not the recording itself
(lrm_reward.refinement.recorder).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
from rclpy.callback_groups import CallbackGroup
from sensor_msgs.msg import CompressedImage, Image, JointState
from std_msgs.msg import Float64MultiArray

from lrm_interfaces.msg import RewardSignal
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb
from lrm_reward.ros.refinement_params import RefinementSettings

DRAIN_QUIET_S = 0.1  # a stream with no message for this long has nothing queued
DRAIN_FRESH_S = 0.05  # a message this close to the stream's best transit time is not from a backlog


class StreamStats:
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


class RecordingIntakeMixin:
    """Messages in, for ``RefinementNode``: uses its recorder, streams, settings and counters."""

    def _subscribe_inputs(self, settings: RefinementSettings, own_group: Callable[[], CallbackGroup]) -> None:
        """Subscribe to every recorded topic, each in a callback group of its own (see RefinementNode)."""
        image_type = CompressedImage if settings.compressed else Image
        self._subs = []
        for cam, topic in zip(settings.cameras, settings.image_topics, strict=True):
            self._subs.append(
                self.create_subscription(
                    image_type,
                    topic,
                    lambda msg, info, cam=cam: self._on_image(cam, msg, info),
                    settings.image_qos,
                    callback_group=own_group(),
                )
            )
        self._subs.append(
            self.create_subscription(
                JointState, "joint_states", self._on_state, settings.queue_depth, callback_group=own_group()
            )
        )
        action_msg = JointState if settings.action_type == "joint_state" else Float64MultiArray
        self._subs.append(
            self.create_subscription(
                action_msg, "action", self._on_action, settings.queue_depth, callback_group=own_group()
            )
        )
        self._subs.append(
            self.create_subscription(
                RewardSignal, "reward", self._on_reward, settings.queue_depth, callback_group=own_group()
            )
        )
        if settings.environment_state_topic:
            env_msg = JointState if settings.environment_state_type == "joint_state" else Float64MultiArray
            self._subs.append(
                self.create_subscription(
                    env_msg,
                    settings.environment_state_topic,
                    self._on_environment_state,
                    settings.queue_depth,
                    callback_group=own_group(),
                )
            )

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
            stats = self.streams[stream] = StreamStats()
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
