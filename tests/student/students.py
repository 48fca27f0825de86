"""The student tests' shared data: the recorded night's episodes, and untrained students written in the store
layout (for the loading and between tests; no lerobot)."""

from __future__ import annotations

from pathlib import Path

import torch

from lrm_reward.student import store
from lrm_reward.student.model import StudentArch, StudentNet

TASK = "stack the cups"
OTHER_TASK = "open the drawer"
# The recorded night: (task, final brightness); successes end above 150 (the stand-in teacher's threshold)
EPISODES = [(TASK, level) for level in (220, 60, 240, 200, 90, 230, 120, 210)] + [(OTHER_TASK, 230)]


def write_student(
    root: Path,
    task: str = TASK,
    camera: str = "front",
    source_shape: tuple[int, int] = (48, 64),
    arch: StudentArch | None = None,
    seed: int = 0,
) -> Path:
    arch = arch or StudentArch(image_size=32, widths=(8, 16))
    torch.manual_seed(seed)
    net = StudentNet(arch)
    config = {
        "task": task,
        "camera": {"name": camera, "source_shape": list(source_shape)},
        "arch": arch.to_json(),
        "completion_threshold": 0.5,
        "validation": {},
    }
    return store.write_version(root, net.state_dict(), config)
