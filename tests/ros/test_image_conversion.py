"""ros.image_conversion on real sensor_msgs messages (no ROS graph needed) and on plain stand-ins."""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import Header

from lrm_reward.ros.image_conversion import (
    ERROR_KINDS,
    ImageConversionError,
    compressed_msg_to_rgb,
    image_msg_to_rgb,
    rgb_to_image_msg,
)

H, W = 6, 5


def rgb_pattern(h: int = H, w: int = W) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def image_msg(pixels: np.ndarray, encoding: str, *, pad: int = 0, bigendian: bool = False) -> Image:
    """An Image whose rows are `pad` bytes longer than the pixels (filled with 0xEE to catch misreads)."""
    h, w = pixels.shape[:2]
    rows = pixels.reshape(h, -1).view(np.uint8) if pixels.dtype != np.uint8 else pixels.reshape(h, -1)
    padded = np.full((h, rows.shape[1] + pad), 0xEE, np.uint8)
    padded[:, : rows.shape[1]] = rows
    msg = Image()
    msg.height, msg.width, msg.encoding = h, w, encoding
    msg.is_bigendian = int(bigendian)
    msg.step = padded.shape[1]
    msg.data = array("B", padded.tobytes())
    return msg


def compressed_msg(pixels_bgr: np.ndarray, ext: str, fmt: str) -> CompressedImage:
    ok, encoded = cv2.imencode(ext, pixels_bgr)
    assert ok
    msg = CompressedImage()
    msg.format = fmt
    msg.data = array("B", encoded.tobytes())
    return msg


@pytest.mark.parametrize("pad", [0, 3])
def test_rgb8(pad):
    rgb = rgb_pattern()
    out = image_msg_to_rgb(image_msg(rgb, "rgb8", pad=pad))
    np.testing.assert_array_equal(out, rgb)
    assert out.dtype == np.uint8 and out.flags.c_contiguous and out.flags.owndata


@pytest.mark.parametrize("pad", [0, 1])
def test_bgr8_is_swapped(pad):
    rgb = rgb_pattern()
    out = image_msg_to_rgb(image_msg(rgb[:, :, ::-1].copy(), "bgr8", pad=pad))
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("pad", [0, 2])
def test_rgba8_and_bgra8_drop_alpha(pad):
    rgb = rgb_pattern()
    alpha = np.full((H, W, 1), 17, np.uint8)
    rgba = np.concatenate([rgb, alpha], axis=2)
    bgra = np.concatenate([rgb[:, :, ::-1], alpha], axis=2)
    np.testing.assert_array_equal(image_msg_to_rgb(image_msg(rgba, "rgba8", pad=pad)), rgb)
    np.testing.assert_array_equal(image_msg_to_rgb(image_msg(bgra, "bgra8", pad=pad)), rgb)


@pytest.mark.parametrize("pad", [0, 3])
def test_mono8(pad):
    gray = rgb_pattern()[:, :, 0].copy()
    out = image_msg_to_rgb(image_msg(gray, "mono8", pad=pad))
    assert out.shape == (H, W, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray)


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 1, 4])
def test_mono16_honours_byte_order_and_odd_padding(bigendian, pad):
    values = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 2111).astype(np.uint16)
    stored = values.astype(">u2" if bigendian else "<u2")
    out = image_msg_to_rgb(image_msg(stored, "mono16", pad=pad, bigendian=bigendian))
    np.testing.assert_array_equal(out[:, :, 1], (values >> 8).astype(np.uint8))


def test_reads_simple_stand_ins_with_bytes_data():
    rgb = rgb_pattern()
    stand_in = SimpleNamespace(
        height=H, width=W, encoding="bgr8", is_bigendian=0, step=W * 3, data=rgb[:, :, ::-1].tobytes()
    )
    np.testing.assert_array_equal(image_msg_to_rgb(stand_in), rgb)
    _, png = cv2.imencode(".png", rgb[:, :, ::-1])
    np.testing.assert_array_equal(
        compressed_msg_to_rgb(SimpleNamespace(format="png", data=png.tobytes())), rgb
    )


