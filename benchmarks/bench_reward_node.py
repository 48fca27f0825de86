"""ROS overhead of reward_node: frame in -> reward out, minus model time, at 640x480 and 30 Hz.

Three processes over Fast DDS (loopback only): a camera publisher (1 or 3 cameras, rgb8, stamped with the
wall clock at publish time), reward_node itself (the real node, run through its ``main`` with a fake
engine that takes a constant time per call, because the point is the ROS shell, not the model), and this
process, which receives ``~/reward`` and computes, per frame, receive time - stamp - query_latency (the
model time behind a queried frame; 0 for held frames). The node's own measurement (callback entry ->
reward published, minus model time) is read from /diagnostics. Prints one table.

    . scripts/env.sh && python benchmarks/bench_reward_node.py [--seconds 10] [--model-ms 20] [--cameras 1 3]

Measured twice by default: with Fast DDS's default transports, and with a 32 MB shared-memory segment
(see LARGE_SHM_PROFILE: the default segment is smaller than one 640x480 frame); and, for each, with
``between: hold`` and ``between: student`` (an untrained student of lrm-distill's default architecture,
made for this camera: its cost per held frame, not its values, is the point).

Runs itself inside ``unshare -n`` (only loopback) when it is not already in such a namespace.
Not a test: nothing here asserts; the design target is p95 <= 5 ms with no unexplained drops.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ros_loopback import enter_loopback_namespace

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS = 640, 480, 30
INTERVAL_FRAMES = 10
DOMAIN_ID = "63"
TASK = "stack the blocks"

# Fast DDS's default shared-memory segment (512 KiB) is smaller than one 640x480 rgb8 frame (900 KiB), so
# by default such frames go over UDP loopback in fragments, which best-effort QoS loses under load. A larger
# segment is the usual deployment fix for raw camera images between processes on one machine.
LARGE_SHM_PROFILE = (Path(__file__).resolve().parents[1] / "config" / "fastdds_large_shm.xml").read_text()
PROFILE_VARIABLES = ("FASTDDS_DEFAULT_PROFILES_FILE", "FASTRTPS_DEFAULT_PROFILES_FILE")


# -- the node process: reward_node.main with a constant-time engine ----------------------------------


def run_node(model_s: float) -> int:
    from lrm_reward.core.types import Answer
    from lrm_reward.ros import reward_node

    class ConstantTimeEngine:
        """Answers every batch after model_s seconds, like a model whose cost does not depend on input."""

        model_id = f"constant-{model_s * 1000:g}ms"

        def __init__(self, cfg) -> None:
            self.cfg = cfg

        def score(self, queries):
            time.sleep(model_s)
            return [Answer(q.modality, 0.5, parsed=True, latency_s=model_s) for q in queries]

        def close(self) -> None:
            pass

    return reward_node.main(engine_factory=ConstantTimeEngine)


# -- the camera process ------------------------------------------------------------------------------


def run_cameras(topics: list[str], seconds: float) -> int:
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image

    rclpy.init()
    node = rclpy.create_node("bench_cameras")
    publishers = [node.create_publisher(Image, topic, qos_profile_sensor_data) for topic in topics]
    rng = np.random.default_rng(0)
    payload = rng.integers(0, 255, size=HEIGHT * WIDTH * 3, dtype=np.uint8).tobytes()
    messages = []
    for i, _ in enumerate(topics):
        msg = Image(height=HEIGHT, width=WIDTH, encoding="rgb8", step=WIDTH * 3)
        msg.header.frame_id = f"camera_{i}"
        msg.data = payload
        messages.append(msg)
    deadline = time.monotonic() + 30.0
    while any(p.get_subscription_count() == 0 for p in publishers) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the receiver must be matched too
    sent = 0
    start = time.monotonic()
    tick = 0
    while time.monotonic() - start < seconds:
        for pub, msg in zip(publishers, messages, strict=True):
            now_ns = time.time_ns()
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
            pub.publish(msg)
            sent += 1
        tick += 1
        time.sleep(max(0.0, start + tick / FPS - time.monotonic()))
    print(f"SENT {sent}", flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


# -- the measuring process ---------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def use_transport(transport: str, workdir: Path) -> None:
    """Point this process and its children at a Fast DDS profile (or at none for Fast DDS defaults)."""
    for name in PROFILE_VARIABLES:
        os.environ.pop(name, None)
    if transport == "shm-32MB":
        profile = workdir / "fastdds_large_shm.xml"
        profile.write_text(LARGE_SHM_PROFILE)
        for name in PROFILE_VARIABLES:
            os.environ[name] = str(profile)


def write_bench_student(workdir: Path, task: str) -> Path:
    """An untrained student of lrm-distill's default architecture for this task and a 640x480 camera."""
    import torch

    from lrm_reward.student import store
    from lrm_reward.student.model import StudentArch, StudentNet

    arch = StudentArch()
    torch.manual_seed(0)
    config = {
        "task": task,
        "camera": {"name": "", "source_shape": [HEIGHT, WIDTH]},
        "arch": arch.to_json(),
        "completion_threshold": 0.5,
        "validation": {},
    }
    return store.write_version(workdir / "student", StudentNet(arch).state_dict(), config)


