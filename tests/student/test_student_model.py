"""The student network: its configuration checks, inference-time batch-norm folding, the shared resize,
position awareness, and that the modules the reward node needs import without ROS or lerobot."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from lrm_reward.student.model import (
    ARCH_NAME,
    SpatialSoftmax,
    StudentArch,
    StudentNet,
    fold_batch_norm,
    preprocess,
    resize_frames,
)

SRC = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"


def test_arch_is_validated_and_round_trips():
    arch = StudentArch(image_size=64, widths=[8, 16, 32], head_hidden=16, use_initial_frame=False)
    assert arch.widths == (8, 16, 32)
    data = arch.to_json()
    assert data["name"] == ARCH_NAME
    assert StudentArch.from_json(data) == arch
    with pytest.raises(ValueError, match="unknown student architecture"):
        StudentArch.from_json({**data, "name": "resnet"})
    with pytest.raises(ValueError, match="image_size"):
        StudentArch(image_size=8)
    with pytest.raises(ValueError, match="leave nothing"):
        StudentArch(image_size=16, widths=(4, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="widths"):
        StudentArch(widths=())


def test_folding_batch_norm_keeps_the_outputs():
    torch.manual_seed(0)
    net = StudentNet(StudentArch(image_size=32, widths=(8, 16)))
    net.train()
    with torch.no_grad():  # give the batch norms non-trivial running statistics
        for _ in range(5):
            net(torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32))
    net.eval()
    x, x0 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = net(x, x0)
        after = fold_batch_norm(net)(x, x0)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_initial_frame_is_required_when_conditioned_on():
    net = StudentNet(StudentArch(image_size=32, widths=(8,))).eval()
    with pytest.raises(ValueError, match="first frame"):
        net.head_logits(net.embed(torch.rand(1, 3, 32, 32)), None)
    plain = StudentNet(StudentArch(image_size=32, widths=(8,), use_initial_frame=False)).eval()
    assert plain(torch.rand(2, 3, 32, 32)).shape == (2, 2)


def test_resize_matches_the_float_reference_and_checks_its_input():
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(rng.integers(0, 256, (2, 120, 160, 3), dtype=np.uint8))
    fast = preprocess(frame, 48)
    reference = F.interpolate(
        frame.permute(0, 3, 1, 2).float() / 255.0, size=(48, 48), mode="bilinear", antialias=True
    )
    assert fast.shape == (2, 3, 48, 48) and fast.dtype == torch.float32
    assert float((fast - reference).abs().max()) <= 2.0 / 255.0  # uint8 rounding only
    assert resize_frames(frame[:, :48, :48], 48).shape == (2, 3, 48, 48)  # already the size: no resampling
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frame.float(), 48)
    with pytest.raises(ValueError, match="uint8"):
        resize_frames(frame[..., :2], 48)


def test_spatial_softmax_finds_where_activation_is():
    maps = torch.full((1, 1, 9, 9), -30.0)
    maps[0, 0, 2, 8] = 30.0  # row 2 of 9, last column
    x, y = SpatialSoftmax()(maps)[0].tolist()
    assert x == pytest.approx(1.0, abs=1e-3)
    assert y == pytest.approx(-0.5, abs=1e-3)


PROBE = r"""
import importlib, importlib.abc, sys

BLOCKED = ("rclpy", "lerobot", "rosidl_runtime_py", "sensor_msgs", "std_msgs", "lrm_interfaces",
           "builtin_interfaces", "diagnostic_msgs", "launch", "launch_ros", "datasets")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the reward node's student code must not need it")
        return None

sys.meta_path.insert(0, Block())
for name in ("model", "store", "loading", "between"):
    importlib.import_module("lrm_reward.student." + name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("ok")
"""


def test_serving_modules_import_without_ros_or_lerobot():
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
