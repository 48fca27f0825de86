#!/usr/bin/env python
"""An experiment for issue 16: does a tiny base whose vision tower first learnt to locate cube and target
make the demo's reward model judge better?

The demo's tiny base has a vision tower trained only on synthetic bars (tiny_model.teach_answer_format), and
its completion adapter learns "cube on the disc" from one "yes" frame per labelled success. The simulator
records, on every frame, where the cube is from the grasp point and the target from the cube
(observation.environment_state). This script trains the base's vision tower, with a throw-away head on its
merged image tokens, to read those six numbers, the cube-to-target distance and "cube within 3 cm of the
target's centre and down" from the labelled episodes' frames (every third frame and every final one), saves
that base, then trains the demo's recipe (config/demo_reward_train.yaml) on it and the same episodes. The
output folder holds base/ and adapters/, which `judge_heldout.py --reward-model <out>` judges on that base.

    python benchmarks/reward_base_pretrain.py --reward-cache .cache/demo_reward/<key> --out out/pretrained

Not part of the demo or the tests (minutes of CPU); the result and what it means: docs/adaptation.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "ros2_ws" / "src" / "lrm_reward"))

SUCCESS_RADIUS_M = 0.03  # the task's success radius (sim/so101_scene.py)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--reward-cache",
        type=Path,
        required=True,
        help="a .cache/demo_reward/<key> folder (its data/ and reward_train.yaml)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for base/ and adapters/")
    p.add_argument("--steps", type=int, default=1500, help="vision pretraining steps (batch 32)")
    p.add_argument("--every", type=int, default=3, help="use every n-th frame (and every final frame)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-train", action="store_true", help="only make the pretrained base")
    return p


def read_frames(datasets: list[Path], every: int):
    """(images, targets): frames of the labelled episodes and what the simulator knew about each."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    columns = ["observation.images.front", "observation.environment_state", "episode_index", "frame_index"]
    images, targets = [], []
    for dataset in datasets:
        for path in sorted(dataset.glob("data/*/*.parquet")):
            table = pq.read_table(path, columns=columns).to_pydict()
            n = len(table["frame_index"])
            for i in range(n):
                final = i == n - 1 or table["episode_index"][i + 1] != table["episode_index"][i]
                if table["frame_index"][i] % every and not final:
                    continue
                image = table["observation.images.front"][i]["bytes"]
                images.append(np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
                state = np.asarray(table["observation.environment_state"][i], dtype=np.float32)
                distance = float(np.hypot(state[3], state[4]))  # goal minus cube, in the table's plane
                down = -state[5] < SUCCESS_RADIUS_M
                placed = float(distance < SUCCESS_RADIUS_M and down)
                targets.append(np.concatenate([state * 10, [distance * 10, placed]]))  # dm: numbers near 1
    return images, np.stack(targets).astype(np.float32)


def pretrain_vision(base_in: Path, base_out: Path, images, targets, steps: int, seed: int) -> None:
    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    processor = AutoProcessor.from_pretrained(base_in)
    model = Qwen3VLForConditionalGeneration.from_pretrained(base_in, dtype=torch.float32)
    visual = model.model.visual
    grid = processor.image_processor(images=images[:1], return_tensors="pt")["image_grid_thw"][0]
    tokens = int(grid.prod()) // visual.spatial_merge_size**2  # every frame has the demo's size
    width = model.config.text_config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(tokens * width, 128), torch.nn.GELU(), torch.nn.Linear(128, targets.shape[1])
    )
    optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=1e-3)
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(targets)
    batch = 32
    visual.train()
    bar = tqdm(range(steps), desc="vision: locate cube and target", unit="step")
    for _ in bar:
        idx = rng.integers(0, len(images), batch)
        pixels = processor.image_processor(images=[images[i] for i in idx], return_tensors="pt")
        out = visual(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"])
        merged = out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]
        pred = head(merged.reshape(batch, -1))
        y = target[idx]
        loss = torch.nn.functional.mse_loss(pred[:, :-1], y[:, :-1])
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(pred[:, -1], y[:, -1])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.save_pretrained(base_out, safe_serialization=True)
    processor.save_pretrained(base_out)


def main(argv: list[str] | None = None) -> int:
    import json

    import torch
    import yaml

    args = build_arg_parser().parse_args(argv)
    recipe_file = args.reward_cache / "reward_train.yaml"
    if not recipe_file.is_file():
        raise SystemExit(
            f"{args.reward_cache}: no reward_train.yaml (give a .cache/demo_reward/<key> folder)"
        )
    made = yaml.safe_load(recipe_file.read_text())
    datasets = sorted((args.reward_cache / "data").glob("part*/reward_episodes"))
    if not datasets:
        raise SystemExit(f"{args.reward_cache}/data: no labelled episodes (part*/reward_episodes)")
    torch.set_num_threads(1)  # the demo's setting: a tiny model on a shared 2-core CPU
    t0 = time.monotonic()
    images, targets = read_frames(datasets, args.every)
    print(f"{len(images)} frames of {len(datasets)} datasets", file=sys.stderr)
    base = args.out / "base"
    pretrain_vision(Path(made["base_model"]), base, images, targets, args.steps, args.seed)
    print(f"pretrained base in {time.monotonic() - t0:.0f} s: {base}", file=sys.stderr)
    if args.no_train:
        return 0
    from lrm_reward.adaptation import train

    recipe = yaml.safe_load((REPO / "config" / "demo_reward_train.yaml").read_text())
    recipe.update(
        base_model=str(base), datasets=[str(d) for d in datasets], output_dir=str(args.out / "adapters")
    )
    config = args.out / "reward_train.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = train.main(["--config", str(config)])
    (args.out / "made.json").write_text(json.dumps({"wall_s": time.monotonic() - t0, "train_exit": code}))
    return code


if __name__ == "__main__":
    sys.exit(main())
