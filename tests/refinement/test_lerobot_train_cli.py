"""Stock `lerobot-train` (the console script, unmodified) trains on a dataset the recorder wrote: video
camera, named state, environment state and the reward.* extras; offline, CPU, 2 steps of a tiny ACT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from recorder_scenarios import make_recorder
from synthetic_streams import feed_episode

LEROBOT_TRAIN = Path(sys.executable).parent / "lerobot-train"


@pytest.mark.skipif(not LEROBOT_TRAIN.exists(), reason="lerobot-train console script not installed")
def test_stock_lerobot_train_runs_on_a_recorded_dataset(tmp_path):
    rec = make_recorder(tmp_path / "data", environment_state_names=("cube_x", "cube_y"))
    for i in range(2):
        rec.start(f"stack the cups {i}")
        feed_episode(rec, t_start=100.0 * i, duration_s=2.0)
        for t in np.arange(0.0, 2.0, 0.05):
            rec.add_environment_state(100.0 * i + t, [t, -t])
        assert rec.stop("success").status.value == "saved"
    rec.close()

    out = tmp_path / "train"
    argv = [
        str(LEROBOT_TRAIN),
        "--dataset.repo_id=lrm/run",
        f"--dataset.root={tmp_path / 'data' / 'run'}",
        "--policy.type=act",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        "--policy.pretrained_backbone_weights=null",  # nothing to download
        "--policy.dim_model=32",
        "--policy.n_heads=2",
        "--policy.dim_feedforward=32",
        "--policy.n_encoder_layers=1",
        "--policy.n_decoder_layers=1",
        "--policy.chunk_size=4",
        "--policy.n_action_steps=4",
        "--wandb.enable=false",
        "--steps=2",
        "--batch_size=2",
        "--num_workers=0",
        "--save_freq=2",
        f"--output_dir={out}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "dataset.num_episodes=2" in log
    model = out / "checkpoints" / "000002" / "pretrained_model"
    assert (model / "model.safetensors").stat().st_size > 0
    config = json.loads((model / "config.json").read_text())
    assert set(config["input_features"]) == {
        "observation.images.front",
        "observation.state",
        "observation.environment_state",
    }
    assert list(config["output_features"]) == ["action"]
