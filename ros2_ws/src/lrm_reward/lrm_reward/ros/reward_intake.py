"""reward_node's frames in: camera subscriptions, message -> RGB conversion, pairing of several cameras,
and the hand-over to the worker through the latest-wins slots.

``Stream`` and ``PendingFrame`` are what travels from a camera callback to the worker. ``FrameIntakeMixin``
holds the callback side of ``RewardNode`` (the frame rule in reward_node's docstring): a held frame is
answered at once, a due frame goes into its stream's slot, and a due frame replaced there before the
worker took it is answered as dropped. Not the model call (the worker in reward_node) and not message
building (reward_publishing).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from builtin_interfaces.msg import Time
from rclpy.qos import qos_profile_sensor_data
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from lrm_reward.core.images import hstack_rgb
from lrm_reward.core.serving_stats import RateWindow
from lrm_reward.core.tracking import EpisodeTracker, FramePlan
from lrm_reward.core.types import RewardResult
from lrm_reward.ros.image_conversion import ImageConversionError, compressed_msg_to_rgb, image_msg_to_rgb

SCORED_STAMPS_KEPT = 16  # per stream: exact stamps of recently queried frames, for scored_stamp


def stamp_to_s(stamp: Time) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def s_to_stamp(seconds: float) -> Time:
    total_ns = round(seconds * 1e9)
    return Time(sec=total_ns // 1_000_000_000, nanosec=total_ns % 1_000_000_000)


@dataclass
class Stream:
    """One reward stream: a camera (or the joined cameras) with its tracker and counters."""

    name: str
    topics: list[str]
    compressed: list[bool]
    tracker: EpisodeTracker | None = None
    between: Any = None  # student.between.StudentBetween when a student fills the frames between queries
    between_checked: bool = True  # False until the first frame has checked the student's frame size
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


class FrameIntakeMixin:
    """Frames in, for ``RewardNode``: uses its streams, pairer, slots, counters and ``_publish``."""

    def _subscribe_cameras(self) -> None:
        """One subscription per camera (sensor-data QoS, overridable); frames go to ``_on_frame``."""
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
            self._student_first_frame(stream, rgb)
            if plan.queries:
                self._remember_scored_stamp(stream, stamp_s, header.stamp)
            else:
                held = self._student_fill(stream, tracker.update(plan, []), rgb, stamp_s)
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

    def _publish_dropped(self, item: PendingFrame) -> None:
        """A due frame the model never got (replaced, or the episode or node stopped): answered as held."""
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
