"""Label sources and the sample builder on a small synthetic LeRobotDataset."""

import json
import math

import numpy as np
import pytest
from synthetic_episodes import TARGET_X, write_block_dataset

from lrm_reward.adaptation import samples as S
from lrm_reward.core import parsing, prompts
from lrm_reward.core.types import Modality

N_FRAMES = 12


@pytest.fixture(scope="module")
def sidecar_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples") / "blocks"
    outcomes = write_block_dataset(root, n_success=4, n_failure=3, n_frames=N_FRAMES, extra_short_episodes=1)
    return root, outcomes


@pytest.fixture(scope="module")
def episode_set(sidecar_dataset):
    root, _ = sidecar_dataset
    return S.load_episodes([S.DatasetSpec(root)], S.SampleConfig())


def test_sidecar_outcomes_label_episodes_and_short_ones_are_skipped(sidecar_dataset, episode_set):
    _, outcomes = sidecar_dataset
    assert episode_set.skipped["too_short"] == 1
    got = {ep.key.episode: ep.success for ep in episode_set.episodes}
    expected = {k: v for k, v in outcomes.items() if k < 7}
    assert got == expected
    assert {ep.label_from for ep in episode_set.episodes} == {"sidecar"}
    assert all(ep.length == N_FRAMES for ep in episode_set.episodes)


def test_unknown_and_discarded_outcomes_are_skipped_and_counted(tmp_path):
    root = tmp_path / "blocks"
    write_block_dataset(root, n_success=2, n_failure=1, n_frames=8)
    for index, outcome in ((0, "unknown"), (1, "discard")):
        path = root / "recording" / f"episode_{index:06d}.json"
        data = json.loads(path.read_text())
        data["outcome"] = outcome
        path.write_text(json.dumps(data))
    result = S.load_episodes([S.DatasetSpec(root)], S.SampleConfig())
    assert result.skipped == {"unlabeled": 1, "discarded": 1}
    assert [ep.key.episode for ep in result.episodes] == [2]


def test_success_feature_labels(tmp_path):
    root = tmp_path / "feat"
    outcomes = write_block_dataset(root, n_success=2, n_failure=2, n_frames=8, labels="feature")
    result = S.load_episodes([S.DatasetSpec(root)], S.SampleConfig())
    assert {ep.key.episode: ep.success for ep in result.episodes} == outcomes
    assert {ep.label_from for ep in result.episodes} == {"feature"}


def test_labels_file_json_and_csv_override_the_dataset(sidecar_dataset, tmp_path):
    root, outcomes = sidecar_dataset
    flipped = {k: not v for k, v in outcomes.items() if k < 7}
    as_json = tmp_path / "labels.json"
    as_json.write_text(json.dumps({"episodes": {str(k): v for k, v in flipped.items()}}))
    as_csv = tmp_path / "labels.csv"
    as_csv.write_text(
        "episode_index,success\n" + "".join(f"{k},{'yes' if v else 'failure'}\n" for k, v in flipped.items())
    )
    for path in (as_json, as_csv):
        result = S.load_episodes([S.DatasetSpec(root, labels=path)], S.SampleConfig())
        assert {ep.key.episode: ep.success for ep in result.episodes} == flipped
        assert {ep.label_from for ep in result.episodes} == {"file"}


def test_bad_labels_file_values_are_named(tmp_path, sidecar_dataset):
    root, _ = sidecar_dataset
    path = tmp_path / "labels.csv"
    path.write_text("episode_index,success\n0,maybe\n")
    with pytest.raises(S.LabelError, match=r"labels.csv:2.*'maybe'"):
        S.load_episodes([S.DatasetSpec(root, labels=path)], S.SampleConfig())
    wrong_header = tmp_path / "wrong.csv"
    wrong_header.write_text("ep,ok\n0,1\n")
    with pytest.raises(S.LabelError, match="episode_index,success"):
        S.load_episodes([S.DatasetSpec(root, labels=wrong_header)], S.SampleConfig())


def test_dataset_without_labels_explains_what_is_needed(tmp_path):
    root = tmp_path / "nolabels"
    write_block_dataset(root, n_success=1, n_failure=1, n_frames=8, labels="none")
    with pytest.raises(S.LabelError) as info:
        S.load_episodes([S.DatasetSpec(root)], S.SampleConfig())
    message = str(info.value)
    for needed in ("recording/episode_XXXXXX.json", "next.success", "episode_index,success", "outcome"):
        assert needed in message


def test_not_a_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"meta/info\.json"):
        S.load_episodes([S.DatasetSpec(tmp_path)], S.SampleConfig())


def test_split_is_by_episode_stratified_and_deterministic(episode_set):
    train, held = S.split_episodes(episode_set.episodes, 0.25, seed=3)
    again = S.split_episodes(episode_set.episodes, 0.25, seed=3)
    assert [e.key for e in train] == [e.key for e in again[0]]
    assert not {e.key for e in train} & {e.key for e in held}
    assert len(train) + len(held) == len(episode_set.episodes)
    for outcome in (True, False):
        assert any(e.success is outcome for e in held)
        assert any(e.success is outcome for e in train)


