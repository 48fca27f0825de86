"""reward_node with real ROS 2 in two processes: the installed executable (tiny LRM on the CPU) answers a
synthetic pick-and-place clip published from this test process.

Checked here: one RewardSignal per frame with the frame's stamp, the held / queried / scored_stamp rules,
episode control (~/set_task, ~/reset_episode), parameter validation, lifecycle transitions through the
lifecycle_msgs services, bad input (unknown encoding, zero size, truncated data, bad step, corrupt JPEG,
empty or huge task, a camera that stops, engine exceptions and out-of-memory) with the node answering
afterwards, and a clean exit on SIGINT.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time

import cv2
import numpy as np
import pytest
import yaml
from node_process import NodeProcess

pytestmark = pytest.mark.ros

rclpy = pytest.importorskip("rclpy")
from builtin_interfaces.msg import Time  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from lifecycle_msgs.msg import State, Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import GetParameters, SetParameters  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image  # noqa: E402
from std_msgs.msg import Bool  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from lrm_interfaces.msg import RewardSignal  # noqa: E402
from lrm_interfaces.srv import SetTask  # noqa: E402

NODE = "/reward_node"
RAW_TOPIC = "/camera/image"
JPEG_TOPIC = "/wrist/image/compressed"
TASK = "put the red block on the green target"
INTERVAL = 4  # query every 4th frame: a 36-frame clip has 9 due frames
CLIP_FRAMES = 36
FPS = 30
T0_NS = 1_000 * 1_000_000_000  # clip stamps start at t = 1000 s
RELIABLE = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
SCORE_TIMEOUT_S = 90.0  # generous: the CPU is shared with other test jobs


# -- the synthetic clip -------------------------------------------------------------------------------


def pick_and_place_frame(t: float, width: int = 64, height: int = 48) -> np.ndarray:
    """A red block carried by a dark gripper from the left towards a green target; t in [0, 1]."""
    frame = np.full((height, width, 3), (150, 140, 120), np.uint8)  # table
    frame[30:40, 48:60] = (40, 170, 60)  # target
    x = round(4 + t * (50 - 4))
    lift = round(8 * math.sin(math.pi * t))  # lifted in the middle of the move
    y = 30 - lift
    frame[y : y + 8, x : x + 8] = (200, 30, 30)  # block
    frame[max(0, y - 10) : y, x + 2 : x + 6] = (30, 30, 30)  # gripper
    return frame


def stamp(ns: int) -> Time:
    return Time(sec=ns // 1_000_000_000, nanosec=ns % 1_000_000_000)


def key(t: Time) -> tuple[int, int]:
    return (t.sec, t.nanosec)


def image_msg(rgb: np.ndarray, ns: int) -> Image:
    msg = Image(height=rgb.shape[0], width=rgb.shape[1], encoding="rgb8", step=rgb.shape[1] * 3)
    msg.header.stamp = stamp(ns)
    msg.header.frame_id = "camera"
    msg.data = rgb.tobytes()
    return msg


def jpeg_msg(rgb: np.ndarray, ns: int) -> CompressedImage:
    ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]))
    assert ok
    msg = CompressedImage(format="jpeg")
    msg.header.stamp = stamp(ns)
    msg.data = encoded.tobytes()
    return msg


# -- talking to the node ------------------------------------------------------------------------------


class Probe:
    """The test side: publishers for the cameras, collectors for the node's outputs, service clients."""

    def __init__(self, node, process) -> None:
        self.node = node
        self.process = process
        self.raw = node.create_publisher(Image, RAW_TOPIC, RELIABLE)
        self.jpeg = node.create_publisher(CompressedImage, JPEG_TOPIC, RELIABLE)
        self.rewards: list[RewardSignal] = []
        self.completed: list[Bool] = []
        self.diagnostics: list[DiagnosticArray] = []
        self.annotated: list[Image] = []
        self.annotated_sub = node.create_subscription(
            Image, f"{NODE}/annotated", self.annotated.append, RELIABLE
        )
        self.reward_sub = node.create_subscription(
            RewardSignal, f"{NODE}/reward", self.rewards.append, RELIABLE
        )
        node.create_subscription(Bool, f"{NODE}/completed", self.completed.append, RELIABLE)
        node.create_subscription(DiagnosticArray, "/diagnostics", self.diagnostics.append, 10)
        self.set_task_client = node.create_client(SetTask, f"{NODE}/set_task")
        self.reset_client = node.create_client(Trigger, f"{NODE}/reset_episode")
        self.set_params_client = node.create_client(SetParameters, f"{NODE}/set_parameters")
        self.get_params_client = node.create_client(GetParameters, f"{NODE}/get_parameters")
        self.change_state_client = node.create_client(ChangeState, f"{NODE}/change_state")
        self.get_state_client = node.create_client(GetState, f"{NODE}/get_state")

    def spin_until(self, predicate, timeout: float = 30.0) -> bool:
        """Spin the test node until predicate() holds; False on timeout or when the node process died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.node.executor_for_test.spin_once(timeout_sec=0.02)
            if predicate():
                return True
            if not self.process.alive():
                return False
        return predicate()

    def call(self, client, request, timeout: float = 60.0):
        assert self.spin_until(client.service_is_ready, timeout), f"{client.srv_name} never came up"
        future = client.call_async(request)
        assert self.spin_until(future.done, timeout), f"{client.srv_name} did not answer"
        return future.result()

    def wait_connected(self, publisher, timeout: float = 60.0) -> None:
        ok = self.spin_until(
            lambda: publisher.get_subscription_count() > 0 and self.reward_sub.get_publisher_count() > 0,
            timeout,
        )
        assert ok, f"node never subscribed to {publisher.topic_name}:\n{self.process.log()[-3000:]}"

    def publish_frames(self, publisher, msgs) -> None:
        """Publish at about the clip's frame rate, spinning meanwhile so rewards are taken as they come."""
        for msg in msgs:
            publisher.publish(msg)
            self.spin_until(lambda: False, 1.0 / FPS)

    def rewards_for(self, stamps_ns) -> dict[tuple[int, int], list[RewardSignal]]:
        wanted = {key(stamp(ns)) for ns in stamps_ns}
        found: dict[tuple[int, int], list[RewardSignal]] = {k: [] for k in wanted}
        for msg in self.rewards:
            if key(msg.header.stamp) in wanted:
                found[key(msg.header.stamp)].append(msg)
        return found

    def wait_rewards(self, stamps_ns, timeout: float = SCORE_TIMEOUT_S) -> list[RewardSignal]:
        """Wait until every stamp has a reward; return them in stamp order (exactly one each)."""
        ok = self.spin_until(lambda: all(self.rewards_for(stamps_ns).values()), timeout)
        found = self.rewards_for(stamps_ns)
        missing = [k for k, v in found.items() if not v]
        assert ok, f"no reward for {len(missing)} of {len(found)} frames:\n{self.process.log()[-3000:]}"
        self.spin_until(lambda: False, 0.3)  # a duplicate would arrive now
        found = self.rewards_for(stamps_ns)
        duplicates = {k: len(v) for k, v in found.items() if len(v) != 1}
        assert not duplicates, f"frames with more than one reward: {duplicates}"
        return [found[k][0] for k in sorted(found)]

    def set_task(self, task: str = "", reset_only: bool = False) -> SetTask.Response:
        return self.call(self.set_task_client, SetTask.Request(task=task, reset_only=reset_only))

    def set_params(self, **values) -> list:
        request = SetParameters.Request(
            parameters=[ParameterMsg(name=n, value=to_value(v)) for n, v in values.items()]
        )
        return self.call(self.set_params_client, request).results

    def get_param(self, name: str):
        value = self.call(self.get_params_client, GetParameters.Request(names=[name])).values[0]
        return {
            ParameterType.PARAMETER_INTEGER: value.integer_value,
            ParameterType.PARAMETER_DOUBLE: value.double_value,
            ParameterType.PARAMETER_STRING: value.string_value,
            ParameterType.PARAMETER_BOOL: value.bool_value,
        }.get(value.type)

    def lifecycle(self, transition_id: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return self.call(self.change_state_client, request).success

    def state(self) -> int:
        return self.call(self.get_state_client, GetState.Request()).current_state.id

    def fresh_diagnostics(
        self, predicate=lambda _: True, timeout: float = 15.0
    ) -> dict[str, DiagnosticStatus]:
        """Statuses by name from the first /diagnostics message that arrives from now on and satisfies
        predicate(statuses)."""
        start = len(self.diagnostics)
        result: dict[str, DiagnosticStatus] = {}

        def arrived() -> bool:
            for msg in self.diagnostics[start:]:
                statuses = {s.name: s for s in msg.status if s.name.startswith("reward_node")}
                if statuses and predicate(statuses):
                    result.update(statuses)
                    return True
            return False

        assert self.spin_until(arrived, timeout), "no matching /diagnostics message"
        return result


def to_value(value) -> ParameterValue:
    if isinstance(value, list) and all(isinstance(v, bool) for v in value):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL_ARRAY, bool_array_value=value)
    if isinstance(value, list):
        return ParameterValue(type=ParameterType.PARAMETER_STRING_ARRAY, string_array_value=value)
    if isinstance(value, bool):
        return ParameterValue(type=ParameterType.PARAMETER_BOOL, bool_value=value)
    if isinstance(value, int):
        return ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=value)
    if isinstance(value, float):
        return ParameterValue(type=ParameterType.PARAMETER_DOUBLE, double_value=value)
    return ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value)


