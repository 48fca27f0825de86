"""Shared data for the student tests: one recorded night of brightness-ramp episodes, judged by a stand-in
teacher with a known answer (tests/refinement/judged_data.py), and a helper writing untrained students."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "refinement"))

from judged_data import BrightnessEngine, record
from students import EPISODES


@pytest.fixture(scope="session")
def judged_night(tmp_path_factory) -> Path:
    """A dataset (camera 'front', 48x64 frames, 20 frames per episode) judged with every 3rd frame asked."""
    from lrm_reward.refinement.judge import JudgeConfig, judge_dataset

    root = tmp_path_factory.mktemp("night_data")
    dataset = record(root, "night", EPISODES)
    judge_dataset(dataset, BrightnessEngine(), JudgeConfig(curve_every_k=3), progress_bar=False)
    return dataset


@pytest.fixture
def night(judged_night, tmp_path) -> Path:
    """A private copy of the judged night (tests may add files next to it)."""
    target = tmp_path / "data" / judged_night.name
    shutil.copytree(judged_night, target)
    return target
