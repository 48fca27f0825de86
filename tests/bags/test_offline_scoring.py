"""lrm-score: per-frame rewards in lerobot's progress schema, and a bag copy with RewardSignals beside the
original topics."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from bag_factory import MARKER_TOPIC, BagSpec, EpisodeSpec, level_at, write_bag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "refinement"))
from judged_data import BrightnessEngine  # the refinement tests' stand-in reward model

from lrm_reward.bags.bag_source import BagSource
from lrm_reward.bags.importer import ImportConfig, import_bags
from lrm_reward.bags.mapping import MappingSpec
from lrm_reward.bags.offline_scoring import (
    PROGRESS_FILE,
    REWARD_TOPIC,
    ScoreConfig,
    main,
    score_dataset,
    write_bag_with_rewards,
    write_progress,
)

MAPPING = MappingSpec(
    fps=10, cameras={"front": "/camera/image"}, split="marker", marker=MARKER_TOPIC, marker_at="end"
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    spec = BagSpec(
        storage="sqlite3",
        episodes=[EpisodeSpec(final_level=220), EpisodeSpec(final_level=100, success=False)],
        marker="result",
    )
    bag = write_bag(root / "bag", spec)
    report = import_bags([bag], ImportConfig(root / "ds", MAPPING, image_writer_threads=0))
    assert report.dataset is not None, report.message
    return bag, report.dataset


def test_every_frame_gets_a_progress_in_lerobots_schema(imported, tmp_path):
    _, dataset = imported
    scores = score_dataset(dataset, BrightnessEngine(), ScoreConfig(every_k=3, completion=True))
    path = write_progress(scores, tmp_path / PROGRESS_FILE)
    table = pq.read_table(path)
    assert table.column_names == ["index", "episode_index", "frame_index", "progress_sparse"]
    assert table.schema.metadata[b"reward_model_path"] == b"lrm-score:brightness-test-engine"
    df = table.to_pandas()
    assert len(df) == 40 and list(df["index"]) == list(range(40))
    first = df[df.episode_index == 0].progress_sparse.to_numpy()
    assert np.all(np.diff(first) >= -1e-3) and first[-1] == pytest.approx(
        min(1.0, level_at(1.9) / 200), abs=0.03
    )
    second = df[df.episode_index == 1].progress_sparse.to_numpy()
    assert second[-1] < 0.6  # the dim episode never got far
    assert list(scores.episodes[0].scored) == [0, 3, 6, 9, 12, 15, 18, 19]
    assert np.isfinite(scores.episodes[0].completion[scores.episodes[0].scored]).all()

    from lerobot.rewards.sarm.rabc import RABCWeights  # stock RA-BC weighting reads the file as is

    weights = RABCWeights(path, chunk_size=5, device=None)
    assert len(weights.progress_lookup) == 40


def test_a_copy_of_the_bag_carries_one_reward_signal_per_frame(imported, tmp_path):
    bag, dataset = imported
    scores = score_dataset(dataset, BrightnessEngine(), ScoreConfig(every_k=5))
    copy = tmp_path / "with_rewards"
    assert write_bag_with_rewards(bag, copy, scores) == 40
    with BagSource(bag) as original, BagSource(copy) as result:
        assert result.storage == original.storage == "sqlite3"
        assert {t: result.counts[t] for t in original.topics} == original.counts
        assert result.topics[REWARD_TOPIC] == "lrm_interfaces/msg/RewardSignal"
        rewards = [(t, m) for _, _, t, m in result.messages([REWARD_TOPIC])]
        cameras = {t for _, _, t, _ in original.messages(["/camera/image"])}
    assert len(rewards) == 40 and all(t in cameras for t, _ in rewards)  # at the scored frame's arrival
    msgs = [m for _, m in rewards]
    assert [m.frame_index for m in msgs[:20]] == list(range(20)) and {m.episode_id for m in msgs} == {0, 1}
    assert [m.queried for m in msgs[:6]] == [True, False, False, False, False, True]
    assert msgs[0].stream == "front" and np.isnan(msgs[0].completion_prob)
    progress = [m.progress for m in msgs[:20]]
    np.testing.assert_allclose(progress, scores.episodes[0].progress, atol=1e-6)
    with pytest.raises(FileExistsError):
        write_bag_with_rewards(bag, copy, scores)


def test_the_command_scores_a_bag_with_the_tiny_reward_model(tmp_path, tiny_lrm, capsys):
    bag = write_bag(tmp_path / "bag", BagSpec(storage="mcap", episodes=[EpisodeSpec(duration_s=1.0)]))
    adapters = ",".join(f"{k}={v}" for k, v in tiny_lrm.adapters.items() if k != "contrastive")
    argv = [str(bag), "--model", str(tiny_lrm.base), "--adapters", adapters, "--task", "pick", "--fps", "10"]
    argv += ["--every-k", "4", "--completion", "--bag-out", str(tmp_path / "copy")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "10 frames of 1 episode(s) scored" in out and "10 RewardSignals" in out
    df = pd.read_parquet(tmp_path / "bag.progress.parquet")
    assert len(df) == 10 and df.progress_sparse.between(0, 1).all()
    with BagSource(tmp_path / "copy") as copy:
        assert copy.counts[REWARD_TOPIC] == 10
