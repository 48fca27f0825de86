"""Test-wide settings: everything offline, no experiment trackers, the source tree first on sys.path
(pyproject.toml), and shared fixtures (the tiny reward model)."""

import os

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_lrm(tmp_path_factory):
    """A tiny Qwen3-VL + progress/contrastive/completion LoRA adapters, built once per session, offline."""
    from lrm_reward.core.tiny_model import build_tiny_lrm

    return build_tiny_lrm(tmp_path_factory.mktemp("tiny_lrm"), seed=0)
