"""Test-wide settings: everything offline, no experiment trackers, the source tree first on sys.path
(pyproject.toml), and shared fixtures (the tiny reward model)."""

import hashlib
import os
import shutil
import tempfile
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
    the source of tiny_model.py: a change there builds a fresh one. Built in a scratch folder and renamed
    into place, so parallel test processes never see half a model.
    """
    from lrm_reward.core import tiny_model

    key = hashlib.sha256(Path(tiny_model.__file__).read_bytes()).hexdigest()[:16]
    final = TINY_CACHE / key
    if not final.is_dir():
        scratch = Path(
            tempfile.mkdtemp(
                prefix=f"{key}.", dir=TINY_CACHE.mkdir(parents=True, exist_ok=True) or TINY_CACHE
            )
        )
        tiny_model.build_tiny_lrm(scratch, seed=0)
        try:
            scratch.rename(final)
        except OSError:  # another process finished first: use theirs
            shutil.rmtree(scratch, ignore_errors=True)
    return tiny_model.build_tiny_lrm(final, seed=0)
