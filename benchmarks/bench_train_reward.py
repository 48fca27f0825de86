"""Adapter training per precision mode (lrm-train-reward) on the tiny model, printed as a table.

Trains the three adapters on the synthetic block/cloth episodes of tests/adaptation with each precision
mode the device supports (float32; bf16 autocast and fp16 autocast + gradient scaler on CUDA), then scores
the held-out episodes through the engine: train time, final losses and the held-out metrics per mode.
The frames are rendered in memory, so it runs where lerobot is not installed (e.g. the GPU machine).
Not a test: nothing is asserted.

    python benchmarks/bench_train_reward.py [--device cuda] [--steps 30] [--work /tmp/bench_train_reward]
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(ROOT / "tests" / "adaptation"))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
from synthetic_episodes import BLOCK, SIZE, TASK, block_positions, render  # noqa: E402

from lrm_reward.adaptation import evaluate as E  # noqa: E402
from lrm_reward.adaptation import samples as S  # noqa: E402
from lrm_reward.adaptation import train as T  # noqa: E402
from lrm_reward.core.tiny_model import build_tiny_lrm  # noqa: E402


class MemoryFrames:
    """Stands in for samples.FrameStore: frames rendered once per episode, kept in memory."""

    def __init__(self, frames: dict[S.EpisodeKey, list[np.ndarray]]) -> None:
        self.frames = frames

    def frame(self, episode: S.Episode, t: int) -> np.ndarray:
        return self.frames[episode.key][t]


def synthetic_episode_set(n_success: int, n_failure: int, n_frames: int, seed: int) -> S.EpisodeSet:
    rng = np.random.default_rng(seed)
    kinds = ["success"] * n_success + [("short", "wander")[i % 2] for i in range(n_failure)]
    episodes, frames = [], {}
    for index, kind in enumerate(kinds[i] for i in rng.permutation(len(kinds))):
        key = S.EpisodeKey(0, index)
        y = (SIZE - BLOCK) // 2 + int(rng.integers(-3, 4))
        frames[key] = [render(int(x), y, rng) for x in block_positions(kind, n_frames, rng)]
        episodes.append(S.Episode(key, TASK, index * n_frames, n_frames, kind == "success", "memory"))
    return S.EpisodeSet(episodes, collections.Counter(), MemoryFrames(frames))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_train_reward"))
    args = parser.parse_args()

    import torch

    tiny = build_tiny_lrm(args.work / "tiny")
    episode_set = synthetic_episode_set(12, 5, 16, seed=1)
    S.load_episodes = lambda specs, cfg: episode_set  # the in-memory set replaces reading LeRobotDatasets
    modes = [("no", "float32")]
    if args.device.startswith("cuda"):
        modes += [("bf16", "bfloat16"), ("fp16", "float32")]
    rows = []
    for mixed, dtype in modes:
        out = args.work / f"adapters_{mixed}_{dtype}"
        cfg = T.TrainConfig(
            base_model=str(tiny.base),
            datasets=[{"root": str(args.work / "in_memory")}],
            output_dir=out,
            max_steps=args.steps,
            batch_size=8,
            learning_rate=5e-3,
            lora_dropout=0.0,
            per_modality={"contrastive": {"max_steps": args.steps + 16, "learning_rate": 1e-2}},
            samples={"contrastive_min_gap": 0.4, "contrastive_per_episode": 6, "voc_frames": 8},
            mixed_precision=mixed,
            dtype=dtype,
            device=args.device,
            save_every=10,
        )
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = T.train(cfg, restart=True, show_progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses = {r.modality.value: r.final_loss for r in result.modalities}
        report = E.evaluate(
            E.EvalConfig(
                base_model=str(tiny.base),
                adapter_sets={"trained": str(out), "untrained": "none"},
                output_dir=out / "report",
                split_from=out,
                device=args.device if args.device != "auto" else "cpu",
            )
        )
        rows.append((f"{mixed}/{dtype}", seconds, losses, report["results"]))

    print(
        f"\n{platform.node()} torch {torch.__version__} device {args.device}"
        f" ({torch.cuda.get_device_name(0) if args.device.startswith('cuda') else platform.processor()})"
    )
    header = (
        f"{'precision':<16}{'train s':>9}{'loss p/c/c':>20}{'VOC':>14}{'compl acc':>14}"
        f"{'compl ECE':>14}{'contr acc':>14}"
    )
    print(header + "\n" + "-" * len(header))
    for name, seconds, losses, results in rows:
        new, old = results["trained"], results["untrained"]

        def pair(key, new=new, old=old):
            return f"{new[key]:.2f} ({old[key]:.2f})"

        loss = "/".join(f"{losses[m]:.3f}" for m in T.ADAPTER_LAYOUT)
        print(
            f"{name:<16}{seconds:>9.1f}{loss:>20}{pair('voc'):>14}{pair('completion_accuracy'):>14}"
            f"{pair('completion_ece'):>14}{pair('contrastive_accuracy'):>14}"
        )
    print("metrics: trained (untrained base) on held-out episodes")


if __name__ == "__main__":
    main()