def measure(
    cameras: int, seconds: float, model_s: float, workdir: Path, transport: str, between: str = "hold"
) -> dict:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    from lrm_interfaces.msg import RewardSignal

    use_transport(transport, workdir)
    topics = [f"/bench/camera_{i}/image_raw" for i in range(cameras)]
    params = workdir / f"bench_{cameras}_{between}.yaml"
    student = ""
    if between == "student":
        student = f"    student:\n      path: {write_bench_student(workdir, TASK)}\n"
    params.write_text(
        "reward_node:\n  ros__parameters:\n"
        f"    task: {TASK}\n    image_topics: {topics}\n"
        "    model:\n      base: constant-time-fake\n      device: cpu\n"
        f"    interval_frames: {INTERVAL_FRAMES}\n    camera_timeout_s: 5.0\n"
        f"    between: {between}\n{student}"
    )
    me = [sys.executable, str(Path(__file__).resolve())]
    node_log = open(workdir / f"node_{cameras}.log", "wb")  # noqa: SIM115 - closed below
    node_proc = subprocess.Popen(
        [
            *me,
            "--role",
            "node",
            "--model-ms",
            str(model_s * 1000),
            "--ros-args",
            "--params-file",
            str(params),
        ],
        stdout=node_log,
        stderr=subprocess.STDOUT,
    )

    context = rclpy.Context()
    rclpy.init(context=context)
    node = rclpy.create_node("bench_receiver", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    latencies: dict[str, list[float]] = {"held": [], "queried": []}
    received = 0
    from_student = 0
    diagnostics: list[DiagnosticArray] = []

    def on_reward(msg: RewardSignal) -> None:
        nonlocal received, from_student
        now = time.time()
        received += 1
        from_student += msg.student
        sent = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        model = msg.query_latency if msg.queried else 0.0
        latencies["queried" if msg.queried else "held"].append(now - sent - model)

    rewards_sub = node.create_subscription(
        RewardSignal,
        "/reward_node/reward",
        on_reward,
        QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE),
    )
    node.create_subscription(DiagnosticArray, "/diagnostics", diagnostics.append, 10)
    # Rewards published before this subscription is matched would be lost (volatile): wait for the match.
    deadline = time.monotonic() + 60.0
    while rewards_sub.get_publisher_count() == 0 and time.monotonic() < deadline:
        executor.spin_once(timeout_sec=0.05)

    camera_proc = subprocess.Popen(
        [*me, "--role", "cameras", "--seconds", str(seconds), "--topics", *topics],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    while camera_proc.poll() is None:
        executor.spin_once(timeout_sec=0.05)
    sent_line = [line for line in camera_proc.stdout.read().splitlines() if line.startswith("SENT")]
    sent = int(sent_line[0].split()[1]) if sent_line else -1

    def node_stats() -> dict[str, str]:
        for msg in reversed(diagnostics):
            status = next((s for s in msg.status if s.name.endswith("reward model")), None)
            if status is not None:
                return {v.key: v.value for v in status.values}
        return {}

    # Settle: two more diagnostics messages, and every reward the node says it sent has arrived.
    settle_from = len(diagnostics)
    end = time.monotonic() + 15.0
    while time.monotonic() < end:
        executor.spin_once(timeout_sec=0.05)
        if len(diagnostics) >= settle_from + 2 and received >= int(node_stats().get("rewards out", 0)):
            break
    stats = node_stats()
    node_proc.send_signal(signal.SIGINT)
    node_proc.wait(timeout=20)
    node_log.close()
    executor.shutdown()
    node.destroy_node()
    rclpy.shutdown(context=context)

    every = latencies["held"] + latencies["queried"]
    return {
        "transport": transport,
        "cameras": cameras,
        "between": between,
        "student": from_student,
        "sent": sent,
        "frames_in": int(stats.get("frames in", -1)),
        "rewards_out": int(stats.get("rewards out", -1)),
        "rewards": received,
        "dropped": int(stats.get("dropped frames", -1)),
        "p50": percentile(every, 50) * 1000,
        "p95": percentile(every, 95) * 1000,
        "held_p95": percentile(latencies["held"], 95) * 1000,
        "queried_p95": percentile(latencies["queried"], 95) * 1000,
        "node_p50": stats.get("ros overhead p50 [ms]", "n/a"),
        "node_p95": stats.get("ros overhead p95 [ms]", "n/a"),
    }


def print_table(rows: list[dict], model_ms: float, seconds: float) -> None:
    print(
        f"\nreward_node ROS overhead: {WIDTH}x{HEIGHT} rgb8 at {FPS} Hz per camera, {seconds:g} s, "
        f"interval_frames={INTERVAL_FRAMES}, fake engine {model_ms:g} ms/call, {os.cpu_count()} CPUs"
    )
    print("latency = reward received - frame stamp - model time (end to end over DDS, both directions);")
    print(
        "node = the node's own view (callback entry -> reward published, minus model time), last 500 frames\n"
    )
    header = (
        f"{'transport':>15} {'cameras':>7} {'between':>7} {'student':>7} "
        f"{'sent':>6} {'in':>6} {'out':>6} {'recv':>6} {'dropped':>7} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'held p95':>8} {'scored p95':>10} {'node p50':>8} {'node p95':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['transport']:>15} {r['cameras']:>7} {r['between']:>7} {r['student']:>7} "
            f"{r['sent']:>6} {r['frames_in']:>6} "
            f"{r['rewards_out']:>6} {r['rewards']:>6} {r['dropped']:>7} "
            f"{r['p50']:>7.2f} {r['p95']:>7.2f} {r['held_p95']:>8.2f} {r['queried_p95']:>10.2f} "
            f"{r['node_p50']:>8} {r['node_p95']:>8}"
        )
    print(
        "\nsent: frames published; in: frames the node received (sent - in: lost by best-effort DDS);\n"
        "out: rewards the node published (in - out: frames never answered); recv: rewards received here;\n"
        "student: rewards received with the student's values (between: student; the first camera only);\n"
        "dropped: frames due for the model but replaced by a newer one while it was busy (answered as held)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("measure", "node", "cameras"), default="measure")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--model-ms", type=float, default=20.0)
    parser.add_argument("--cameras", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--topics", nargs="*", default=[])
    parser.add_argument(
        "--between",
        nargs="+",
        choices=("hold", "student"),
        default=["hold", "student"],
        help="what fills the frames between queries",
    )
    parser.add_argument(
        "--transports",
        nargs="+",
        choices=("fastdds-default", "shm-32MB"),
        default=["shm-32MB", "fastdds-default"],
        help="Fast DDS transport setups to measure",
    )
    args, _ros_args = parser.parse_known_args()

    if args.role == "node":
        return run_node(args.model_ms / 1000)
    if args.role == "cameras":
        return run_cameras(args.topics, args.seconds)

    code = enter_loopback_namespace(Path(__file__), DOMAIN_ID)
    if code is not None:
        return code
    with tempfile.TemporaryDirectory(prefix="bench_reward_node_") as tmp:
        os.environ.setdefault("ROS_LOG_DIR", tmp)
        rows = [
            measure(n, args.seconds, args.model_ms / 1000, Path(tmp), transport, between)
            for transport in args.transports
            for n in args.cameras
            for between in args.between
        ]
    print_table(rows, args.model_ms, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
