"""The demo's vision pretraining of its tiny base (scripts/lrm_demo/base_vision.py), on a small dataset.

What the frames are labelled with (the simulator's state, the cube-to-target distance, "placed"), which frames
are used, and that pretraining changes the vision tower only and saves a base the adapters can train on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from lrm_demo.base_vision import METRES_TO_TARGET, pretrain_vision, read_frames  # noqa: E402

from lrm_reward.sim.so101_scene import ENV_STATE_NAMES, SUCCESS_RADIUS_M  # noqa: E402

FRAMES = 8
# goal_from_cube at each episode's end: on the target and down; 1 cm off but held 5 cm above it; 10 cm away
ENDINGS = ((0.01, 0.0, 0.0), (0.01, 0.0, -0.05), (0.1, 0.0, 0.0))


def _environment(episode: int, frame: int) -> np.ndarray:
    cube_from_gripper = (0.02 * frame, -0.01 * episode, 0.005)
    far = (0.2, 0.1, 0.0)
    goal_from_cube = ENDINGS[episode] if frame == FRAMES - 1 else far
    return np.asarray([*cube_from_gripper, *goal_from_cube], dtype=np.float32)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Three episodes of 8 frames, images stored in the parquet as the demo records its labelled episodes."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = tmp_path_factory.mktemp("labelled") / "reward_episodes"
    features = {
        "observation.images.front": {"dtype": "image", "shape": (48, 48, 3), "names": ["h", "w", "c"]},
        "observation.environment_state": {"dtype": "float32", "shape": (6,), "names": list(ENV_STATE_NAMES)},
    }
    ds = LeRobotDataset.create("lrm/labelled", fps=10, features=features, root=root, use_videos=False)
    rng = np.random.default_rng(0)
    for episode in range(len(ENDINGS)):
        for frame in range(FRAMES):
            image = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
            ds.add_frame(
                {
                    "observation.images.front": image,
                    "observation.environment_state": _environment(episode, frame),
                    "task": "pick up the cube",
                }
            )
        ds.save_episode()
    ds.finalize()
    return root


def test_frames_are_every_third_and_every_final_one_with_what_the_simulator_knew(recorded):
    images, targets = read_frames([recorded], every=3)
    kept = [0, 3, 6, 7]  # frame 7 is each episode's last
    assert len(images) == len(ENDINGS) * len(kept) == len(targets)
    assert all(image.shape == (48, 48, 3) and image.dtype == np.uint8 for image in images)
    assert targets.shape == (len(images), 8) and targets.dtype == np.float32
    for episode in range(len(ENDINGS)):
        for row, frame in zip(targets[episode * 4 : episode * 4 + 4], kept, strict=True):
            state = _environment(episode, frame)
            np.testing.assert_allclose(row[:6], state * METRES_TO_TARGET, rtol=1e-6)
            np.testing.assert_allclose(row[6], np.hypot(state[3], state[4]) * METRES_TO_TARGET, rtol=1e-6)
    placed = targets[:, 7].reshape(len(ENDINGS), 4)
    # only the episode that ends within the success radius with the cube down counts as placed
    assert placed[:, :3].sum() == 0
    assert placed[:, 3].tolist() == [1.0, 0.0, 0.0]
    assert ENDINGS[0][0] < SUCCESS_RADIUS_M < ENDINGS[2][0]


def test_a_dataset_without_frames_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no recorded frames"):
        read_frames([tmp_path])


def test_pretraining_changes_the_vision_tower_only_and_saves_a_loadable_base(recorded, tiny_lrm, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    images, targets = read_frames([recorded], every=3)
    out = tmp_path / "base"
    made = pretrain_vision(tiny_lrm.base, out, images, targets, steps=3, seed=0)
    assert made["frames"] == len(images) and made["steps"] == 3 and np.isfinite(made["final_loss"])

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            found.update(load_file(file))
        return found

    before, after = weights(tiny_lrm.base), weights(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    vision = {name for name in before if ".visual." in name}
    assert changed and changed <= vision  # the throw-away head is not saved; the language model is untouched
    assert AutoProcessor.from_pretrained(out).image_processor is not None
    # the adapters' base checks accept it: same shape as the tiny base
    from lrm_reward.adaptation.base_model import base_fingerprint

    assert base_fingerprint(str(out)) == base_fingerprint(str(tiny_lrm.base))


def test_the_reward_model_is_the_recipe_on_the_plain_base_with_completion_retrained_on_the_eyes(
    tmp_path, monkeypatch
):
    """train_reward_model's plan, with training, pretraining and frame reading stubbed (they are tested above
    and in tests/adaptation; the quick demo runs them all for real)."""
    import copy

    from lrm_demo import reward_model

    runs = []

    def fake_train(work, config_name, recipe, output="adapters"):
        runs.append((config_name, copy.deepcopy(recipe), output))
        for modality in recipe["modalities"]:
            folder = work / output / modality
            folder.mkdir(parents=True)
            (folder / "trained_on.txt").write_text(recipe["base_model"])
        return work / output

    def fake_pretrain(base_in, base_out, images, targets, steps, seed=0):
        base_out.mkdir(parents=True)
        return {"frames": len(images), "steps": steps, "seed": seed, "from": str(base_in)}

    monkeypatch.setattr(reward_model, "_train", fake_train)
    monkeypatch.setattr(reward_model, "pretrain_vision", fake_pretrain)
    monkeypatch.setattr(reward_model, "read_frames", lambda parts: (["frame"] * 5, np.zeros((5, 8))))
    recipe = {
        "modalities": ["completion", "progress", "contrastive"],
        "init_from": {"progress": "completion", "contrastive": "completion"},
        "per_modality": {"progress": {"max_steps": 1500}, "completion": {"max_steps": 7}},
        "seed": 3,
    }
    before = copy.deepcopy(recipe)
    parts = [tmp_path / "part0", tmp_path / "part1"]
    plain = tmp_path / "tiny_base"
    vision = reward_model.train_reward_model(tmp_path, parts, recipe, plain, vision_steps=11)

    assert recipe == before  # the caller's recipe is not changed
    assert vision == {"frames": 5, "steps": 11, "seed": 3, "from": str(plain)}  # the recipe's seed
    (_, first, out1), (_, second, out2) = runs
    assert out1 == "adapters" and first["base_model"] == str(plain)
    assert first["modalities"] == recipe["modalities"] and first["init_from"] == recipe["init_from"]
    assert out2 != "adapters" and second["base_model"] == str(tmp_path / "base")
    assert second["modalities"] == ["completion"] and second["init_from"] == {}
    assert second["per_modality"] == {"completion": {"max_steps": 7}}
    for run in (first, second):
        assert run["datasets"] == [str(p) for p in parts] and run["seed"] == 3
    adapters = tmp_path / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["completion", "contrastive", "progress"]
    assert (adapters / "completion" / "trained_on.txt").read_text() == str(tmp_path / "base")
    assert (adapters / "progress" / "trained_on.txt").read_text() == str(plain)
    assert not (tmp_path / out2).exists()  # the second run's folder is gone once its adapter moved


def test_what_training_recorded_names_the_cache_folder_once_renamed(tmp_path):
    from lrm_demo.reward_model import _repoint

    scratch, final = tmp_path / "key.abc123", tmp_path / "key"
    (scratch / "adapters" / "completion").mkdir(parents=True)
    (scratch / "data").mkdir()
    meta = scratch / "adapters" / "completion" / "lrm_adapter.json"
    meta.write_text(f'{{"base_model": "{scratch}/base", "other": "/elsewhere"}}')
    recipe = scratch / "reward_train.yaml"
    recipe.write_text(f"output_dir: {scratch}/adapters\n")
    data = scratch / "data" / "sidecar.json"
    data.write_text(f'{{"root": "{scratch}/data"}}')
    _repoint(scratch, final)
    assert meta.read_text() == f'{{"base_model": "{final}/base", "other": "/elsewhere"}}'
    assert recipe.read_text() == f"output_dir: {final}/adapters\n"
    assert data.read_text() == f'{{"root": "{scratch}/data"}}'  # the recordings are not rewritten
