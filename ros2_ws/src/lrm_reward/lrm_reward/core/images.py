"""Image normalisation for the reward model: any camera-like array -> contiguous HxWx3 uint8 RGB.

The model's processor wants RGB uint8; cameras and simulators hand over grayscale, RGBA, 16-bit and float
arrays. This module turns those into one format with a clear ValueError on anything it cannot read, and
joins several camera views side by side for a fused multi-camera query.

Not for ROS messages (see ``lrm_reward.ros.image_conversion``) and not for resizing to the model's input
size (the model's processor does that). numpy only, so the core stays importable on a bare GPU server.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Float images are either in [0, 1] or in [0, 255]; a little slack absorbs rounding from resampling.
_FLOAT_SLACK = 1e-3


def to_rgb_uint8(array: np.ndarray) -> np.ndarray:
    """Return ``array`` as a C-contiguous HxWx3 uint8 RGB image.

    Accepted: HxW, HxWx1 (gray, replicated to 3 channels), HxWx3 (RGB), HxWx4 (RGBA, alpha dropped) of
    uint8, uint16 (high byte kept: 65535 -> 255), other integer types holding 0..255, or floats in [0, 1]
    (scaled by 255) or [0, 255] (a float image whose maximum is <= 1 is read as [0, 1]).
    An input that is already contiguous HxWx3 uint8 is returned as is, without a copy.

    Raises ValueError naming the problem for: non-arrays, wrong ndim or channel count, zero-size images,
    NaN/inf, out-of-range values, and unsupported dtypes (bool, complex, object).
    """
    if not isinstance(array, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(array).__name__}")
    if array.ndim not in (2, 3):
        raise ValueError(f"image must be HxW or HxWxC, got an array of shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"image is empty (shape {array.shape})")
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must have 1, 3 or 4 channels, got {array.shape[2]} (shape {array.shape})")

    pixels = _to_uint8_values(array)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels == 1:
        gray = pixels[:, :, 0]
        rgb = np.empty((*gray.shape, 3), dtype=np.uint8)
        for channel in range(3):  # one strided copy per channel: ~3x faster than np.repeat here
            rgb[:, :, channel] = gray
        return rgb
    if channels == 4:
        pixels = pixels[:, :, :3]
    return np.ascontiguousarray(pixels)


def _to_uint8_values(array: np.ndarray) -> np.ndarray:
    """Map the value range of ``array`` onto uint8, keeping its shape."""
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order
        # Keep the high byte: the usual way to view 16-bit mono images on an 8-bit display.
        return (array.astype(np.uint16) >> 8).astype(np.uint8)
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"integer image of dtype {array.dtype} must hold values in 0..255, got {low}..{high}"
            )
        return array.astype(np.uint8)
    if kind == "f":
        # NaN and inf propagate into min/max, which saves a separate isfinite pass over the image.
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("float image contains NaN or inf values")
        if low < -_FLOAT_SLACK or high > 255.0 + _FLOAT_SLACK:
            raise ValueError(f"float image must be in [0, 1] or [0, 255], got values in [{low:g}, {high:g}]")
        scale = 255.0 if high <= 1.0 + _FLOAT_SLACK else 1.0
        scaled = array.astype(np.float32) * np.float32(scale)
        np.clip(scaled, 0.0, 255.0, out=scaled)
        scaled += np.float32(0.5)  # round half up, then truncate
        return scaled.astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}: use uint8, uint16 or float")


def resize_to_height(rgb: np.ndarray, height: int) -> np.ndarray:
    """Bilinear resize of an HxWx3 uint8 image to ``height`` rows, keeping the aspect ratio.

    numpy only (no OpenCV in the core). Intended for joining camera views, not for model preprocessing.
    """
    if height < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    src_h, src_w = rgb.shape[:2]
    if src_h == height:
        return rgb
    width = max(1, round(src_w * height / src_h))
    rows = _sample_positions(src_h, height)
    cols = _sample_positions(src_w, width)
    r0, r1, rw = rows
    c0, c1, cw = cols
    image = rgb.astype(np.float32)
    top = image[r0] * (1.0 - rw)[:, None, None] + image[r1] * rw[:, None, None]
    out = top[:, c0] * (1.0 - cw)[None, :, None] + top[:, c1] * cw[None, :, None]
    return np.ascontiguousarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _sample_positions(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights for bilinear sampling with pixel centres aligned."""
    centres = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    centres = np.clip(centres, 0.0, src - 1)
    lower = np.floor(centres).astype(np.intp)
    upper = np.minimum(lower + 1, src - 1)
    return lower, upper, (centres - lower).astype(np.float32)


def hstack_rgb(images: Sequence[np.ndarray], height: int | None = None) -> np.ndarray:
    """Join camera views left to right into one HxWx3 uint8 image for a fused multi-camera query.

    Every view goes through ``to_rgb_uint8`` and is resized (aspect kept) to ``height``, which defaults to
    the smallest view height, so no view is upsampled unless asked for.
    """
    if len(images) == 0:
        raise ValueError("hstack_rgb needs at least one image")
    views = [to_rgb_uint8(image) for image in images]
    target = min(view.shape[0] for view in views) if height is None else int(height)
    if target < 1:
        raise ValueError(f"height must be >= 1, got {height}")
    return np.ascontiguousarray(np.hstack([resize_to_height(view, target) for view in views]))
