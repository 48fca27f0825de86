"""Does refinement_node record every message? Published vs received vs recorded, per stream and episode.

Three processes over Fast DDS (loopback only): a publisher (cameras as sensor_msgs/Image rgb8, joint
states, actions as JointState, rewards; each at its own rate, stamped with the wall clock), the real
refinement_node (its ``main``), and this process, which starts and stops episodes back to back through
the node's services, so saving episode k overlaps recording episode k+1 when the node allows it.

Per episode it prints: messages published per stream, messages the node accepted (the episode sidecar's
``received``: anything missing there was lost on the way or starved in the node), frames recorded vs the
frames the duration allows, how long ``stop_episode`` took and when the episode was on disk.

    . scripts/env.sh && python benchmarks/bench_recorder_node.py                  # 2 x 640x480 at 30 Hz
    python benchmarks/bench_recorder_node.py --cameras 1 --width 64 --height 48 --camera-hz 20 --fps 10
    python benchmarks/bench_recorder_node.py --busy 2      # plus two busy-loop processes (a loaded box)
    python benchmarks/bench_recorder_node.py --stall 1.5   # SIGSTOP the node 1.5 s mid-episode (starved)
    python benchmarks/bench_recorder_node.py --publisher-stall 1.5   # the publisher pauses, then bursts
    python benchmarks/bench_recorder_node.py --source /tmp/old/ros2_ws/src/lrm_reward   # another version

Runs itself inside ``unshare -n`` (only loopback) when not already in such a namespace. Uses the 32 MB
shared-memory Fast DDS profile of config/ (the default segment is smaller than one 640x480 frame).
Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
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
DOMAIN_ID = "64"
PROFILE = REPO / "config" / "fastdds_large_shm.xml"
STREAMS = ("state", "action", "reward")
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


# -- the publisher process: one episode per line on stdin --------------------------------------------


def run_publisher(args) -> int:
    import rclpy
    from rclpy.qos import qos_profile_sensor_data
    from sensor_msgs.msg import Image, JointState

    from lrm_interfaces.msg import RewardSignal

    rclpy.init()
    node = rclpy.create_node("bench_recorder_publisher")
    cams = [f"cam{i}" for i in range(args.cameras)]
    pubs = {f"camera:{c}": node.create_publisher(Image, f"image_{c}", qos_profile_sensor_data) for c in cams}
    depth = args.publisher_depth
    pubs["state"] = node.create_publisher(JointState, "joint_states", depth)
    pubs["action"] = node.create_publisher(JointState, "action", depth)
    pubs["reward"] = node.create_publisher(RewardSignal, "reward", depth)
    # A few distinct frames (gradient + moving square + noise: something a codec has to work on).
    h, w = args.height, args.width
    rng = np.random.default_rng(0)
    base = (np.add.outer(np.arange(h), np.arange(w)) % 256).astype(np.uint8)
    frames = []
    for k in range(30):
        img = np.stack([base, np.roll(base, k * 7, axis=1), base[::-1]], axis=-1).copy()
        y, x = (k * h // 40) % (h - h // 4), (k * w // 30) % (w - w // 4)
        img[y : y + h // 4, x : x + w // 4] = (200, 40, 40)
        img = np.clip(img.astype(np.int16) + rng.integers(-8, 8, img.shape), 0, 255).astype(np.uint8)
        msg = Image(height=h, width=w, encoding="rgb8", step=w * 3)
        msg.data = img.tobytes()
        frames.append(msg)
    deadline = time.monotonic() + 60.0
    while any(p.get_subscription_count() == 0 for p in pubs.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    print("READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        duration, pause, pause_at = (float(v) for v in line.split())
        events = [
            (t, key)
            for key in pubs
            if key.startswith("camera:")
            for t in np.arange(0, duration, 1 / args.camera_hz)
        ]
        events += [(t, "state") for t in np.arange(0, duration, 1 / args.state_hz)]
        events += [(t, "action") for t in np.arange(0, duration, 1 / args.action_hz)]
        events += [(t, "reward") for t in np.arange(0, duration, 1 / args.reward_hz)]
        events.sort(key=lambda e: e[0])
        sent = dict.fromkeys(pubs, 0)
        late = 0.0
        wall0 = time.monotonic()
        for rel, key in events:
            if pause > 0 and rel >= duration * pause_at:  # a hiccup: then the backlog goes out in a burst
                time.sleep(pause)
                pause = 0.0
            late = max(late, time.monotonic() - (wall0 + rel))
            time.sleep(max(0.0, wall0 + rel - time.monotonic()))
            now_ns = time.time_ns()
            if key.startswith("camera:"):
                msg = frames[sent[key] % len(frames)]
            elif key == "reward":
                msg = RewardSignal(progress=float(rel / duration), completion_prob=0.0, reward=0.0)
            else:
                msg = JointState(name=JOINTS, position=[float(rel)] * len(JOINTS))
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(now_ns, 1_000_000_000)
            pubs[key].publish(msg)
            sent[key] += 1
        print("SENT " + json.dumps({"sent": sent, "publisher_late_s": late}), flush=True)
    node.destroy_node()
    rclpy.shutdown()
    return 0


# -- the measuring process ---------------------------------------------------------------------------


def measure(args, workdir: Path) -> list[dict]:
    import rclpy
    from rclpy.executors import SingleThreadedExecutor

    from lrm_interfaces.srv import StartEpisode, StopEpisode

    data_root = workdir / "data"
    cams = [f"cam{i}" for i in range(args.cameras)]
    params = {
        "data_root": str(data_root),
        "dataset_name": "bench",
        "fps": args.fps,
        "cameras": cams,
        "image_topics": [f"image_{c}" for c in cams],
        "video_codec": args.codec,
        "max_gap_s": 2.0,
        **dict(kv.split("=", 1) for kv in args.param),
    }
    params = {k: _yaml_value(v) for k, v in params.items()}
    params_file = workdir / "params.yaml"
    params_file.write_text(json.dumps({"refinement_node": {"ros__parameters": params}}))
    me = [sys.executable, str(Path(__file__).resolve())]
    node_log = open(workdir / "node.log", "wb")  # noqa: SIM115 - closed below
    node_proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lrm_reward.ros.refinement_node",
            "--ros-args",
            "--params-file",
            str(params_file),
        ],
        stdout=node_log,
        stderr=subprocess.STDOUT,
    )
    pub_args = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in (
            "cameras",
            "width",
            "height",
            "camera-hz",
            "state-hz",
            "action-hz",
            "reward-hz",
            "publisher-depth",
        )
    ]
    publisher = subprocess.Popen(
        [*me, "--role", "publisher", *pub_args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    busy = [
        subprocess.Popen(["nice", "-n", str(args.busy_nice), sys.executable, "-c", "while True: pass"])
        for _ in range(args.busy)
    ]
    rclpy.init()
    node = rclpy.create_node("bench_recorder_client")
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    start = node.create_client(StartEpisode, "/refinement_node/start_episode")
    stop = node.create_client(StopEpisode, "/refinement_node/stop_episode")

    def call(client, request, timeout=900.0):
        if not client.wait_for_service(timeout_sec=60.0):
            raise RuntimeError(f"no service; node log:\n{(workdir / 'node.log').read_text()[-3000:]}")
        future = client.call_async(request)
        end = time.monotonic() + timeout
        while not future.done() and time.monotonic() < end:
            executor.spin_once(timeout_sec=0.05)
        if not future.done():
            raise RuntimeError("service call timed out")
        return future.result()

    assert publisher.stdout.readline().strip() == "READY"
    rows = []
    sidecar_seen: dict[int, float] = {}
    try:
        for ep in range(args.episodes):
            res = call(start, StartEpisode.Request(task="bench", notes=f"episode {ep}"))
            if res.result != StartEpisode.Response.RESULT_OK:
                raise RuntimeError(f"start_episode: {res.message}")
            index = res.episode_index
            time.sleep(0.3)
            cpu0 = _cpu_seconds(node_proc.pid)
            publisher.stdin.write(f"{args.duration} {args.publisher_stall} {args.stall_at}\n")
            publisher.stdin.flush()
            if args.stall > 0:  # the node descheduled for a while, as on an overloaded machine
                time.sleep(args.duration * args.stall_at)
                os.kill(node_proc.pid, signal.SIGSTOP)
                time.sleep(args.stall)
                os.kill(node_proc.pid, signal.SIGCONT)
            sent_line = publisher.stdout.readline()
            sent = json.loads(sent_line.split(" ", 1)[1])
            time.sleep(0.3)  # the last messages in flight
            record_cpu = _cpu_seconds(node_proc.pid) - cpu0
            t_stop = time.monotonic()
            stopped = call(stop, StopEpisode.Request(outcome=StopEpisode.Request.OUTCOME_SUCCESS))
            rows.append(
                {
                    "episode": index,
                    "sent": sent["sent"],
                    "late": sent["publisher_late_s"],
                    "stop_s": time.monotonic() - t_stop,
                    "stop_result": int(stopped.result),
                    "stop_message": stopped.message,
                    "frames": int(stopped.num_frames),
                    "t_stop": t_stop,
                    "record_cpu": record_cpu,
                }
            )
            _poll_sidecars(data_root, rows, sidecar_seen)
        end = time.monotonic() + args.save_timeout
        while len(sidecar_seen) < len(rows) and time.monotonic() < end:
            _poll_sidecars(data_root, rows, sidecar_seen)
            executor.spin_once(timeout_sec=0.2)
    finally:
        publisher.stdin.close()
        publisher.wait(timeout=30)
        for b in busy:
            b.kill()
        peak_rss_mb = _peak_rss_mb(node_proc.pid)
        node_proc.send_signal(signal.SIGINT)
        try:
            node_proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            node_proc.kill()
        node_log.close()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown()
    for r in rows:
        side = data_root / "bench" / "recording" / f"episode_{r['episode']:06d}.json"
        r["sidecar"] = json.loads(side.read_text()) if side.exists() else None
        r["saved_after_stop_s"] = sidecar_seen.get(r["episode"], float("nan")) - r["t_stop"]
        r["node_peak_rss_mb"] = peak_rss_mb
    return rows


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) of one process so far; its children are not included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the node process (its DDS queues included; the saver child is not)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _poll_sidecars(data_root: Path, rows: list[dict], seen: dict[int, float]) -> None:
    for r in rows:
        side = data_root / "bench" / "recording" / f"episode_{r['episode']:06d}.json"
        if r["episode"] not in seen and side.exists():
            seen[r["episode"]] = time.monotonic()


def _yaml_value(value):
    if not isinstance(value, str):
        return value
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value, value)


def print_table(rows: list[dict], args) -> None:
    print(
        f"\nrefinement_node: {args.cameras} x {args.width}x{args.height} rgb8 at {args.camera_hz:g} Hz, "
        f"state {args.state_hz:g} Hz, action {args.action_hz:g} Hz, reward {args.reward_hz:g} Hz, "
        f"{args.duration:g} s episodes back to back, dataset {args.fps} fps, codec {args.codec}, "
        f"{os.cpu_count()} CPUs, {args.busy} busy-loop process(es) at nice {args.busy_nice}; "
        f"node stalled {args.stall:g} s and publisher paused {args.publisher_stall:g} s at "
        f"{args.stall_at:g} of each episode; publisher queue depth {args.publisher_depth}; "
        f"source {args.source}; extra params: {args.param or '-'}"
    )
    print(
        "stream: published / accepted by the node (sidecar 'received') / lost (the node saw gaps in the "
        "publisher's sequence numbers); frames: recorded / expected\n"
    )
    streams = sorted(k for k in rows[0]["sent"] if k.startswith("camera:")) + list(STREAMS)
    header = f"{'ep':>3} " + " ".join(f"{s:>20}" for s in streams)
    header += f" {'frames':>9} {'stop s':>7} {'on disk s':>9} {'pub late s':>10} {'node cpu':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        got = (r["sidecar"] or {}).get("received", {})
        transport = (r["sidecar"] or {}).get("transport", {})
        cells = [
            f"{r['sent'].get(s, 0):>6} /{got.get(s, '-')!s:>5} /{transport.get(s, {}).get('lost', '-')!s:>4}"
            for s in streams
        ]
        expected = int(args.duration * args.fps)
        print(
            f"{r['episode']:>3} "
            + " ".join(f"{c:>20}" for c in cells)
            + f" {r['frames']:>4}/{expected:<4} {r['stop_s']:>7.2f} {r['saved_after_stop_s']:>9.1f}"
            + f" {r['late']:>10.3f} {r['record_cpu'] / args.duration:>7.0%}"
        )
    for r in rows:
        if r["stop_result"] != 0:
            print(f"episode {r['episode']}: stop result {r['stop_result']}: {r['stop_message']}")
    print(
        "\nstop s: stop_episode call time; on disk s: stop called -> episode sidecar written (saved);\n"
        "pub late s: the publisher's worst lateness against its schedule (a starved publisher, not the "
        "node);\n"
        "node cpu: CPU time of the node process while the episode was published / its duration"
    )
    print(f"node peak RSS: {rows[0]['node_peak_rss_mb']:.0f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=("measure", "publisher"), default="measure")
    parser.add_argument("--cameras", type=int, default=2)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--state-hz", type=float, default=50.0)
    parser.add_argument("--action-hz", type=float, default=30.0)
    parser.add_argument("--reward-hz", type=float, default=10.0)
    parser.add_argument("--fps", type=int, default=30, help="dataset fps")
    parser.add_argument("--duration", type=float, default=5.0, help="[s] per episode")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--codec", default="libsvtav1")
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes (load)")
    parser.add_argument("--stall", type=float, default=0.0, help="[s] SIGSTOP the node this long per episode")
    parser.add_argument(
        "--publisher-stall", type=float, default=0.0, help="[s] publisher pauses, then bursts"
    )
    parser.add_argument("--stall-at", type=float, default=0.5, help="... at this fraction of the episode")
    parser.add_argument("--publisher-depth", type=int, default=50, help="queue depth of the publishers")
    parser.add_argument("--busy-nice", type=int, default=0, help="niceness of the busy loops")
    parser.add_argument(
        "--source", default=str(REPO / "ros2_ws" / "src" / "lrm_reward"), help="lrm_reward source tree to run"
    )
    parser.add_argument("--save-timeout", type=float, default=600.0)
    parser.add_argument("--param", action="append", default=[], help="extra node parameter key=value")
    args = parser.parse_args()

    if args.role == "publisher":
        return run_publisher(args)
    code = enter_loopback_namespace(Path(__file__), DOMAIN_ID)
    if code is not None:
        return code
    os.environ.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(PROFILE))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    src = str(Path(args.source).resolve())
    os.environ["PYTHONPATH"] = f"{src}:{os.environ.get('PYTHONPATH', '')}"
    with tempfile.TemporaryDirectory(prefix="bench_recorder_node_") as tmp:
        os.environ.setdefault("ROS_LOG_DIR", tmp)
        rows = measure(args, Path(tmp))
        log_copy = Path(tempfile.gettempdir()) / "bench_recorder_node_last.log"
        log_copy.write_text((Path(tmp) / "node.log").read_text(errors="replace"))
    print_table(rows, args)
    print(f"node log: {log_copy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
