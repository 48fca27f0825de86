"""Refinement weighted by the reward model's dense progress (RA-BC): the progress parquet in lerobot's
schema, the weights lerobot computes from it, weighted sampling for ACT, the three selections of
lrm-refine, bad input, and stock `lerobot-train --sample_weighting.type=rabc` on a recorded dataset."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from judged_data import SHAPE, BrightnessEngine

from lrm_reward.refinement import dense_weights
from lrm_reward.refinement.dense_weights import (
    PROGRESS_COLUMN,
    PROGRESS_FILE,
    NoProgressError,
    rabc_frame_weights,
    read_progress,
    write_progress_parquet,
)
from lrm_reward.refinement.judge import judge_dataset
from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig, SaveStatus
from lrm_reward.refinement.refine import NothingToTrainError, RefineConfig, refine
from lrm_reward.refinement.refine_cli import main
from lrm_reward.refinement.selection import select_episodes

LEROBOT_TRAIN = Path(sys.executable).parent / "lerobot-train"
TINY_ACT = {
    "dim_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "n_vae_encoder_layers": 1,
    "latent_dim": 8,
    "chunk_size": 4,
    "n_action_steps": 4,
}
CHUNK = TINY_ACT["chunk_size"]
FRAMES = 20  # 2 s at 10 fps


def rising(t: float) -> float:
    return min(1.0, t / 1.6)


def rise_then_drop(t: float) -> float:
    """A failure: progress up to 0.5, then the object falls and progress goes back down."""
    return 0.5 * t / 0.8 if t < 0.8 else max(0.05, 0.5 - (t - 0.8) * 0.6)


def record(root: Path, name: str, episodes: list[tuple], task: str = "stack the cups") -> Path:
    """episodes: (final brightness, progress(t) or None): the camera brightness ramps from 20 to the final
    level (the judge's stand-in engine reads it); the reward node's progress arrives every 0.2 s
    (interval-hold), the first at 0.1 s (frame 0 has none), and once as NaN ("not asked")."""
    rec = EpisodeRecorder(
        RecorderConfig(data_root=root, cameras=("front",), fps=10, dataset_name=name, image_writer_threads=0)
    )
    for final, progress in episodes:
        rec.start(task)
        for k in range(40):
            t = k * 0.05
            level = int(20 + (final - 20) * min(1.0, t / 1.6))
            rec.add_image("front", t, np.full(SHAPE, level, np.uint8))
            rec.add_state(t, [t, level / 255.0])
            rec.add_action(t, [t, level / 255.0])
            if progress is not None and k % 4 == 2:
                value = float("nan") if k == 18 else progress(t)
                rec.add_reward(t, value, 0.0, value)
        assert rec.stop().status is SaveStatus.SAVED
    rec.close()
    return root / name


@pytest.fixture(scope="module")
def night(tmp_path_factory) -> Path:
    """Episode 0, 2: successes with progress recorded; 1: a failure (progress rises, then drops);
    3: a failure recorded without the reward node (progress only from the judge)."""
    root = tmp_path_factory.mktemp("data")
    ds = record(root, "night", [(220.0, rising), (60.0, rise_then_drop), (230.0, rising), (70.0, None)])
    judge_dataset(ds, BrightnessEngine(), progress_bar=False)
    record(root, "demos", [(210.0, None)])
    return ds


def episode_weights(root: Path, chunk: int = CHUNK) -> dict[int, np.ndarray]:
    progress = read_progress(root)
    weights = rabc_frame_weights(write_progress_parquet(progress), chunk)
    return {
        e: np.array([weights[ep.start + i] for i in range(len(ep.values))])
        for e, ep in progress.episodes.items()
    }


def test_progress_comes_from_the_recording_then_the_judge(night):
    progress = read_progress(night)
    assert {e: p.source for e, p in progress.episodes.items()} == {
        0: "recorded",
        1: "recorded",
        2: "recorded",
        3: "judge",
    }
    ep0 = progress.episodes[0]
    # interval-hold: 10 answers for 20 frames, one of them NaN ("not asked"); frame 0 came before the first
    assert ep0.known < FRAMES and np.isfinite(ep0.values).all()
    assert ep0.values[0] == pytest.approx(ep0.values[1])  # before the first answer: the first one held
    assert ep0.values[-1] == pytest.approx(1.0) and np.all(np.diff(ep0.values) >= -1e-6)
    drop = progress.episodes[1].values
    assert drop.max() == pytest.approx(0.44, abs=0.02) and drop[-1] < 0.3  # answers at 0.1, 0.3, ... s
    judged = progress.episodes[3].values  # the stand-in judge: brightness / 200, from 0.1 up to 0.35
    assert judged[0] == pytest.approx(0.1, abs=0.02) and judged[-1] == pytest.approx(0.35, abs=0.02)


def test_weights_follow_progress_and_failures_stay_low_but_nonzero(night):
    w = episode_weights(night)
    success, failure = w[0], w[1]
    assert success.mean() > 2 * failure.mean()
    drop = read_progress(night).episodes[1].values
    ahead = np.array([drop[min(i + CHUNK, FRAMES - 1)] - drop[i] for i in range(FRAMES)])
    assert failure[ahead > 0.05].min() == 1.0  # while it still made progress: full weight (RA-BC)
    assert failure[ahead < -0.05].max() == 0.0  # while it went backwards: RA-BC gives nothing ...
    cfg = RefineConfig(store_root="/unused", policy_name="p", datasets=[night], selection="weighting")
    sel = select_episodes(cfg)
    assert sel.episodes == {str(night): [0, 1, 2, 3]} and not sel.rejected
    weights, info = dense_weights.selection_frame_weights(sel, [_Rows(night, range(4))], CHUNK, 0.05)
    assert weights.min() == pytest.approx(0.05)  # ... and lrm-refine keeps it at the floor, not at zero
    assert weights[FRAMES : 2 * FRAMES].mean() < weights[:FRAMES].mean()
    assert info["frames"] == {"full": 0, "progress": 4 * FRAMES}
    assert 0.0 < info["weights"]["at_floor"] < 0.5 and info["weights"]["at_full"] > 0.3


class _Rows:
    """The part of a LeRobotDataset that selection_frame_weights reads: the index / episode columns."""

    def __init__(self, root: Path, episodes) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset

        self.ds = LeRobotDataset("lrm/x", root=root, episodes=list(episodes), video_backend="pyav")
        self.hf_dataset = self.ds.hf_dataset


def test_parquet_is_what_lerobot_reads(night):
    from lerobot.rewards.sarm.compute_rabc_weights import get_reward_model_path_from_parquet
    from lerobot.utils.sample_weighting import SampleWeightingConfig, make_sample_weighter

    path = write_progress_parquet(read_progress(night))
    assert path == night / PROGRESS_FILE
    table = pq.read_table(path)
    assert table.schema.names == ["index", "episode_index", "frame_index", PROGRESS_COLUMN]
    assert [str(t) for t in table.schema.types] == ["int64", "int64", "int64", "float"]
    df = table.to_pandas()
    assert df["index"].tolist() == list(range(4 * FRAMES))
    assert df["frame_index"].tolist() == list(range(FRAMES)) * 4
    assert df[PROGRESS_COLUMN].notna().all()
    assert get_reward_model_path_from_parquet(path) == (
        "lrm reward node (reward.progress) + lrm-judge (brightness-test-engine)"
    )
    sources = json.loads(table.schema.metadata[b"lrm_progress_sources"])
    assert sources == {"0": "recorded", "1": "recorded", "2": "recorded", "3": "judge"}

    # stock lerobot-train's path: the rabc weighter finds the file in the dataset root by itself
    class Policy:
        config = type("Config", (), {"chunk_size": CHUNK})()

    weighter = make_sample_weighter(
        SampleWeightingConfig(type="rabc"), Policy(), "cpu", dataset_root=str(night)
    )
    assert weighter.progress_path == path and len(weighter.progress_lookup) == 4 * FRAMES
    batch_weights, stats = weighter.compute_batch_weights({"index": torch.arange(FRAMES, 2 * FRAMES)})
    ours = np.array([rabc_frame_weights(path, CHUNK)[i] for i in range(FRAMES, 2 * FRAMES)])
    np.testing.assert_allclose(batch_weights.numpy() * stats["mean_weight"], ours, atol=1e-5)


def test_no_progress_at_all_is_a_clear_error(tmp_path, capsys):
    bare = record(tmp_path / "data", "bare", [(200.0, None), (50.0, None)])  # no reward node, not judged
    progress = read_progress(bare)
    assert not progress.has_progress and progress.sources() == {"none": 2}
    with pytest.raises(NoProgressError, match=rf"{re.escape(str(bare))}.*lrm-judge .*--selection filter"):
        write_progress_parquet(progress)
    assert not (bare / PROGRESS_FILE).exists()
    cfg = RefineConfig(store_root=tmp_path / "p", policy_name="p", datasets=[bare], selection="weighting")
    with pytest.raises(NoProgressError, match="no progress value at all"):
        select_episodes(cfg)
    argv = [str(bare), "--store", str(tmp_path / "p"), "--policy", "p", "--from-scratch", "--quiet"]
    assert main([*argv, "--selection", "weighting"]) == 1
    err = capsys.readouterr().err
    assert str(bare) in err and "lrm-judge" in err and "no progress value at all" in err
    # "both" falls back to the judged successes: here none, so nothing to train
    with pytest.raises(NothingToTrainError, match="not judged; no progress to weight by"):
        refine(RefineConfig(tmp_path / "p", "p", datasets=[bare], selection="both", from_scratch=True))


class _ListPolicy:
    """A policy stand-in: forward(batch) without per-sample loss (as ACT in lerobot 0.6.1)."""

    def forward(self, batch):
        return batch["x"].float().mean(), {}


class _PerSamplePolicy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, batch, reduction: str = "mean"):
        per = (self.w * batch["x"].float()) ** 2
        return (per if reduction == "none" else per.mean()), {}


def test_weighted_sampling_draws_frames_in_proportion(tmp_path):
    weights = np.array([1.0, 0.05, 0.5, 1.0, 0.05, 0.25, 0.75, 0.05])
    data = [{"x": torch.tensor(i)} for i in range(len(weights))]
    assert not dense_weights.supports_per_sample_loss(_ListPolicy())
    loader, weighter = dense_weights.training_loader(data, weights, _ListPolicy(), 4, 0, seed=7)
    assert weighter is None
    counts = np.zeros(len(weights))
    for _ in range(1500):
        for batch in loader:
            np.add.at(counts, batch["x"].numpy(), 1)
    expected = weights / weights.sum() * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 24.3, (counts, expected)  # 7 degrees of freedom, p = 0.001
    assert counts[1] > 0  # a frame at the floor is still drawn, rarely
    again, _ = dense_weights.training_loader(data, weights, _ListPolicy(), 4, 0, seed=7)
    first = [b["x"].tolist() for b in again]
    assert first == [
        b["x"].tolist() for b in dense_weights.training_loader(data, weights, _ListPolicy(), 4, 0, 7)[0]
    ]
    uniform, _ = dense_weights.training_loader(data, None, _ListPolicy(), 4, 0, seed=7)
    assert sorted(x for b in uniform for x in b["x"].tolist()) == list(range(len(weights)))


def test_per_sample_loss_policies_get_lerobots_weighted_loss():
    policy = _PerSamplePolicy()
    assert dense_weights.supports_per_sample_loss(policy)
    data = [{"x": torch.tensor(float(i))} for i in range(4)]
    loader, weighter = dense_weights.training_loader(data, np.array([1.0, 0.0, 0.5, 0.0]), policy, 4, 0, 0)
    batch = next(iter(loader))
    loss = dense_weights.batch_loss(policy, lambda b: {"x": b["x"]}, batch, weighter)  # pre drops keys
    per = batch["x"] ** 2
    w = batch[dense_weights.FRAME_WEIGHT_KEY].float()
    assert loss.item() == pytest.approx(float((per * w).sum() / w.sum()), rel=1e-5)
    # a frame at weight 0 does not move the gradient
    loss.backward()
    x, g = batch["x"], policy.w.grad.item()
    kept = w > 0
    assert g == pytest.approx(float((2 * x[kept] ** 2 * w[kept]).sum() / w.sum()), rel=1e-5)


@pytest.fixture(scope="module")
def store(night, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("policies")
    refine(
        RefineConfig(
            store_root=store,
            policy_name="act",
            demos=[night.parent / "demos"],
            steps=1,
            batch_size=4,
            from_scratch=True,
            policy_overrides=TINY_ACT,
            progress_bar=False,
            report=False,
        )
    )
    return store


@pytest.mark.parametrize(
    ("selection", "episodes", "weighted"),
    [("filter", [0, 2], []), ("weighting", [0, 1, 2, 3], [0, 1, 2, 3]), ("both", [0, 1, 2, 3], [1, 3])],
)
def test_each_selection_makes_a_version_whose_report_says_so(store, night, selection, episodes, weighted):
    cfg = RefineConfig(
        store_root=store,
        policy_name="act",
        datasets=[night],
        steps=2,
        batch_size=4,
        selection=selection,
        cache_frames=selection == "both",  # the cached frames keep the weights' order
        promote=False,
        progress_bar=False,
    )
    result = refine(cfg)
    meta = result.version.metadata()
    assert meta["selection"]["mode"] == selection
    assert meta["datasets"] == {str(night): episodes}
    got = [r["episode_index"] for r in meta["selection"]["kept"] if r["weight"] == "progress"]
    assert got == weighted
    summary = (result.report.parent / "summary.txt").read_text()
    assert f"selection: {selection} (" in summary
    assert (f"{len(weighted)} weighted by progress" in summary) == (selection != "filter")
    info = meta["selection"]["weighting"]
    if selection == "filter":
        assert info["mechanism"].startswith("uniform") and "frames:" not in summary
        return
    assert info["mechanism"].startswith("weighted sampling")  # ACT: no per-sample loss in lerobot 0.6.1
    assert "frame weights applied by: weighted sampling" in summary
    assert re.search(r"weights: min 0\.05, .*at the floor", summary)
    assert f"frames: {4 * FRAMES} (" in summary
    assert (result.report.parent / "weights.png").stat().st_size > 1000
    assert info["progress_files"] == {str(night): str(night / PROGRESS_FILE)}
    assert info["progress_sources"][str(night)] == {"recorded": 3, "judge": 1}
    assert PolicyHistory(store).last()["selection"] == selection


class PolicyHistory:
    def __init__(self, store: Path) -> None:
        from lrm_reward.refinement.policy_store import PolicyStore

        self.store = PolicyStore(store, "act")

    def last(self) -> dict:
        return self.store.history()[-1]


def test_the_command_defaults_to_the_judged_filter(store, night, capsys):
    argv = [str(night), "--store", str(store), "--policy", "act", "--steps", "1", "--batch-size", "4"]
    assert main([*argv, "--no-promote", "--no-report", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "selection filter, 2 episodes (0 weighted by progress, 2 rejected)" in out
    assert PolicyHistory(store).last()["selection"] == "filter"
    # the other selections stay one flag away
    assert main([*argv, "--selection", "both", "--no-promote", "--no-report", "--quiet"]) == 0
    assert "selection both, 4 episodes (2 weighted by progress, 0 rejected)" in capsys.readouterr().out


# ------------------------------------------------------------------ stock lerobot-train with our parquet
def build_tiny_smolvlm(out: Path) -> Path:
    """A tiny SmolVLM (config + tokenizer + processor, no weights) for a from-scratch smolvla: lerobot's
    smolvla forward takes reduction="none", so stock RA-BC applies to it. Nothing is downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics3ImageProcessor, Idefics3Processor, PreTrainedTokenizerFast, SmolVLMConfig

    special = {
        "fake_image_token": "<fake_token_around_image>",
        "image_token": "<image>",
        "global_image_token": "<global-img>",
        "end_of_utterance_token": "<end_of_utterance>",
    }
    words = ["<pad>", "<unk>", "<bos>", *special.values(), *["stack", "the", "cups", "put", "in", "bowl"]]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<end_of_utterance>",
        extra_special_tokens=special,
    )
    SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(vocab),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 256,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        scale_factor=2,
        image_token_id=vocab["<image>"],
        pad_token_id=0,
    ).save_pretrained(out)
    size = {"longest_edge": 32}
    Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size=size, max_image_size=size),
        tokenizer=tokenizer,
        image_seq_len=4,
    ).save_pretrained(out)
    return out