def kv(status: DiagnosticStatus) -> dict[str, str]:
    return {v.key: v.value for v in status.values}


MODEL_STATUS = "reward_node: reward model"


def camera_status(topic: str) -> str:
    return f"reward_node: camera {topic}"


# -- starting the node --------------------------------------------------------------------------------


def node_params(tiny_lrm, **overrides) -> dict:
    params = {
        "task": TASK,
        "image_topics": ["image"],
        "model": {
            "base": str(tiny_lrm.base),
            "adapters": {name: str(path) for name, path in tiny_lrm.adapters.items()},
            "device": "cpu",
            "dtype": "float32",
            "readout": "logits",
        },
        "modalities": ["progress", "contrastive", "completion"],
        "interval_frames": INTERVAL,
        "camera_timeout_s": 1.0,
        # Reliable, deep subscriptions: this test checks that no received frame goes unanswered, so
        # DDS must not drop any (the sensor-data default may, by design).
        "qos_overrides": {
            RAW_TOPIC: {"subscription": {"reliability": "reliable", "depth": 200, "history": "keep_last"}},
            JPEG_TOPIC: {"subscription": {"reliability": "reliable", "depth": 200, "history": "keep_last"}},
            f"{NODE}/annotated": {
                "publisher": {"reliability": "reliable", "depth": 200, "history": "keep_last"}
            },
        },
    }
    params.update(overrides)
    return params


