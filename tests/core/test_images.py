"""core.images: camera-like arrays -> HxWx3 uint8 RGB, and side-by-side joining of camera views."""

from __future__ import annotations

import numpy as np
import pytest

from lrm_reward.core.images import hstack_rgb, resize_to_height, to_rgb_uint8


def gradient(h: int = 4, w: int = 5) -> np.ndarray:
    return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)


def test_rgb_uint8_passes_through_without_copy():
    image = gradient()
    out = to_rgb_uint8(image)
    assert out is image


def test_non_contiguous_rgb_becomes_contiguous_with_same_pixels():
    image = gradient(6, 8)[:, ::2]
    out = to_rgb_uint8(image)
    assert out.flags.c_contiguous and out.shape == (6, 4, 3)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 1)])
def test_gray_is_replicated_to_three_channels(shape):
    gray = np.arange(12, dtype=np.uint8).reshape(shape)
    out = to_rgb_uint8(gray)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray.reshape(3, 4))


def test_rgba_drops_alpha():
    rgba = np.dstack([gradient(), np.full((4, 5), 7, np.uint8)])
    out = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out, gradient())
    assert out.flags.c_contiguous


def test_uint16_keeps_the_high_byte():
    image = np.array([[0, 255, 256, 65535]], dtype=np.uint16)
    assert to_rgb_uint8(image)[0, :, 0].tolist() == [0, 0, 1, 255]
    assert to_rgb_uint8(image.astype(">u2"))[0, :, 0].tolist() == [0, 0, 1, 255]  # big-endian too


def test_float_unit_range_is_scaled():
    image = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    assert to_rgb_uint8(image)[0, :, 1].tolist() == [0, 128, 255]


def test_float_0_255_range_is_kept():
    image = np.array([[0.0, 12.4, 254.6]], dtype=np.float64)
    assert to_rgb_uint8(image)[0, :, 2].tolist() == [0, 12, 255]


def test_small_integer_types_in_range_are_accepted():
    image = np.array([[0, 100, 255]], dtype=np.int64)
    assert to_rgb_uint8(image)[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.uint8), "empty"),
        (np.zeros((5,), np.uint8), "HxW"),
        (np.zeros((2, 2, 2, 3), np.uint8), "HxW"),
        (np.zeros((4, 4, 2), np.uint8), "channels"),
        (np.array([[0.1, np.nan]], np.float32), "NaN"),
        (np.array([[0.1, np.inf]]), "NaN or inf"),
        (np.array([[-0.5, 0.5]]), r"\[0, 1\] or \[0, 255\]"),
        (np.array([[300.0]]), r"\[0, 1\] or \[0, 255\]"),
        (np.array([[-1, 3]], np.int32), "0..255"),
        (np.array([[1000]], np.int64), "0..255"),
        (np.zeros((2, 2), bool), "dtype"),
        (np.zeros((2, 2), np.complex64), "dtype"),
    ],
)
def test_bad_input_gets_a_clear_value_error(array, match):
    with pytest.raises(ValueError, match=match):
        to_rgb_uint8(array)


def test_non_array_is_rejected():
    with pytest.raises(ValueError, match="numpy array"):
        to_rgb_uint8([[1, 2], [3, 4]])


def test_resize_to_height_keeps_aspect_and_constant_colour():
    image = np.full((10, 20, 3), (10, 200, 30), np.uint8)
    out = resize_to_height(image, 5)
    assert out.shape == (5, 10, 3)
    assert np.all(out == np.array([10, 200, 30], np.uint8))
    up = resize_to_height(image, 15)
    assert up.shape == (15, 30, 3) and np.all(up == np.array([10, 200, 30], np.uint8))


def test_resize_interpolates_between_rows():
    image = np.zeros((2, 2, 3), np.uint8)
    image[1] = 200
    out = resize_to_height(image, 4)
    column = out[:, 0, 0].tolist()
    assert column[0] == 0 and column[-1] == 200
    assert column == sorted(column) and 0 < column[1] < 200


def test_hstack_matches_heights_and_keeps_order():
    left = np.full((8, 4, 3), 10, np.uint8)
    right = np.full((4, 6), 200, np.uint8)  # gray, half the height
    out = hstack_rgb([left, right])
    assert out.shape == (4, 2 + 6, 3) and out.flags.c_contiguous
    assert np.all(out[:, :2] == 10) and np.all(out[:, 2:] == 200)


def test_hstack_with_explicit_height():
    out = hstack_rgb([gradient(4, 4), gradient(4, 4)], height=8)
    assert out.shape == (8, 16, 3)


def test_hstack_rejects_empty_and_bad_views():
    with pytest.raises(ValueError, match="at least one"):
        hstack_rgb([])
    with pytest.raises(ValueError, match="NaN"):
        hstack_rgb([gradient(), np.full((4, 4), np.nan)])
    with pytest.raises(ValueError, match="height"):
        hstack_rgb([gradient()], height=0)
