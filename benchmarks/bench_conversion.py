"""Image message -> RGB conversion cost per encoding (lrm_reward.ros.image_conversion), printed as a table.

Part of the reward node's per-frame overhead budget (design: p95 <= 5 ms frame-in to reward-out at
640x480, 30 Hz). Uses real sensor_msgs messages when the ROS wheels import, plain stand-ins otherwise.
Not a test: nothing is asserted; run it on the machine you want numbers for.

    .venv/bin/python benchmarks/bench_conversion.py [--width 640 --height 480 --repeats 300]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from array import array
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ros2_ws" / "src" / "lrm_reward"))

from lrm_reward.core.images import to_rgb_uint8
from lrm_reward.ros.image_conversion import (
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_image_msg,
)


def synthetic_scene(height: int, width: int) -> np.ndarray:
    """A table-top-like RGB frame: smooth gradients, a few blocks, mild sensor noise (realistic JPEG size)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([80 + 60 * x / width, 90 + 50 * y / height, 120 - 40 * x / width], axis=2)
    for _ in range(6):
        top, left = rng.integers(0, height - 60), rng.integers(0, width - 80)
        image[top : top + 60, left : left + 80] = rng.integers(0, 256, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_messages(rgb: np.ndarray) -> tuple[dict[str, object], str]:
    try:
        from sensor_msgs.msg import CompressedImage, Image

        source = "sensor_msgs"
    except ImportError:
        Image = CompressedImage = SimpleNamespace  # stand-ins with the same fields
        source = "stand-ins"

    height, width = rgb.shape[:2]

    def raw(pixels: np.ndarray, encoding: str) -> object:
        msg = Image()
        msg.height, msg.width, msg.encoding, msg.is_bigendian = height, width, encoding, 0
        msg.step = pixels.nbytes // height
        msg.data = array("B", pixels.tobytes())
        return msg

    def compressed(ext: str, fmt: str) -> object:
        ok, encoded = cv2.imencode(ext, rgb[:, :, ::-1])
        assert ok
        msg = CompressedImage()
        msg.format = fmt
        msg.data = array("B", encoded.tobytes())
        return msg

    gray16 = (rgb[:, :, 1].astype(np.uint16) << 8).astype("<u2")
    messages = {
        "rgb8": raw(rgb, "rgb8"),
        "bgr8": raw(np.ascontiguousarray(rgb[:, :, ::-1]), "bgr8"),
        "rgba8": raw(np.dstack([rgb, np.full((height, width), 255, np.uint8)]), "rgba8"),
        "mono8": raw(np.ascontiguousarray(rgb[:, :, 1]), "mono8"),
        "mono16": raw(gray16, "mono16"),
        "jpeg": compressed(".jpg", "rgb8; jpeg compressed bgr8"),
        "png": compressed(".png", "rgb8; png compressed bgr8"),
    }
    return messages, source


def measure(fn, repeats: int) -> tuple[float, float, float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    p50 = statistics.median(times)
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
    return p50 * 1e3, p95 * 1e3, max(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()

    rgb = synthetic_scene(args.height, args.width)
    messages, source = make_messages(rgb)
    rows = []
    for name, msg in messages.items():
        fn = compressed_msg_to_rgb if name in ("jpeg", "png") else image_msg_to_rgb
        p50, p95, worst = measure(lambda fn=fn, msg=msg: fn(msg), args.repeats)
        rows.append((f"{name} -> rgb", len(msg.data), p50, p95, worst))
    float_frame = rgb.astype(np.float32) / 255.0
    float_times = measure(lambda: to_rgb_uint8(float_frame), 100)
    rows.append(("float32 array -> rgb", float_frame.nbytes, *float_times))
    gray_frame = np.ascontiguousarray(rgb[:, :, 1])
    rows.append(("gray array -> rgb", gray_frame.nbytes, *measure(lambda: to_rgb_uint8(gray_frame), 100)))
    if source == "sensor_msgs":
        p50, p95, worst = measure(lambda: rgb_to_image_msg(rgb), args.repeats)
        rows.append(("rgb -> Image msg", rgb.nbytes, p50, p95, worst))

    print(
        f"image conversion, {args.width}x{args.height}, {args.repeats} repeats, messages: {source}, "
        f"OpenCV {cv2.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}"
    )
    print(f"{'conversion':<22} {'bytes in':>10} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for label, size, p50, p95, worst in rows:
        print(f"{label:<22} {size:>10} {p50:>8.3f} {p95:>8.3f} {worst:>8.3f}")


if __name__ == "__main__":
    main()
