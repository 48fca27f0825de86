"""Test-wide settings: everything offline, no experiment trackers, the source tree first on sys.path
(pyproject.toml), and shared fixtures (the tiny reward model)."""

import logging
import os
from pathlib import Path

for _name, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_name, _value)


import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY_CACHE = REPO / ".cache" / "tiny_lrm"


@pytest.fixture(scope="session")
def tiny_lrm():
    """A tiny Qwen3-VL + progress/contrastive/completion LoRA adapters, built offline.

    Building it teaches the answer format (a minute of CPU), so it is cached under .cache/tiny_lrm, keyed by
    tiny_model.cache_key: the source of tiny_model.py, its build format, the seed and the versions of torch,
    transformers, peft, tokenizers, safetensors and numpy. A change to any of them builds a fresh one. Built
    in a scratch folder and renamed into place, so parallel test processes never see half a model.
    """
    from lrm_reward.core import tiny_model

    return tiny_model.cached_tiny_lrm(TINY_CACHE, seed=0)


@pytest.fixture(autouse=True)
def _core_logs_propagate():
    """Keep the project's loggers reporting to the root logger (caplog) in every test.

    Importing `launch` (the launch_pytest / launch_testing plugins, or a test that loads a launch file) makes
    every logger created afterwards a LaunchLogger with propagate=False, so records of a module imported
    later never reached caplog. This undoes that for the project's loggers only.
    """
    logging.setLoggerClass(logging.Logger)
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("lrm_reward") and isinstance(logger, logging.Logger):
            logger.propagate = True
    yield
