"""Where the episodes of a bag begin and end: one per bag, split at silences, or split at marker messages.

What it is for: the importer reads a bag once for its small topics (markers, task strings) or its
receive times, plans the episodes here as windows of bag (receive) time, then reads each window again
and feeds it to the recorder. Windows are in bag time because that is how a bag is ordered and read;
inside a window the recorder resamples by stamp, as it does live.

Markers: any message type marks the time; some also say more about the episode they mark --
std_msgs/String holding a JSON object (sim_robot_node's ``~/episode_result``: task, success,
policy_version, notes), std_msgs/Bool (success), and service events recorded with
``ros2 bag record --include-services`` (``<service>/_service_event``; one call is counted once however
many of its request/response events were recorded; a request's task, notes and policy_version fields are
used, e.g. refinement_node's ~/start_episode).

What it is not: no bag reading, no ROS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class MarkerEvent:
    time_ns: int  # bag (receive) time
    task: str = ""
    outcome: str = ""  # "success" | "failure" | "" (not said)
    policy_version: str = ""
    notes: str = ""


@dataclass
class EpisodeWindow:
    """Bag time [start_ns, stop_ns) and what is known about the episode from the markers."""

    start_ns: int
    stop_ns: int
    task: str = ""
    outcome: str = "unknown"
    policy_version: str = ""
    notes: str = ""

    @property
    def duration_s(self) -> float:
        return (self.stop_ns - self.start_ns) * 1e-9


@dataclass
class WindowPlan:
    windows: list[EpisodeWindow]
    notes: list[str] = field(default_factory=list)  # data left out (before the first / after the last marker)


def one_per_bag(start_ns: int, end_ns: int) -> WindowPlan:
    """The whole bag (end_ns: its last message's time) is one episode."""
    return WindowPlan([EpisodeWindow(start_ns, end_ns + 1)])


def split_at_gaps(times_ns: np.ndarray, gap_s: float) -> WindowPlan:
    """A silence longer than gap_s between consecutive messages (of every mapped stream together)
    ends an episode. times_ns: receive times, sorted."""
    times = np.asarray(times_ns, dtype=np.int64)
    if times.size == 0:
        return WindowPlan([])
    cuts = np.nonzero(np.diff(times) > int(gap_s * 1e9))[0]
    starts = np.concatenate([[0], cuts + 1])
    ends = np.concatenate([cuts, [times.size - 1]])
    return WindowPlan(
        [EpisodeWindow(int(times[a]), int(times[b]) + 1) for a, b in zip(starts, ends, strict=True)]
    )


def split_at_markers(markers: list[MarkerEvent], start_ns: int, end_ns: int, at: str) -> WindowPlan:
    """at="start": each marker starts an episode that lasts until the next marker (the last until the end
    of the bag); at="end": each marker ends the episode that began at the previous marker (the first at
    the start of the bag). What lies before the first start marker or after the last end marker is not an
    episode (said in `notes`)."""
    if at not in ("start", "end"):
        raise ValueError(f"at must be 'start' or 'end', not {at!r}")
    markers = sorted(markers, key=lambda m: m.time_ns)
    if not markers:
        return WindowPlan([], [f"no marker in {(end_ns - start_ns) * 1e-9:.1f} s of bag: no episode"])
    plan = WindowPlan([])
    if at == "start":
        if markers[0].time_ns > start_ns:
            plan.notes.append(
                f"{(markers[0].time_ns - start_ns) * 1e-9:.2f} s before the first marker left out"
            )
        bounds = [m.time_ns for m in markers[1:]] + [end_ns + 1]
        for marker, stop in zip(markers, bounds, strict=True):
            plan.windows.append(_window(marker, marker.time_ns, stop))
    else:
        begin = start_ns
        for marker in markers:
            plan.windows.append(_window(marker, begin, marker.time_ns))
            begin = marker.time_ns
        if end_ns > markers[-1].time_ns:
            plan.notes.append(f"{(end_ns - markers[-1].time_ns) * 1e-9:.2f} s after the last marker left out")
    return plan


def _window(marker: MarkerEvent, start_ns: int, stop_ns: int) -> EpisodeWindow:
    return EpisodeWindow(
        start_ns,
        stop_ns,
        task=marker.task,
        outcome=marker.outcome or "unknown",
        policy_version=marker.policy_version,
        notes=marker.notes,
    )


def task_in_effect(tasks: list[tuple[int, str]], window: EpisodeWindow) -> str:
    """The task of a window from a task topic: the latest task message at or before the window's start,
    else the first one inside it, else ""."""
    before = [text for t, text in tasks if t <= window.start_ns and text]
    if before:
        return before[-1]
    inside = [text for t, text in tasks if window.start_ns < t < window.stop_ns and text]
    return inside[0] if inside else ""


class MarkerInterpreter:
    """Turns marker messages (any type; fields read by name) into MarkerEvents, one per service call."""

    def __init__(self) -> None:
        self._calls: set[tuple] = set()

    def event(self, time_ns: int, msg: Any) -> MarkerEvent | None:
        """None for a further event of a service call already counted."""
        info = getattr(msg, "info", None)
        if info is not None and hasattr(msg, "request") and hasattr(info, "sequence_number"):
            key = (
                bytes(np.asarray(getattr(info, "client_gid", b""), dtype=np.uint8)),
                int(info.sequence_number),
            )
            if key in self._calls:
                return None
            self._calls.add(key)
            event = MarkerEvent(time_ns)
            request = list(getattr(msg, "request", []) or [])
            if request:
                _fill(event, {k: getattr(request[0], k, None) for k in ("task", "notes", "policy_version")})
            return event
        event = MarkerEvent(time_ns)
        data = getattr(msg, "data", None)
        if isinstance(data, bool | np.bool_):
            event.outcome = "success" if data else "failure"
        elif isinstance(data, str):
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                _fill(event, parsed)
        return event


def _fill(event: MarkerEvent, fields_: dict) -> None:
    if "notes" not in fields_ and "note" in fields_:  # sim_robot_node's episode_result says "note"
        fields_ = {**fields_, "notes": fields_["note"]}
    for key in ("task", "notes", "policy_version"):
        value = fields_.get(key)
        if isinstance(value, str):
            setattr(event, key, value.strip())
    success = fields_.get("success")
    outcome = fields_.get("outcome")
    if isinstance(success, bool):
        event.outcome = "success" if success else "failure"
    elif isinstance(outcome, str) and outcome in ("success", "failure"):
        event.outcome = outcome