SMOLVLA_TINY = {
    "load_vlm_weights": False,
    "resize_imgs_with_padding": (32, 32),
    "chunk_size": CHUNK,
    "n_action_steps": CHUNK,
    "max_state_dim": 8,
    "max_action_dim": 8,
    "tokenizer_max_length": 8,
    "num_steps": 2,
}


@pytest.mark.slow
def test_refine_weights_the_loss_of_a_policy_with_per_sample_loss(night, tmp_path):
    overrides = {**SMOLVLA_TINY, "vlm_model_name": str(build_tiny_smolvlm(tmp_path / "vlm"))}
    result = refine(
        RefineConfig(
            store_root=tmp_path / "p",
            policy_name="smolvla",
            datasets=[night],
            steps=2,
            batch_size=4,
            selection="weighting",
            from_scratch=True,
            policy_type="smolvla",
            policy_overrides=overrides,
            progress_bar=False,
        )
    )
    assert result.selection.weighting["mechanism"] == "per-sample loss (lerobot sample weighting)"
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    summary = (result.report.parent / "summary.txt").read_text()
    assert "frame weights applied by: per-sample loss" in summary


@pytest.mark.slow
@pytest.mark.skipif(not LEROBOT_TRAIN.exists(), reason="lerobot-train console script not installed")
def test_stock_lerobot_train_weights_a_recorded_dataset_with_our_progress(tmp_path):
    from lerobot.rewards.sarm.rabc import RABCWeights

    data = record(tmp_path / "data", "run", [(220.0, rising), (60.0, rise_then_drop)])
    # the module's command line writes the file; then the stock trainer, unmodified, finds it by itself
    cmd = [sys.executable, "-m", "lrm_reward.refinement.dense_weights", str(data)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}
    src = str(Path(dense_weights.__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{data / PROGRESS_FILE}: episodes by progress source {{'recorded': 2}}" in done.stdout
    vlm = build_tiny_smolvlm(tmp_path / "tiny_smolvlm")
    out = tmp_path / "train"
    chunk = 4
    argv = [
        str(LEROBOT_TRAIN),
        "--dataset.repo_id=lrm/run",
        f"--dataset.root={data}",
        "--policy.type=smolvla",
        "--policy.device=cpu",
        "--policy.push_to_hub=false",
        f"--policy.vlm_model_name={vlm}",
        "--policy.load_vlm_weights=false",
        "--policy.resize_imgs_with_padding=[32,32]",
        f"--policy.chunk_size={chunk}",
        f"--policy.n_action_steps={chunk}",
        "--policy.max_state_dim=8",
        "--policy.max_action_dim=8",
        "--policy.tokenizer_max_length=8",
        "--policy.num_steps=2",
        "--sample_weighting.type=rabc",
        "--wandb.enable=false",
        "--steps=3",
        "--batch_size=4",
        "--num_workers=0",
        "--log_freq=1",
        "--save_freq=3",
        f"--output_dir={out}",
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert f"Loading SARM progress values from {data / PROGRESS_FILE}" in log
    assert f"Loaded {2 * FRAMES} frame progress values" in log
    # the delta statistics it logs are those of our progress, at the policy's chunk size
    ours = RABCWeights(data / PROGRESS_FILE, chunk_size=chunk, device=torch.device("cpu"))
    assert f"Progress delta stats: mean={ours.delta_mean:.4f}, std={ours.delta_std:.4f}" in log
    # every step was weighted: the per-sample weighting statistics are in each step's log line
    steps = [line for line in log.splitlines() if "sample_weight_mean_weight:" in line]
    assert len(steps) == 3, log[-4000:]
    model = out / "checkpoints" / "000003" / "pretrained_model"
    assert (model / "model.safetensors").stat().st_size > 0
    assert json.loads((model / "config.json").read_text())["type"] == "smolvla"