@pytest.mark.parametrize(
    ("change", "kind"),
    [
        ({"encoding": "yuv422"}, "unknown_encoding"),
        ({"encoding": "16UC1"}, "unknown_encoding"),
        ({"encoding": ""}, "unknown_encoding"),
        ({"height": 0}, "zero_size"),
        ({"width": 0}, "zero_size"),
        ({"step": W * 3 - 1}, "bad_step"),
        ({"step": 0}, "bad_step"),
        ({"data": array("B", bytes(H * W * 3 - 1))}, "truncated"),
        ({"data": array("B")}, "truncated"),
        ({"step": W * 3 + 8}, "truncated"),  # claims padding the data does not have
    ],
)
def test_bad_image_messages_raise_with_kind(change, kind):
    msg = image_msg(rgb_pattern(), "rgb8")
    for field, value in change.items():
        setattr(msg, field, value)
    with pytest.raises(ImageConversionError) as info:
        image_msg_to_rgb(msg)
    assert info.value.kind == kind and kind in ERROR_KINDS
    assert isinstance(info.value, ValueError)
    assert kind in str(info.value)


def test_jpeg_decodes_close_to_source():
    rgb = np.zeros((32, 48, 3), np.uint8)
    rgb[:, :24] = (200, 40, 10)  # red-ish left half tells RGB from BGR
    rgb[:, 24:] = (10, 40, 200)
    out = compressed_msg_to_rgb(compressed_msg(rgb[:, :, ::-1], ".jpg", "rgb8; jpeg compressed bgr8"))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 6
    assert out[16, 4, 0] > 150 and out[16, 44, 2] > 150


@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", ""])
def test_png_decodes_exactly(fmt):
    rgb = rgb_pattern(9, 7)
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed_msg(rgb[:, :, ::-1], ".png", fmt)), rgb)


def test_gray_and_16bit_png():
    gray = rgb_pattern()[:, :, 0].copy()
    out = compressed_msg_to_rgb(compressed_msg(gray, ".png", "mono8; png compressed mono8"))
    np.testing.assert_array_equal(out[:, :, 2], gray)
    deep = (gray.astype(np.uint16) << 8) | 0x7F
    out16 = compressed_msg_to_rgb(compressed_msg(deep, ".png", "png"))
    np.testing.assert_array_equal(out16[:, :, 0], gray)


def test_bgra_png_drops_alpha():
    rgb = rgb_pattern()
    bgra = np.concatenate([rgb[:, :, ::-1], np.full((H, W, 1), 9, np.uint8)], axis=2)
    np.testing.assert_array_equal(compressed_msg_to_rgb(compressed_msg(bgra, ".png", "png")), rgb)


def _corrupt(msg: CompressedImage, how: str) -> CompressedImage:
    data = bytes(msg.data)
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "garbage":
        data = b"this is not an image at all"
    elif how == "scrambled_header":
        data = data[:2] + bytes(200) + data[202:]
    msg.data = array("B", data)
    return msg


@pytest.mark.parametrize("ext,fmt", [(".jpg", "jpeg"), (".png", "png")])
@pytest.mark.parametrize("how", ["truncated", "garbage", "scrambled_header"])
def test_corrupt_compressed_data(ext, fmt, how):
    msg = _corrupt(compressed_msg(rgb_pattern(40, 40), ext, fmt), how)
    with pytest.raises(ImageConversionError) as info:
        compressed_msg_to_rgb(msg)
    assert info.value.kind == "corrupt_compressed"


@pytest.mark.parametrize(
    ("fmt", "data", "kind"),
    [
        ("jpeg", b"", "zero_size"),
        ("tiff", b"II*\x00", "unknown_encoding"),
        ("16UC1; compressedDepth png", b"\x00" * 20, "unknown_encoding"),
    ],
)
def test_compressed_format_and_empty_data(fmt, data, kind):
    msg = CompressedImage()
    msg.format = fmt
    msg.data = array("B", data)
    with pytest.raises(ImageConversionError) as info:
        compressed_msg_to_rgb(msg)
    assert info.value.kind == kind


def test_rgb_to_image_msg_round_trip_keeps_header():
    rgb = rgb_pattern()
    header = Header(frame_id="camera_front")
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = rgb_to_image_msg(rgb, header)
    assert isinstance(msg, Image)
    assert (msg.height, msg.width, msg.encoding, msg.step) == (H, W, "rgb8", W * 3)
    assert msg.header.frame_id == "camera_front" and msg.header.stamp.nanosec == 345
    np.testing.assert_array_equal(image_msg_to_rgb(msg), rgb)


def test_rgb_to_image_msg_converts_gray_and_rejects_bad_arrays():
    msg = rgb_to_image_msg(np.full((3, 4), 0.5, np.float32))
    assert msg.encoding == "rgb8" and set(bytes(msg.data)) == {128}
    with pytest.raises(ImageConversionError) as info:
        rgb_to_image_msg(np.zeros((0, 3, 3), np.uint8))
    assert info.value.kind == "bad_array"
