"""The distilled reward student: a small CNN that maps (frame, episode's first frame) to progress and
completion at camera rate on one CPU core.

What it is for: between two reward-model queries the reward node repeats a stale value (interval-hold);
arXiv 2603.16065 names "a more distilled, lightweight reward head" as the way past that. This network is
that head, trained by ``lrm-distill`` on the teacher's own answers (``train.py``).

Shape of the model (why):
- one shared encoder for the current frame and the episode's first frame, so the first frame's embedding
  is computed once per episode and every later frame costs one encoder pass (the teacher's progress
  query is also [initial frame, frame]: progress is relative to where the episode started);
- plain 3x3 convolutions with stride 2 and batch norm (folded into the convolutions for inference), no
  depthwise convolutions: on one CPU thread PyTorch's dense 3x3 kernels are the fastest per FLOP at these
  tiny widths;
- the pooled features are the channel means plus a spatial softmax (expected x, y of every channel,
  Levine et al. 2016, "End-to-End Training of Deep Visuomotor Policies"): progress in pick-and-place is
  mostly *where* the gripper and the object are, which a plain global average forgets;
- a two-logit head (progress, completion) on [z, z0, z - z0]; sigmoid gives both in [0, 1].

What it is not: no image decoding and no file handling (``loading.py``), no task conditioning (one
student per task and camera; docs/student.md says why). ``resize_frames`` here is the one resize shared by
training and inference. torch only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

ARCH_NAME = "lrm-student-cnn/1"
PROGRESS, COMPLETION = 0, 1  # columns of the head's output


@dataclass(frozen=True)
class StudentArch:
    """Hyper-parameters of the network; stored in the student's config.json."""

    image_size: int = 96  # frames are resized to image_size x image_size (aspect ratio not kept)
    widths: tuple[int, ...] = (16, 32, 64, 96)  # channels of the stride-2 stages (total stride 2**len)
    head_hidden: int = 64
    use_initial_frame: bool = True  # condition on the episode's first frame (as the teacher's query does)

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not 16 <= self.image_size <= 512:
            raise ValueError(f"StudentArch.image_size must be in [16, 512], got {self.image_size}")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"StudentArch.widths must be positive channel counts, got {self.widths}")
        if self.image_size // 2 ** len(self.widths) < 1:
            raise ValueError(
                f"StudentArch: {len(self.widths)} stride-2 stages leave nothing of "
                f"a {self.image_size} px image"
            )
        if self.head_hidden < 1:
            raise ValueError("StudentArch.head_hidden must be >= 1")

    def to_json(self) -> dict:
        return {"name": ARCH_NAME, **asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_json(cls, data: dict) -> StudentArch:
        if data.get("name") != ARCH_NAME:
            raise ValueError(
                f"unknown student architecture {data.get('name')!r} (this code knows {ARCH_NAME})"
            )
        known = {"image_size", "widths", "head_hidden", "use_initial_frame"}
        return cls(**{k: v for k, v in data.items() if k in known})


class SpatialSoftmax(nn.Module):
    """Per channel, the softmax-weighted mean position (x, y in [-1, 1]) of its activation map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        attention = torch.softmax(x.flatten(2), dim=-1).view(b, c, h, w)
        ys = torch.linspace(-1.0, 1.0, h, dtype=x.dtype, device=x.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=x.dtype, device=x.device)
        ex = (attention.sum(dim=2) * xs).sum(dim=-1)
        ey = (attention.sum(dim=3) * ys).sum(dim=-1)
        return torch.cat([ex, ey], dim=1)


def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class StudentNet(nn.Module):
    """frames (B, 3, S, S) float in [0, 1] [+ initial frames] -> logits (B, 2): progress, completion."""

    def __init__(self, arch: StudentArch) -> None:
        super().__init__()
        self.arch = arch
        stages, cin = [], 3
        for width in arch.widths:
            stages.append(_stage(cin, width))
            cin = width
        self.encoder = nn.Sequential(*stages)
        self.pool = SpatialSoftmax()
        self.embed_dim = 3 * cin  # channel means + (x, y) per channel
        head_in = 3 * self.embed_dim if arch.use_initial_frame else self.embed_dim
        self.head = nn.Sequential(
            nn.Linear(head_in, arch.head_hidden), nn.ReLU(inplace=True), nn.Linear(arch.head_hidden, 2)
        )
        # ImageNet statistics: a fixed, documented input normalisation (no per-dataset state to carry)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, embed_dim)."""
        x = self.encoder((frames - self.mean) / self.std)
        return torch.cat([x.mean(dim=(2, 3)), self.pool(x)], dim=1)

    def head_logits(self, z: torch.Tensor, z0: torch.Tensor | None) -> torch.Tensor:
        if self.arch.use_initial_frame:
            if z0 is None:
                raise ValueError("this student conditions on the episode's first frame: give its embedding")
            z0 = z0.expand_as(z)
            z = torch.cat([z, z0, z - z0], dim=1)
        return self.head(z)

    def forward(self, frames: torch.Tensor, initial: torch.Tensor | None = None) -> torch.Tensor:
        z = self.embed(frames)
        z0 = self.embed(initial) if initial is not None and self.arch.use_initial_frame else None
        return self.head_logits(z, z0)


def fold_batch_norm(net: StudentNet) -> StudentNet:
    """Fold every BatchNorm of the encoder into the convolution before it (inference only, same outputs).

    Saves one pass over every activation map per stage, ~15-25% of the encoder's time at 96 px.
    """
    net.eval()
    stages = []
    for stage in net.encoder:
        conv, bn = stage[0], stage[1]
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride=2, padding=1, bias=True)
        with torch.no_grad():
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(bn.bias - bn.running_mean * scale)
        stages.append(nn.Sequential(fused, nn.ReLU(inplace=True)))
    net.encoder = nn.Sequential(*stages)
    return net


def resize_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> uint8 (B, 3, S, S): the one resize used in training and inference.

    Bilinear with antialiasing (a box-like filter when shrinking), so a 640x480 camera frame and a
    recorded frame of the same scene give the same input. It runs on the uint8 channels-last view
    (PyTorch's vectorised uint8 kernel: ~0.15 ms for 640x480 -> 96 px on one core, ten times the float
    path), so training can keep its frames as small uint8 arrays.
    """
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"resize_frames wants uint8 (B, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
    x = frames.permute(0, 3, 1, 2)  # a channels-last view, no copy
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    return x.contiguous()


def to_input(resized: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, S, S) from resize_frames -> the network's float input in [0, 1]."""
    return resized.float().div_(255.0)


def preprocess(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, S, S) in [0, 1]."""
    return to_input(resize_frames(frames, image_size))
