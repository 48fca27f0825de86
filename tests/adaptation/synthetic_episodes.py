"""A small synthetic episode set for the adaptation tests: a red block slides toward a green target.

Successful episodes move the block from the left edge onto the target (it ends covering it); failed ones
stop short or wander in the left half. Frames are 64x64 RGB with a little noise, stored as PNG inside the
LeRobotDataset (no video codec). Labels: recorder-style sidecars, a ``next.success`` feature, or none.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SIZE = 64
BLOCK = 16
TARGET_X = SIZE - BLOCK - 2  # the block's x when it covers the target
TASK = "push the red block onto the green target"


def block_positions(kind: str, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """x of the block per frame. success: 2 -> TARGET_X; short: stops at a third to half; wander."""
    t = np.linspace(0.0, 1.0, n_frames)
    if kind == "success":
        xs = 2 + (TARGET_X - 2) * t
    elif kind == "short":
        stop = rng.uniform(0.3, 0.5) * TARGET_X
        xs = 2 + (stop - 2) * np.minimum(1.0, t / 0.6)
    elif kind == "wander":
        xs = 2 + rng.uniform(6, 14) * (1 - np.cos(2 * np.pi * t * rng.uniform(1.0, 2.0)))
    else:
        raise ValueError(kind)
    return np.clip(np.rint(xs), 0, TARGET_X).astype(int)


def render(x: int, y: int, rng: np.random.Generator) -> np.ndarray:
    frame = np.full((SIZE, SIZE, 3), 225, dtype=np.int16)  # bright table
    frame[:, : x + BLOCK // 2] = (45, 45, 55)  # the dark cloth the block drags along
    ty = (SIZE - BLOCK) // 2
    frame[ty : ty + BLOCK, TARGET_X : TARGET_X + BLOCK] = (40, 200, 60)
    frame[y : y + BLOCK, x : x + BLOCK] = (220, 40, 40)
    frame += rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
    return np.clip(frame, 0, 255).astype(np.uint8)


def write_block_dataset(
    root: Path,
    n_success: int = 6,
    n_failure: int = 4,
    n_frames: int = 20,
    labels: str = "sidecar",
    seed: int = 0,
    extra_short_episodes: int = 0,
    repo_id: str = "lrm/synthetic_blocks",
) -> dict[int, bool]:
    """Write the dataset; returns episode_index -> success. labels: "sidecar" | "feature" | "none"."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rng = np.random.default_rng(seed)
    features = {
        "observation.images.front": {
            "dtype": "image",
            "shape": (SIZE, SIZE, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (1,), "names": ["block_x"]},
        "action": {"dtype": "float32", "shape": (1,), "names": ["push"]},
    }
    if labels == "feature":
        features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    ds = LeRobotDataset.create(
        repo_id, fps=10, features=features, root=root, use_videos=False, image_writer_threads=0
    )
    kinds = ["success"] * n_success + [("short", "wander")[i % 2] for i in range(n_failure)]
    kinds = [kinds[i] for i in rng.permutation(len(kinds))] + ["success"] * extra_short_episodes
    outcomes: dict[int, bool] = {}
    for index, kind in enumerate(kinds):
        frames = n_frames if index < n_success + n_failure else 4
        xs = block_positions(kind, frames, rng)
        y = (SIZE - BLOCK) // 2 + int(rng.integers(-3, 4))
        for k, x in enumerate(xs):
            frame = {
                "observation.images.front": render(int(x), y, rng),
                "observation.state": np.array([x / TARGET_X], dtype=np.float32),
                "action": np.array([1.0], dtype=np.float32),
                "task": TASK,
            }
            if labels == "feature":
                frame["next.success"] = np.array([kind == "success" and k == len(xs) - 1])
            ds.add_frame(frame)
        ds.save_episode()
        outcomes[index] = kind == "success"
    ds.finalize()
    if labels == "sidecar":
        folder = root / "recording"
        folder.mkdir(parents=True, exist_ok=True)
        for index, success in outcomes.items():
            sidecar = {
                "schema": "lrm.episode/1",
                "episode_index": index,
                "task": TASK,
                "outcome": "success" if success else "failure",
            }
            (folder / f"episode_{index:06d}.json").write_text(json.dumps(sidecar))
    return outcomes