def test_progress_samples_are_normalized_time_on_the_answer_grid(episode_set):
    samples = S.build_samples(episode_set.episodes, Modality.PROGRESS, S.SampleConfig(), seed=0)
    by_key = episode_set.by_key()
    assert samples and all(by_key[s.episode].success for s in samples)
    for s in samples:
        first, t = s.frames
        assert first == 0
        assert float(s.label) == pytest.approx(round(t / (N_FRAMES - 1) * 10) / 10)
        assert s.label in prompts.PROGRESS_ANSWERS
    per_episode = {}
    for s in samples:
        per_episode.setdefault(s.episode, set()).add(s.label)
    # 12 frames cover every 0.1 step: one sample per grid value and episode, so classes are balanced
    assert all(labels == set(prompts.PROGRESS_ANSWERS) for labels in per_episode.values())


def test_progress_per_label_draws_distinct_frames_per_grid_value(episode_set):
    cfg = S.SampleConfig(progress_per_label=3)
    samples = S.build_samples(episode_set.episodes, Modality.PROGRESS, cfg, seed=0)
    one = S.build_samples(episode_set.episodes, Modality.PROGRESS, S.SampleConfig(), seed=0)
    assert len(samples) > len(one)
    seen = set()
    for s in samples:
        assert float(s.label) == pytest.approx(round(s.frames[1] / (N_FRAMES - 1) * 10) / 10)
        assert (s.episode, s.frames) not in seen  # no frame twice
        seen.add((s.episode, s.frames))
    with pytest.raises(ValueError, match="progress_per_label"):
        S.SampleConfig(progress_per_label=0)


def test_completion_samples_yes_only_at_the_end_of_successes_and_balanced(episode_set):
    cfg = S.SampleConfig()
    samples = S.build_samples(episode_set.episodes, Modality.COMPLETION, cfg, seed=0)
    by_key = episode_set.by_key()
    counts = S.class_counts(samples)
    assert counts["yes"] == counts["no"] > 0
    for s in samples:
        ep = by_key[s.episode]
        (t,) = s.frames
        time = t / (ep.length - 1)
        if s.label == "yes":
            assert ep.success and time >= 1 - cfg.completion_end_fraction - 1e-9
        elif ep.success:
            assert time < cfg.completion_no_before
    assert any(s.label == "no" and not by_key[s.episode].success for s in samples)


def test_contrastive_pairs_follow_time_order(episode_set):
    cfg = S.SampleConfig()
    samples = S.build_samples(episode_set.episodes, Modality.CONTRASTIVE, cfg, seed=0)
    by_key = episode_set.by_key()
    counts = S.class_counts(samples)
    assert counts["ImageA"] == counts["ImageB"] > 0
    assert {s.source for s in samples} <= {"forward", "swapped", "rewound"}
    for s in samples:
        a, b = s.frames
        assert by_key[s.episode].success
        assert abs(a - b) >= math.ceil(cfg.contrastive_min_gap * (N_FRAMES - 1))
        assert (s.label == "ImageB") == (b > a)


def test_answers_are_the_released_json_and_parse_back(episode_set):
    assert S.answer_text(Modality.PROGRESS, "0.7") == '{ "completion_progress": 0.7 }'
    assert S.answer_text(Modality.COMPLETION, "yes") == '{ "task_completed": "yes" }'
    assert S.answer_text(Modality.CONTRASTIVE, "ImageB") == '{ "more_complete_image": "ImageB" }'
    with pytest.raises(ValueError):
        S.answer_text(Modality.COMPLETION, "maybe")
    for modality in Modality:
        for s in S.build_samples(episode_set.episodes, modality, S.SampleConfig(), seed=1)[:5]:
            parsed = parsing.parse_answer(modality, s.answer_text)
            assert parsed.parsed and parsed.value == pytest.approx(s.value)
            assert S.chat_messages(s) == prompts.build_messages(modality, s.task, len(s.frames))


def test_frames_come_back_as_rgb_uint8_showing_the_scene(episode_set):
    ep = next(e for e in episode_set.episodes if e.success)
    first, last = episode_set.store.frame(ep, 0), episode_set.store.frame(ep, ep.length - 1)
    assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
    # the dark cloth follows the block: a successful episode ends mostly covered
    assert last.mean() < first.mean() - 40
    block_red = (last[..., 0] > 150) & (last[..., 1] < 100)
    assert block_red[:, TARGET_X:].any()


def test_sample_config_validation():
    with pytest.raises(ValueError):
        S.SampleConfig(eval_fraction=1.0)
    with pytest.raises(ValueError):
        S.SampleConfig(min_frames=2)
    with pytest.raises(ValueError):
        S.SampleConfig(label_source="oracle")
