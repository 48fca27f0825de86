"""reward_node's parameters: the declared table (name, default, description), their validation, and the
core configs (TrackerConfig, EngineConfig) built from their values.

Plain functions over parameter values, so the rules hold the same for a configure, a ``ros2 param set``
and a test; the node declares the table once and calls these from its parameter callbacks. Not where
parameters are applied (a new episode, the next configure: ``RewardNode``) and no rclpy here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from rcl_interfaces.msg import ParameterDescriptor

from lrm_reward.core.compiled_suffix import COMPILE_MODES
from lrm_reward.core.tracking import TrackerConfig
from lrm_reward.core.types import Modality, Readout

MULTI_CAMERA_MODES = ("per_camera", "paired")
READOUTS = tuple(r.value for r in Readout)
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODALITY_NAMES = tuple(m.value for m in Modality)

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
        _describe(
            "engine backend: 'local' (in-process transformers) | 'vllm' (vLLM servers, docs/vllm.md)",
            read_only=True,
        ),
    ),
    "model.server_url": (
        "",
        _describe("backend vllm: server URL(s), comma-separated, from lrm-vllm-server", read_only=True),
    ),
    "model.allow_remote": (
        False,
        _describe("backend vllm: allow a server_url that is not on this machine (loopback)", read_only=True),
    ),
    "model.request_timeout_s": (
        10.0,
        _describe(
            "backend vllm: seconds one scoring call may take, then its frames count as failed",
            read_only=True,
        ),
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
        _describe(
            "between queries: 'hold' repeats the last values, 'zero' zeros the reward, 'student' fills them "
            "with a distilled student (student.path; hold where there is none)"
        ),
    ),
    "student.path": (
        "",
        _describe(
            "between: student: lrm-distill's output -- a version folder, a student folder (its newest "
            "version) or the adapters folder holding student/"
        ),
    ),
    "student.camera": (
        "",
        _describe("the camera name the student must have been made for (e.g. 'front'); '' = not checked"),
    ),
    "student.anchor": (
        "raw",
        _describe("'raw': the student's own values between queries; 'offset': continued from the last query"),
    ),
    "student.progress_warn": (
        0.2,
        _describe("mean |student - reward model| progress on queried frames above this -> WARN (drift)"),
    ),
    "student.completion_warn": (
        0.34,
        _describe("fraction of queried frames where student and reward model disagree on done -> WARN"),
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
    "judge.data_root": (
        "~/lrm_data",
        _describe("~/judge_episodes judges only datasets inside this folder (refinement_node's data_root)"),
    ),
    "judge.queries_per_call": (
        4,
        _describe(
            "queries per model call while judging: live scoring waits for at most one such call; "
            "larger = faster judging, slower live answers meanwhile"
        ),
    ),
    "judge.max_yield_s": (
        1.0,
        _describe(
            "[s] a judge call lets waiting live calls go first for at most this long (so busy cameras slow "
            "judging down, never stop it); applied at configure"
        ),
    ),
}


def tracker_config_from(values: Mapping[str, Any]) -> TrackerConfig:
    """TrackerConfig from the values of TRACKER_PARAMETERS; raises ValueError when invalid."""
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


def check_task(task: str, max_chars: int) -> str | None:
    """Why task is not acceptable (too long), or None."""
    if len(task) > max_chars:
        return f"task is {len(task)} characters, more than max_task_chars={max_chars}"
    return None  # empty is allowed here: it means "no task yet"; ~/set_task rejects it


def check_parameter(
    name: str, value: Any, pending: Mapping[str, Any], current: Callable[[str], Any], task: str
) -> str | None:
    """Why value is not acceptable for parameter name, or None.

    pending: the other values set together with it; current(name): a parameter's present value;
    task: the task the node scores now (once set, it may not be emptied).
    """
    if name == "task":
        if not value.strip() and task.strip():
            return "task must not be empty once set (the node keeps scoring the current task)"
        return check_task(value, pending.get("max_task_chars", current("max_task_chars")))
    if name == "image_topics":
        if not value or any(not str(t).strip() for t in value):
            return "image_topics must list at least one non-empty topic name"
        if len(set(value)) != len(value):
            return f"image_topics must not repeat: {list(value)}"
    if name == "compressed":
        topics = pending.get("image_topics", current("image_topics"))
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
    if name in ("camera_timeout_s", "model.request_timeout_s") and not (math.isfinite(value) and value > 0):
        return f"{name} must be a finite number > 0, got {value}"
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
    if name == "student.anchor" and value not in ("raw", "offset"):
        return f"student.anchor must be 'raw' or 'offset', got {value!r}"
    if name in ("student.progress_warn", "student.completion_warn") and not (
        math.isfinite(value) and 0 < value <= 1
    ):
        return f"{name} must be in (0, 1], got {value}"
    if name == "judge.data_root" and not str(value).strip():
        return "judge.data_root must name a folder (the data root of the recordings to judge)"
    if name == "judge.queries_per_call" and value < 1:
        return f"judge.queries_per_call must be >= 1, got {value}"
    if name == "judge.max_yield_s" and not (math.isfinite(value) and value >= 0):
        return f"judge.max_yield_s must be a finite number >= 0, got {value}"
    return None


def engine_config_from(current: Callable[[str], Any]):
    """The EngineConfig the model.* parameters (and max_task_chars) describe; current(name) reads one."""
    from lrm_reward.core.engine import EngineConfig

    adapters = {m: current(f"model.adapters.{m}") for m in MODALITY_NAMES}
    adapters = {m: path for m, path in adapters.items() if path}
    return EngineConfig(
        base_model=current("model.base"),
        adapters=adapters or None,
        readout=Readout(current("model.readout")),
        device=current("model.device"),
        dtype=current("model.dtype"),
        attn_implementation=current("model.attn_implementation") or None,
        max_batch_size=current("model.max_batch_size"),
        fast_path=current("model.fast_path"),
        compile=current("model.compile"),
        local_files_only=current("model.local_files_only"),
        backend=current("model.backend"),
        server_url=current("model.server_url") or None,
        allow_remote=current("model.allow_remote"),
        request_timeout_s=current("model.request_timeout_s"),
        processor=current("model.processor") or None,
        max_task_chars=current("max_task_chars"),
    )
