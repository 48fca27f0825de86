"""The tiny base's eyes: its vision tower first learns where cube and target are, then the adapters train.

Qwen3-VL-8B comes to the task having seen billions of images: it already finds a cube and a green disc in a
frame. The demo's tiny stand-in has only seen synthetic bars (tiny_model.teach_answer_format), and its
completion adapter, learning "cube on the disc" from one "yes" frame per labelled success, ended up calling
failures that left the cube far from the target done (docs/adaptation.md, "A vision tower that first learnt
where cube and target are"). So the demo gives the tiny base a little of that pretraining: on the labelled
episodes' frames, the vision tower, with a throw-away head on its merged image tokens, regresses what the
simulator knew about each frame (observation.environment_state: the cube from the grasp point, the target
from the cube), the cube-to-target distance and "cube within the success radius and down". The adapters then
learn from the labelled episodes as before, on this base. The simulator's state only teaches the eyes here;
on a real robot the 8B's own pretraining does this part.

Part of the reward model's cache key (reward_model.py).
"""

from __future__ import annotations

import io
from pathlib import Path

VISION_PRETRAIN_STEPS = 1500  # batch 32; ~6 min on one core of the 2-core build machine
VISION_PRETRAIN_BATCH = 32
VISION_PRETRAIN_EVERY = 3  # every third frame and every episode's final one
VISION_PRETRAIN_LR = 1e-3
# Distances in decimetres: targets near 1, so the squared error weighs them like the 0/1 "placed" logit.
METRES_TO_TARGET = 10.0


def read_frames(datasets: list[Path], every: int = VISION_PRETRAIN_EVERY):
    """(images, targets) of the recorded episodes: every n-th frame and every final one, and per frame the
    simulator's environment state, the cube-to-target distance in the table's plane and "placed" (0/1)."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from lrm_reward.sim.so101_scene import SUCCESS_RADIUS_M

    columns = ["observation.images.front", "observation.environment_state", "episode_index", "frame_index"]
    images, targets = [], []
    for dataset in datasets:
        files = sorted(Path(dataset).glob("data/*/*.parquet"))
        if not files:
            raise FileNotFoundError(f"{dataset}: no recorded frames (data/*/*.parquet)")
        for path in files:
            table = pq.read_table(path, columns=columns).to_pydict()
            n = len(table["frame_index"])
            for i in range(n):
                final = i == n - 1 or table["episode_index"][i + 1] != table["episode_index"][i]
                if table["frame_index"][i] % every and not final:
                    continue
                image = table["observation.images.front"][i]["bytes"]
                images.append(np.array(Image.open(io.BytesIO(image)).convert("RGB")))
                state = np.asarray(table["observation.environment_state"][i], dtype=np.float32)
                distance = float(np.hypot(state[3], state[4]))  # goal minus cube, in the table's plane
                down = -state[5] < SUCCESS_RADIUS_M
                placed = float(distance < SUCCESS_RADIUS_M and down)
                scaled = [*(state * METRES_TO_TARGET), distance * METRES_TO_TARGET, placed]
                targets.append(np.asarray(scaled, dtype=np.float32))
    return images, np.stack(targets).astype(np.float32)


def pretrain_vision(base_in: Path, base_out: Path, images, targets, steps: int, seed: int = 0) -> dict:
    """Train base_in's vision tower to read targets from images; save the whole base to base_out.

    One CPU thread, as the reward recipe trains (cpu_threads: 1): the same numbers on every machine kind
    the thread count would otherwise change. Returns the wall time and the last batch's loss."""
    import time

    import numpy as np
    import torch
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from lrm_reward.adaptation.train_modality import merged_image_tokens

    if not images:
        raise ValueError("no frames to pretrain the vision tower on")
    t0 = time.monotonic()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        processor = AutoProcessor.from_pretrained(base_in)
        model = Qwen3VLForConditionalGeneration.from_pretrained(base_in, dtype=torch.float32)
        visual = model.model.visual
        grid = processor.image_processor(images=images[:1], return_tensors="pt")["image_grid_thw"][0]
        tokens = int(grid.prod()) // visual.spatial_merge_size**2  # every frame of a run has one size
        width = model.config.text_config.hidden_size
        head = torch.nn.Sequential(
            torch.nn.Linear(tokens * width, 128), torch.nn.GELU(), torch.nn.Linear(128, targets.shape[1])
        )
        optimizer = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=VISION_PRETRAIN_LR)
        rng = np.random.default_rng(seed)
        target = torch.from_numpy(targets)
        batch = VISION_PRETRAIN_BATCH
        visual.train()
        loss = torch.tensor(float("nan"))
        bar = tqdm(range(steps), desc="reward: base vision (locate cube and target)", unit="step")
        for _ in bar:
            idx = rng.integers(0, len(images), batch)
            pixels = processor.image_processor(images=[images[i] for i in idx], return_tensors="pt")
            merged = merged_image_tokens(visual, pixels["pixel_values"], pixels["image_grid_thw"])
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
    finally:
        torch.set_num_threads(threads)
    return {
        "frames": len(images),
        "steps": steps,
        "final_loss": float(loss.detach()),
        "wall_s": time.monotonic() - t0,
    }