REMAP = ["-r", f"image:={RAW_TOPIC}"]


def start_reward_node(start_node, tiny_lrm, **overrides):
    return start_node("lrm_reward", "reward_node", params=node_params(tiny_lrm, **overrides), args=REMAP)


# -- the tests ----------------------------------------------------------------------------------------


def test_one_reward_per_frame_episodes_and_parameters(start_node, ros_node, tiny_lrm):
    process = start_reward_node(start_node, tiny_lrm)
    probe = Probe(ros_node, process)
    probe.wait_connected(probe.raw)
    # The annotated image is only drawn while someone listens: make sure the node sees this subscriber.
    assert probe.spin_until(lambda: probe.annotated_sub.get_publisher_count() > 0, 30.0)

    clip_ns = [T0_NS + i * 1_000_000_000 // FPS for i in range(CLIP_FRAMES)]
    frames = [pick_and_place_frame(i / (CLIP_FRAMES - 1)) for i in range(CLIP_FRAMES)]
    probe.publish_frames(probe.raw, [image_msg(f, ns) for f, ns in zip(frames, clip_ns, strict=True)])
    rewards = probe.wait_rewards(clip_ns)

    # One reward per frame, stamped with it, counted through the episode.
    assert [key(r.header.stamp) for r in rewards] == [key(stamp(ns)) for ns in clip_ns]
    assert [r.frame_index for r in rewards] == list(range(CLIP_FRAMES))
    assert {r.episode_id for r in rewards} == {0}
    assert {r.task for r in rewards} == {TASK}
    assert {r.stream for r in rewards} == {RAW_TOPIC}
    assert all(r.header.frame_id == "camera" for r in rewards)
    assert all(r.model_id for r in rewards)

    # Interval-hold: only every INTERVAL-th frame can be queried; the rest are held.
    queried = [r for r in rewards if r.queried]
    held = [r for r in rewards if r.held]
    assert queried, "no frame was scored"
    assert all(r.frame_index % INTERVAL == 0 for r in queried)
    assert all(r.held != r.queried for r in rewards)
    # A queried frame names itself as scored; a held one an earlier scored frame (or none yet).
    scored_keys = {key(r.header.stamp) for r in queried if r.unparsed == 0}
    for r in queried:
        if r.unparsed == 0:
            assert key(r.scored_stamp) == key(r.header.stamp)
            assert r.query_latency > 0
    for r in held:
        assert key(r.scored_stamp) == (0, 0) or key(r.scored_stamp) in scored_keys
        assert key(r.scored_stamp) <= key(r.header.stamp)
    for r in rewards:
        for value, low in ((r.progress, 0.0), (r.contrastive, -1.0), (r.completion_prob, 0.0)):
            assert math.isnan(value) or low <= value <= 1.0
        assert math.isfinite(r.reward)
    # ~/completed is published right after ~/reward: the last one may still be on its way.
    assert probe.spin_until(lambda: len(probe.completed) >= CLIP_FRAMES, 10.0), len(probe.completed)

    # The annotated view: the frame scaled up to be readable, a text panel below, the frame's stamp.
    assert probe.spin_until(lambda: len(probe.annotated) >= CLIP_FRAMES, 30.0)
    shown = probe.annotated[0]
    assert shown.encoding == "rgb8" and shown.width == 64 * 8 and shown.height > 48 * 8
    assert {key(m.header.stamp) for m in probe.annotated} == {key(stamp(ns)) for ns in clip_ns}

    # Due frames are either scored or dropped (replaced while the model was busy), and each is counted.
    diag = probe.fresh_diagnostics(lambda s: kv(s[MODEL_STATUS]).get("rewards out") == str(CLIP_FRAMES))
    model = kv(diag[MODEL_STATUS])
    due = CLIP_FRAMES // INTERVAL
    assert len(queried) + int(model["dropped frames"]) == due
    assert model["frames in"] == str(CLIP_FRAMES)
    assert model["model loaded"] == "True"
    assert diag[MODEL_STATUS].level == DiagnosticStatus.OK

    # ~/set_task starts a new episode whose first frame is a new initial frame (frame_index 0, queried).
    response = probe.set_task("stack the blocks")
    assert response.result == SetTask.Response.RESULT_OK, response.message
    assert response.episode_id == 1
    assert probe.set_task(reset_only=True).episode_id == 2
    reset = probe.call(probe.reset_client, Trigger.Request())
    assert reset.success and "3" in reset.message
    assert probe.set_task("   ").result == SetTask.Response.RESULT_EMPTY_TASK
    assert probe.set_task("x" * 10_000).result == SetTask.Response.RESULT_TASK_TOO_LONG
    assert probe.get_param("task") == "stack the blocks"
    more_ns = [T0_NS + (CLIP_FRAMES + i) * 1_000_000_000 // FPS for i in range(3)]
    probe.publish_frames(probe.raw, [image_msg(frames[-1], ns) for ns in more_ns])
    after = probe.wait_rewards(more_ns)
    assert [r.episode_id for r in after] == [3, 3, 3]
    assert [r.frame_index for r in after] == [0, 1, 2]
    assert {r.task for r in after} == {"stack the blocks"}
    # Nothing of the old episode leaks in: scored_stamp is zero or a frame of the new one.
    assert all(key(r.scored_stamp) in {(0, 0)} | {key(stamp(t)) for t in more_ns} for r in after)

    # Bad parameter values are rejected with a reason; model parameters are read-only.
    for name, value, words in (
        ("interval_frames", 0, "interval_frames"),
        ("between", "sometimes", "between"),
        ("multi_camera", "sideways", "multi_camera"),
        ("completion_threshold", 1.5, "completion_threshold"),
        ("camera_timeout_s", -1.0, "camera_timeout_s"),
        ("modalities", "progress", "type"),
        ("task", "y" * 5000, "max_task_chars"),
        ("max_task_chars", 10**6, "read-only"),
        ("model.device", "cuda:3", "read-only"),
    ):
        (result,) = probe.set_params(**{name: value})
        assert not result.successful, f"{name}={value!r} was accepted"
        assert words in result.reason, f"{name}: reason {result.reason!r} does not mention {words!r}"
    assert probe.get_param("interval_frames") == INTERVAL
    assert probe.get_param("model.device") == "cpu"

    # A good scoring change is applied and starts a new episode with it.
    (result,) = probe.set_params(completion_debounce=2)
    assert result.successful, result.reason
    assert probe.get_param("completion_debounce") == 2
    last_ns = [T0_NS + (CLIP_FRAMES + 10) * 1_000_000_000 // FPS]
    probe.publish_frames(probe.raw, [image_msg(frames[0], last_ns[0])])
    (last,) = probe.wait_rewards(last_ns)
    assert (last.episode_id, last.frame_index) == (4, 0)

    assert process.stop(signal.SIGINT) == 0, process.log()[-3000:]


def bad_image_msgs(ns: int) -> dict[str, Image]:
    good = image_msg(pick_and_place_frame(0.5), ns)
    unknown = image_msg(pick_and_place_frame(0.5), ns)
    unknown.encoding = "yuv422"
    zero = Image(height=0, width=0, encoding="rgb8", step=0)
    truncated = image_msg(pick_and_place_frame(0.5), ns)
    truncated.data = bytes(good.data)[: len(good.data) // 2]
    bad_step = image_msg(pick_and_place_frame(0.5), ns)
    bad_step.step = bad_step.width  # shorter than a row of rgb8 pixels
    return {"unknown_encoding": unknown, "zero_size": zero, "truncated": truncated, "bad_step": bad_step}


def test_bad_input_is_counted_once_per_kind_and_the_node_keeps_answering(start_node, ros_node, tiny_lrm):
    process = start_reward_node(
        start_node,
        tiny_lrm,
        image_topics=["image", JPEG_TOPIC],
        compressed=[False, True],
        modalities=["progress"],
    )
    probe = Probe(ros_node, process)
    probe.wait_connected(probe.raw)
    probe.wait_connected(probe.jpeg)

    # The wrist camera (JPEG) sends two good frames, then a corrupt one twice, then stops.
    jpeg_ns = [T0_NS + i * 33_000_000 for i in range(2)]
    probe.publish_frames(
        probe.jpeg, [jpeg_msg(pick_and_place_frame(0.1 * i), ns) for i, ns in enumerate(jpeg_ns)]
    )
    wrist = probe.wait_rewards(jpeg_ns)
    assert {r.stream for r in wrist} == {JPEG_TOPIC}
    assert wrist[0].queried and key(wrist[0].scored_stamp) == key(wrist[0].header.stamp)
    corrupt = jpeg_msg(pick_and_place_frame(0.3), T0_NS + 10**8)
    corrupt.data = bytes(corrupt.data)[:200]  # cut off mid-stream
    probe.publish_frames(probe.jpeg, [corrupt, corrupt])

    # The main camera sends each kind of broken raw image twice.
    broken = bad_image_msgs(T0_NS + 2 * 10**8)
    probe.publish_frames(probe.raw, [msg for msg in broken.values() for _ in range(2)])

    expected = {**{kind: 2 for kind in broken}, "corrupt_compressed": 2}

    def counted(statuses) -> bool:
        values = kv(statuses[MODEL_STATUS])
        return all(values.get(f"conversion errors: {kind}") == str(n) for kind, n in expected.items())

    diag = probe.fresh_diagnostics(counted, timeout=30.0)
    assert "conversion:" in kv(diag[MODEL_STATUS])["last error"]
    log = process.log()
    for kind in expected:
        assert log.count(f"conversion:{kind}") == 1, f"{kind} not logged exactly once:\n{log[-3000:]}"

    # Empty task via the parameter is taken as "no task yet"; via the service it is refused.
    assert probe.set_task("").result == SetTask.Response.RESULT_EMPTY_TASK

    # The wrist camera stopped: its status turns WARN (then ERROR) while the main camera still streams.
    good_ns = [T0_NS + 3 * 10**8 + i * 33_000_000 for i in range(3)]

    def wrist_stale(statuses) -> bool:
        return statuses[camera_status(JPEG_TOPIC)].level in (DiagnosticStatus.WARN, DiagnosticStatus.ERROR)

    stale = probe.fresh_diagnostics(wrist_stale, timeout=15.0)
    assert "no frame for" in stale[camera_status(JPEG_TOPIC)].message
    rewards_before = len([r for r in probe.rewards if r.stream == JPEG_TOPIC])

    # ... and the node still answers every good frame, once, with its stamp.
    probe.publish_frames(probe.raw, [image_msg(pick_and_place_frame(0.6), ns) for ns in good_ns])
    answered = probe.wait_rewards(good_ns)
    assert [r.frame_index for r in answered] == [0, 1, 2]
    assert {r.stream for r in answered} == {RAW_TOPIC}
    # A stopped camera gets no repeated rewards.
    assert len([r for r in probe.rewards if r.stream == JPEG_TOPIC]) == rewards_before == len(jpeg_ns)
    assert process.stop(signal.SIGTERM) == 0, process.log()[-3000:]


def test_lifecycle_transitions_through_the_lifecycle_services(start_node, ros_node, tiny_lrm):
    process = start_reward_node(start_node, tiny_lrm, autostart=False)
    probe = Probe(ros_node, process)

    assert probe.state() == State.PRIMARY_STATE_UNCONFIGURED
    assert probe.set_task(TASK).result == SetTask.Response.RESULT_NOT_ACTIVE
    diag = probe.fresh_diagnostics()
    assert kv(diag[MODEL_STATUS])["model loaded"] == "False"

    assert probe.lifecycle(Transition.TRANSITION_CONFIGURE)
    assert probe.state() == State.PRIMARY_STATE_INACTIVE
    assert probe.fresh_diagnostics(lambda s: kv(s[MODEL_STATUS])["model loaded"] == "True")
    assert probe.raw.get_subscription_count() == 0  # inactive: not listening to cameras

    assert probe.lifecycle(Transition.TRANSITION_ACTIVATE)
    assert probe.state() == State.PRIMARY_STATE_ACTIVE
    probe.wait_connected(probe.raw)
    ns = [T0_NS + i * 33_000_000 for i in range(2)]
    probe.publish_frames(probe.raw, [image_msg(pick_and_place_frame(0.2), t) for t in ns])
    assert [r.frame_index for r in probe.wait_rewards(ns)] == [0, 1]

    assert probe.lifecycle(Transition.TRANSITION_DEACTIVATE)
    assert probe.state() == State.PRIMARY_STATE_INACTIVE
    assert probe.spin_until(lambda: probe.raw.get_subscription_count() == 0, 15.0)
    assert probe.set_task(TASK).result == SetTask.Response.RESULT_NOT_ACTIVE

    assert probe.lifecycle(Transition.TRANSITION_CLEANUP)
    assert probe.state() == State.PRIMARY_STATE_UNCONFIGURED
    diag = probe.fresh_diagnostics(lambda s: kv(s[MODEL_STATUS])["model loaded"] == "False")
    assert kv(diag[MODEL_STATUS])["lifecycle state"] == "unconfigured"

    # Topic settings apply at the next configure: now two cameras, joined side by side by stamp.
    (bad,) = probe.set_params(multi_camera="stacked")
    assert not bad.successful and "multi_camera" in bad.reason
    results = probe.set_params(
        image_topics=["image", JPEG_TOPIC], compressed=[False, True], multi_camera="paired"
    )
    assert all(r.successful for r in results), [r.reason for r in results]
    assert probe.lifecycle(Transition.TRANSITION_CONFIGURE)
    assert probe.lifecycle(Transition.TRANSITION_ACTIVATE)
    probe.wait_connected(probe.raw)
    probe.wait_connected(probe.jpeg)
    raw_ns, jpeg_ns = T0_NS + 10**9, T0_NS + 10**9 + 5_000_000  # 5 ms apart: within pair_slop_s
    probe.publish_frames(probe.raw, [image_msg(pick_and_place_frame(0.9), raw_ns)])
    probe.publish_frames(probe.jpeg, [jpeg_msg(pick_and_place_frame(0.9), jpeg_ns)])
    (joined,) = probe.wait_rewards([jpeg_ns])  # a joined set carries its newest frame's stamp
    assert joined.stream == f"{RAW_TOPIC}+{JPEG_TOPIC}"
    assert joined.frame_index == 0 and joined.queried
    assert not probe.rewards_for([raw_ns])[key(stamp(raw_ns))]  # one reward per joined set, not per camera
    assert probe.lifecycle(Transition.TRANSITION_ACTIVE_SHUTDOWN)
    assert probe.state() == State.PRIMARY_STATE_FINALIZED
    assert process.stop(signal.SIGINT) == 0, process.log()[-3000:]


# The installed entry point with an engine that fails like a GPU would: the 2nd model call runs out of
# memory, the 3rd raises. Everything else is the real node on the real tiny model.
FAILING_ENGINE_MAIN = """
import sys
from lrm_reward.core.engine import make_engine
from lrm_reward.ros import reward_node

class FailingEngine:
    def __init__(self, cfg):
        self.inner = make_engine(cfg)
        self.model_id = self.inner.model_id
        self.calls = 0

    def score(self, queries):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.calls == 3:
            raise ValueError("processor rejected the batch")
        return self.inner.score(queries)

    def close(self):
        self.inner.close()

sys.exit(reward_node.main(engine_factory=FailingEngine))
"""


def test_engine_faults_and_overload_leave_no_frame_unanswered(ros_node, tiny_lrm, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump({"reward_node": {"ros__parameters": node_params(tiny_lrm, interval_frames=1)}})
    )
    argv = [sys.executable, "-c", FAILING_ENGINE_MAIN, "--ros-args", "--params-file", str(params), *REMAP]
    process = NodeProcess(argv, tmp_path / "failing.log", dict(os.environ))
    try:
        probe = Probe(ros_node, process)
        probe.wait_connected(probe.raw)
        ns = [T0_NS + i * 10**8 for i in range(5)]
        rewards = []
        for i, t in enumerate(ns):  # one frame at a time, so each is its own model call
            probe.publish_frames(probe.raw, [image_msg(pick_and_place_frame(i / 4), t)])
            rewards += probe.wait_rewards([t])
        assert [r.frame_index for r in rewards] == [0, 1, 2, 3, 4]
        assert all(r.queried for r in rewards)
        failed = rewards[1:3]
        assert all(r.unparsed == 3 for r in failed)  # all three answers of the frame failed
        # Failed frames keep the last good values: their scored_stamp is still frame 0's.
        assert all(key(r.scored_stamp) == key(rewards[0].header.stamp) for r in failed)
        assert key(rewards[4].scored_stamp) == key(rewards[4].header.stamp)

        diag = probe.fresh_diagnostics(lambda s: kv(s[MODEL_STATUS]).get("rewards out") == "5")
        values = kv(diag[MODEL_STATUS])
        assert values["engine errors: out_of_memory"] == "1"
        assert values["engine errors: engine_error"] == "1"
        assert diag[MODEL_STATUS].level == DiagnosticStatus.WARN
        log = process.log()
        assert log.count("out_of_memory:") == 1 and log.count("engine_error:") == 1, log[-3000:]

        # Overload: a burst arrives while the model is busy. Frames waiting for the model are replaced
        # by newer ones (latest wins); each replaced frame is counted and still answered, as held.
        burst_ns = [T0_NS + 10**9 + i * 1_000_000 for i in range(10)]
        for t in burst_ns:
            probe.raw.publish(image_msg(pick_and_place_frame(0.5), t))
        burst = probe.wait_rewards(burst_ns)
        assert [r.frame_index for r in burst] == list(range(5, 15))
        scored = [r for r in burst if r.queried]
        dropped = [r for r in burst if not r.queried]
        assert scored and dropped
        assert all(r.held for r in dropped)
        known = {key(r.header.stamp) for r in rewards + scored if r.unparsed == 0} | {(0, 0)}
        assert all(key(r.scored_stamp) in known for r in dropped)
        diag = probe.fresh_diagnostics(lambda s: kv(s[MODEL_STATUS]).get("rewards out") == "15")
        assert kv(diag[MODEL_STATUS])["dropped frames"] == str(len(dropped))
        assert process.stop(signal.SIGINT) == 0, process.log()[-3000:]
    finally:
        process.stop(signal.SIGKILL)
