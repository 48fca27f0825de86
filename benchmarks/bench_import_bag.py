"""How fast does lrm-import-bag turn a bag into a dataset, and how much memory does it take?

Writes a bag the way a robot records it (issue 18's case: 2 cameras 640x480 at 30 Hz as sensor_msgs/Image
rgb8, or CompressedImage JPEG with --compressed; joint states at 100 Hz; actions at 30 Hz; one episode),
then imports it in a child process and prints a table: import wall time, seconds per bag minute, dataset
frames and camera images per second, the share spent saving (resampling + video encoding + parquet:
EpisodeRecorder.stop) and the child's peak memory (VmRSS, and RssAnon: its own memory without the
raw frame spool it maps back from disk, which is page cache).

    . scripts/env.sh && python benchmarks/bench_import_bag.py                       # 60 s, MCAP, AV1
    python benchmarks/bench_import_bag.py --seconds 10 --storage sqlite3 --vcodec h264 --compressed
    python benchmarks/bench_import_bag.py --seconds 20 --configs mcap:libsvtav1,mcap:h264,sqlite3:h264

The bag and the dataset live in a temporary folder (--keep to keep them). Not a test: nothing asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "ros2_ws" / "src" / "lrm_reward"
JOINTS = ["shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex", "wrist_roll", "gripper"]


def write_bag(path: Path, seconds: float, storage: str, width: int, height: int, compressed: bool) -> dict:
    """One episode; camera frames are a moving gradient (video codecs see motion, not noise)."""
    import cv2
    from rosbags.rosbag2 import StoragePlugin, Writer

    from lrm_reward.bags.bag_source import default_typestore

    store = default_typestore()
    T = store.types
    plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}[storage]
    t0 = 1_750_000_000.0

    def header(stamp: float, frame: str):
        sec = int(stamp)
        return T["std_msgs/msg/Header"](
            stamp=T["builtin_interfaces/msg/Time"](
                sec=sec, nanosec=min(round((stamp - sec) * 1e9), 999_999_999)
            ),
            frame_id=frame,
        )

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // width), (yy * 255 // height), ((xx + yy) * 255 // (width + height))], -1)
    base = base.astype(np.uint8)
    events: list[tuple[float, int, str]] = []  # (receive time, sequence, stream)
    for k in range(int(seconds * 30)):
        for cam in ("front", "wrist"):
            events.append((k / 30 + 0.004, k, cam))
    for k in range(int(seconds * 100)):
        events.append((k / 100 + 0.001, k, "joint_states"))
    for k in range(int(seconds * 30)):
        events.append((k / 30 + 0.002, k, "action"))
    events.sort()
    empty = np.zeros(0, np.float64)
    image_type = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    topics = {
        "front": (f"/front/image_raw{'/compressed' if compressed else ''}", image_type),
        "wrist": (f"/wrist/image_raw{'/compressed' if compressed else ''}", image_type),
        "joint_states": ("/joint_states", "sensor_msgs/msg/JointState"),
        "action": ("/leader/action", "sensor_msgs/msg/JointState"),
    }
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns = {k: writer.add_connection(t, ty, typestore=store) for k, (t, ty) in topics.items()}
        for rel, k, stream in events:
            stamp = t0 + rel - 0.004 if stream in ("front", "wrist") else t0 + rel - 0.001
            if stream in ("front", "wrist"):
                pixels = np.roll(base, 4 * k + (37 if stream == "wrist" else 0), axis=1)
                if compressed:
                    _, buf = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 90])
                    msg = T[image_type](header=header(stamp, stream), format="jpeg", data=buf.reshape(-1))
                else:
                    msg = T[image_type](
                        header=header(stamp, stream), height=height, width=width, encoding="rgb8",
                        is_bigendian=0, step=width * 3, data=pixels.reshape(-1),
                    )  # fmt: skip
            else:
                q = np.sin(np.arange(6) + rel)
                msg = T["sensor_msgs/msg/JointState"](
                    header=header(stamp, "base"), name=JOINTS, position=q, velocity=empty, effort=empty
                )
            writer.write(conns[stream], round((t0 + rel) * 1e9), store.serialize_cdr(msg, topics[stream][1]))
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"bag_bytes": size, "images": 2 * int(seconds * 30)}


def child(bag: str, out: str, vcodec: str, fps: int) -> int:
    """The import, measured from inside: total time and the time EpisodeRecorder.stop() takes (saving)."""
    from lrm_reward.bags.importer import ImportConfig, import_bags
    from lrm_reward.bags.mapping import MappingSpec, TopicSpec
    from lrm_reward.refinement import recorder as recorder_module

    saving = {"s": 0.0}
    original = recorder_module.EpisodeRecorder.stop

    def timed_stop(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            saving["s"] += time.perf_counter() - t

    recorder_module.EpisodeRecorder.stop = timed_stop
    mapping = MappingSpec(fps=fps, task="pick the cube", action=TopicSpec("/leader/action"))
    started = time.perf_counter()
    report = import_bags([Path(bag)], ImportConfig(Path(out), mapping, video_codec=vcodec))
    total = time.perf_counter() - started
    print(
        json.dumps(
            {"total_s": total, "save_s": saving["s"], "frames": report.num_frames, "message": report.message}
        )
    )
    return report.exit_code()


def measure(args, storage: str, vcodec: str, work: Path) -> dict:
    bag = work / f"bag_{storage}_{vcodec}"
    out = work / f"ds_{storage}_{vcodec}"
    t = time.perf_counter()
    info = write_bag(bag, args.seconds, storage, args.width, args.height, args.compressed)
    info["write_s"] = time.perf_counter() - t
    os.sync()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(bag), str(out), vcodec, str(args.fps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    while proc.poll() is None:
        peak = _peak_memory(proc.pid, peak)
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}):\n{stdout[-2000:]}\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result.update(info)
    result["peak_rss_mb"] = peak["VmRSS"] / 1024
    result["peak_anon_mb"] = peak["RssAnon"] / 1024  # the process's own memory (heap, buffers)
    result["dataset_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    if not args.keep:
        shutil.rmtree(bag, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return result


def _peak_memory(pid: int, peak: dict) -> dict:
    """Max so far of VmRSS and its parts: RssAnon (own memory) and RssFile (mapped files: the raw frame
    spool the recorder reads back through a memmap, page cache the kernel can drop)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in peak:
                peak[key] = max(peak[key], int(value.split()[0]))
    except (OSError, ValueError):
        pass
    return peak


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.path.insert(0, str(SRC))
        return child(*sys.argv[2:5], int(sys.argv[5]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="bag length (one episode)")
    p.add_argument("--storage", default="mcap", choices=["mcap", "sqlite3"])
    p.add_argument("--vcodec", default="libsvtav1", help="the recorder's default is libsvtav1 (AV1)")
    p.add_argument("--configs", default="", help="storage:vcodec,... (overrides --storage/--vcodec)")
    p.add_argument("--compressed", action="store_true", help="cameras as CompressedImage JPEG")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--fps", type=int, default=30, help="dataset frame rate")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--workdir", default=None, help="where bag and dataset go (default: a temp folder)")
    args = p.parse_args()
    sys.path.insert(0, str(SRC))
    configs = (
        [c.split(":") for c in args.configs.split(",")] if args.configs else [[args.storage, args.vcodec]]
    )
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_import_bag_"))
    work.mkdir(parents=True, exist_ok=True)
    cams = f"2 x {args.width}x{args.height} {'JPEG' if args.compressed else 'rgb8'} @30 Hz"
    print(f"bag: {args.seconds:g} s, {cams}, joint states @100 Hz, actions @30 Hz; dataset {args.fps} fps")
    print(f"machine: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}")
    header = (
        "| storage | codec | bag MB | import s | s per bag minute | frames/s | images/s | saving % "
        "| peak RSS MB | of it own (anon) MB |"
    )
    rows = []
    for storage, vcodec in configs:
        r = measure(args, storage, vcodec, work)
        minutes = args.seconds / 60.0
        speed = f"{r['frames'] / r['total_s']:.1f} | {r['images'] / r['total_s']:.1f}"
        rows.append(
            f"| {storage} | {vcodec} | {r['bag_bytes'] / 1e6:.0f} | {r['total_s']:.1f} | "
            f"{r['total_s'] / minutes:.1f} | {speed} | {100 * r['save_s'] / r['total_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} |"
        )
        print(f"  {storage}/{vcodec}: {r['message']} (bag written in {r['write_s']:.1f} s, "
              f"dataset {r['dataset_bytes'] / 1e6:.1f} MB)", flush=True)  # fmt: skip
    print()
    print(header)
    print("|" + "---|" * 10)
    print("\n".join(rows))
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
