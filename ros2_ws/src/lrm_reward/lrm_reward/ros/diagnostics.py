"""The reward node's health as diagnostic_msgs/DiagnosticArray (no diagnostic_updater wheel here).

Takes plain snapshots of the node's counters and turns them into one status for the reward model and
one per camera stream, with the rule for a camera that stopped: WARN once no frame came for
``camera_timeout_s``, ERROR after three times that; the model turns WARN for a minute after an engine
error and ERROR when it failed to load. Not where the counters live (see
``lrm_reward.core.serving_stats``) and not a publisher: the node publishes what this builds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue

OK = DiagnosticStatus.OK
WARN = DiagnosticStatus.WARN
ERROR = DiagnosticStatus.ERROR

# A camera silent for this many camera_timeout_s is an error, not just a warning.
CAMERA_ERROR_FACTOR = 3.0
# The model status stays WARN this long after an engine error (exception, out-of-memory).
ENGINE_ERROR_WARN_S = 60.0


@dataclass
class StreamHealth:
    name: str  # resolved topic name (or the fused pair's name)
    frames_in: int
    silent_s: (
        float | None
    )  # seconds since its last frame (or since activation when none came); None: inactive
    rate_hz: float


@dataclass
class ModelHealth:
    lifecycle_state: str  # "unconfigured", "inactive", "active", ...
    loaded: bool
    model_id: str
    load_error: str
    task: str
    episode_id: int
    query_rate_hz: float  # model queries per second
    scored_rate_hz: float  # frames scored per second
    latency_p50_s: float | None  # model wall time per batch
    latency_p95_s: float | None
    overhead_p50_s: float | None  # frame in -> reward out, minus model time
    overhead_p95_s: float | None
    frames_in: int
    rewards_out: int
    dropped_frames: int
    unpaired_frames: int
    unparsed_answers: int
    conversion_errors: dict[str, int] = field(default_factory=dict)
    engine_errors: dict[str, int] = field(default_factory=dict)
    engine_error_age_s: float = math.inf  # seconds since the last engine error
    last_error: str = ""


def camera_level(silent_s: float | None, timeout_s: float) -> tuple[int, str]:
    """Level and message for a camera that has been silent for silent_s seconds."""
    if silent_s is None:
        return OK, "not subscribed (node inactive)"
    if silent_s > CAMERA_ERROR_FACTOR * timeout_s:
        return ERROR, f"no frame for {silent_s:.1f} s: camera stopped, no rewards are published for it"
    if silent_s > timeout_s:
        return WARN, f"no frame for {silent_s:.1f} s (camera_timeout_s {timeout_s:g})"
    return OK, "streaming"


def model_level(health: ModelHealth) -> tuple[int, str]:
    if health.load_error:
        return ERROR, f"model failed to load: {health.load_error}"
    if health.lifecycle_state != "active":
        return OK, f"{health.lifecycle_state} (lifecycle)"
    if not health.loaded:
        return ERROR, "active but no model loaded"
    if not health.task:
        return WARN, "no task: call ~/set_task or set the task parameter"
    if health.engine_error_age_s < ENGINE_ERROR_WARN_S:
        return (
            WARN,
            f"engine errors in the last {ENGINE_ERROR_WARN_S:g} s: {_fmt_counts(health.engine_errors)}",
        )
    return OK, "scoring"


def _fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.2f}"


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items())) or "none"


def _kv(key: str, value: object) -> KeyValue:
    return KeyValue(key=key, value=str(value))


def build_diagnostics(
    node_name: str, health: ModelHealth, streams: list[StreamHealth], camera_timeout_s: float, stamp
) -> DiagnosticArray:
    """One DiagnosticArray: the model status first, then one status per stream."""
    level, message = model_level(health)
    model = DiagnosticStatus(level=level, name=f"{node_name}: reward model", message=message)
    model.hardware_id = health.model_id
    model.values = [
        _kv("lifecycle state", health.lifecycle_state),
        _kv("model loaded", health.loaded),
        _kv("model id", health.model_id),
        _kv("task", health.task),
        _kv("episode id", health.episode_id),
        _kv("query rate [1/s]", f"{health.query_rate_hz:.2f}"),
        _kv("scored frames rate [1/s]", f"{health.scored_rate_hz:.2f}"),
        _kv("model latency p50 [ms]", _fmt_ms(health.latency_p50_s)),
        _kv("model latency p95 [ms]", _fmt_ms(health.latency_p95_s)),
        _kv("ros overhead p50 [ms]", _fmt_ms(health.overhead_p50_s)),
        _kv("ros overhead p95 [ms]", _fmt_ms(health.overhead_p95_s)),
        _kv("frames in", health.frames_in),
        _kv("rewards out", health.rewards_out),
        _kv("dropped frames", health.dropped_frames),
        _kv("unpaired frames", health.unpaired_frames),
        _kv("unparsed answers", health.unparsed_answers),
        _kv("conversion errors", _fmt_counts(health.conversion_errors)),
        _kv("engine errors", _fmt_counts(health.engine_errors)),
        _kv("last error", health.last_error),
    ]
    model.values += [_kv(f"conversion errors: {k}", n) for k, n in sorted(health.conversion_errors.items())]
    model.values += [_kv(f"engine errors: {k}", n) for k, n in sorted(health.engine_errors.items())]
    statuses = [model]
    for stream in streams:
        level, message = camera_level(stream.silent_s, camera_timeout_s)
        status = DiagnosticStatus(level=level, name=f"{node_name}: camera {stream.name}", message=message)
        status.hardware_id = stream.name
        status.values = [
            _kv("frames in", stream.frames_in),
            _kv("rate [Hz]", f"{stream.rate_hz:.2f}"),
            _kv("silent for [s]", "n/a" if stream.silent_s is None else f"{stream.silent_s:.2f}"),
        ]
        statuses.append(status)
    array = DiagnosticArray(status=statuses)
    array.header.stamp = stamp
    return array
