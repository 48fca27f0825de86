"""sensor_msgs/Image and CompressedImage <-> HxWx3 uint8 RGB arrays, with numpy and OpenCV only.

cv_bridge has no wheel here, and the reward node only needs a handful of encodings, so this module reads
the message fields directly: Image in rgb8, bgr8, rgba8, bgra8, mono8, mono16 (row padding via ``step``
and ``is_bigendian`` honoured), CompressedImage in jpeg and png. Every failure raises
``ImageConversionError`` whose ``kind`` names the failure class, so the node can count and log once per
kind instead of once per frame.

The readers only use the message's fields (height, width, encoding, is_bigendian, step, data / format,
data), so they take real sensor_msgs messages and simple stand-ins alike; sensor_msgs is imported only
by ``rgb_to_image_msg``. Not for depth images (16UC1/32FC1, compressedDepth) or Bayer patterns.
"""

from __future__ import annotations

from array import array
from typing import Any

import cv2
import numpy as np

from lrm_reward.core.images import to_rgb_uint8

# The failure classes ImageConversionError.kind takes.
UNKNOWN_ENCODING = "unknown_encoding"
ZERO_SIZE = "zero_size"
TRUNCATED = "truncated"
BAD_STEP = "bad_step"
CORRUPT_COMPRESSED = "corrupt_compressed"
BAD_ARRAY = "bad_array"
ERROR_KINDS = (UNKNOWN_ENCODING, ZERO_SIZE, TRUNCATED, BAD_STEP, CORRUPT_COMPRESSED, BAD_ARRAY)

# encoding -> (channels, bytes per channel)
RAW_ENCODINGS = {
    "rgb8": (3, 1),
    "bgr8": (3, 1),
    "rgba8": (4, 1),
    "bgra8": (4, 1),
    "mono8": (1, 1),
    "mono16": (1, 2),
}

_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ImageConversionError(ValueError):
    """An image message that cannot be converted; ``kind`` is one of ERROR_KINDS."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _as_bytes(data: Any) -> np.ndarray:
    """The message's data field as a flat uint8 array, without a copy where the buffer allows it."""
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except TypeError:
        # A plain list of ints (hand-built stand-ins); slow, but only tests do this.
        return np.asarray(data, dtype=np.uint8).ravel()


def image_msg_to_rgb(msg: Any) -> np.ndarray:
    """Convert a sensor_msgs/Image (or anything with its fields) to a new HxWx3 uint8 RGB array."""
    encoding = str(msg.encoding).strip().lower()
    if encoding not in RAW_ENCODINGS:
        raise ImageConversionError(
            UNKNOWN_ENCODING, f"encoding {msg.encoding!r} is not one of {sorted(RAW_ENCODINGS)}"
        )
    channels, depth = RAW_ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(ZERO_SIZE, f"image is {width}x{height}")
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageConversionError(
            BAD_STEP, f"step {step} is shorter than a row of {width} {encoding} pixels ({row_bytes} bytes)"
        )
    data = _as_bytes(msg.data)
    if data.size < step * height:
        raise ImageConversionError(
            TRUNCATED, f"data has {data.size} bytes, step*height needs {step * height} ({width}x{height})"
        )
    # Rows may be padded to `step`; keep only each row's pixel bytes (a strided view, no copy yet).
    rows = data[: step * height].reshape(height, step)[:, :row_bytes]

    if depth == 2:
        # Shown as 8-bit by keeping each pixel's high byte (value >> 8), read straight from the buffer.
        high_byte = rows[:, 0::2] if msg.is_bigendian else rows[:, 1::2]
        return cv2.cvtColor(np.ascontiguousarray(high_byte), cv2.COLOR_GRAY2RGB)
    pixels = rows.reshape(height, width, channels) if channels > 1 else rows
    if encoding == "rgb8":
        return np.array(pixels, copy=True, order="C")
    if encoding == "mono8":
        return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_GRAY2RGB)
    conversion = {"bgr8": cv2.COLOR_BGR2RGB, "rgba8": cv2.COLOR_RGBA2RGB, "bgra8": cv2.COLOR_BGRA2RGB}
    return cv2.cvtColor(np.ascontiguousarray(pixels), conversion[encoding])


def compressed_msg_to_rgb(msg: Any) -> np.ndarray:
    """Decode a sensor_msgs/CompressedImage (jpeg or png) to a new HxWx3 uint8 RGB array.

    ``format`` may be the bare codec ("jpeg", "png") or image_transport's "<enc>; jpeg compressed bgr8"
    form; an empty format is sniffed from the data. compressedDepth is refused (it has its own header).
    """
    fmt = str(msg.format).strip().lower()
    if "compresseddepth" in fmt:
        raise ImageConversionError(
            UNKNOWN_ENCODING, f"format {msg.format!r}: compressedDepth is not supported"
        )
    if fmt and not any(codec in fmt for codec in ("jpeg", "jpg", "png")):
        raise ImageConversionError(UNKNOWN_ENCODING, f"format {msg.format!r} is neither jpeg nor png")
    data = _as_bytes(msg.data)
    if data.size == 0:
        raise ImageConversionError(ZERO_SIZE, "compressed image has no data")
    head = data[:8].tobytes()
    if head.startswith(_JPEG_MAGIC):
        # libjpeg fills a truncated stream with gray and only warns; the missing end marker gives it away.
        tail = data[-64:].tobytes().rstrip(b"\x00")
        if not tail.endswith(_JPEG_END):
            raise ImageConversionError(
                CORRUPT_COMPRESSED, f"JPEG data ({data.size} bytes) ends without an end-of-image marker"
            )
    elif not head.startswith(_PNG_MAGIC):
        raise ImageConversionError(
            CORRUPT_COMPRESSED, f"data ({data.size} bytes) starts with neither a JPEG nor a PNG signature"
        )
    decoded = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise ImageConversionError(CORRUPT_COMPRESSED, f"OpenCV could not decode {data.size} bytes of {fmt}")
    if decoded.ndim == 3 and decoded.shape[2] == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    elif decoded.ndim == 3 and decoded.shape[2] == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2RGB)
    return to_rgb_uint8(decoded)


def rgb_to_image_msg(rgb: np.ndarray, header: Any = None) -> Any:
    """Build a sensor_msgs/Image (rgb8) from an image ``to_rgb_uint8`` accepts; ``header`` is copied in."""
    from sensor_msgs.msg import Image  # only here: the readers above must not need ROS

    try:
        pixels = to_rgb_uint8(rgb)
    except ValueError as exc:
        raise ImageConversionError(BAD_ARRAY, str(exc)) from None
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(pixels.shape[0]), int(pixels.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = msg.width * 3
    # array('B') takes the message's fast path; a bytes object would be checked value by value.
    msg.data = array("B", pixels.tobytes())
    return msg
