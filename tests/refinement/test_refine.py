"""Refinement: judged successes -> a new policy version; never overwritten, promoted only when clean."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from judged_data import BrightnessEngine, record

from lrm_reward.refinement.judge import judge_dataset
from lrm_reward.refinement.policy_store import (
    CorruptCheckpointError,
    PolicyStore,
    StoreBusyError,
    load_policy,
)
from lrm_reward.refinement.refine import NothingToTrainError, RefineConfig, refine, select_episodes

HERE = Path(__file__).resolve().parent
TINY_ACT = {
    "dim_model": 64,
    "n_heads": 2,
    "dim_feedforward": 64,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "n_vae_encoder_layers": 1,
    "latent_dim": 8,
    "chunk_size": 5,
    "n_action_steps": 5,
}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    night = record(
        root, "night", [("stack the cups", 220.0), ("stack the cups", 60.0), ("stack the cups", 230.0)]
    )
    judge_dataset(night, BrightnessEngine(), progress_bar=False)
    record(root, "demos", [("stack the cups", 210.0)])
    return root


def scratch_cfg(store: Path, recorded: Path, **kw) -> RefineConfig:
    """A tiny ACT trained from scratch on the demonstrations."""
    base = dict(
        store_root=store,
        policy_name="act_pick",
        demos=[recorded / "demos"],
        batch_size=4,
        from_scratch=True,
        policy_overrides=TINY_ACT,
        progress_bar=False,
        report=False,
    )
    return RefineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def store_with_v1(recorded, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("policies")
    result = refine(scratch_cfg(store, recorded, steps=2))
    assert result.version.version == "v0001" and result.parent is None
    return store


@pytest.fixture
def store(store_with_v1, tmp_path) -> Path:
    shutil.copytree(store_with_v1, tmp_path / "policies", symlinks=True)
    return tmp_path / "policies"


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def refine_cfg(store: Path, recorded: Path, **kw) -> RefineConfig:
    base = dict(
        store_root=store,
        policy_name="act_pick",
        datasets=[recorded / "night"],
        steps=3,
        batch_size=4,
        progress_bar=False,
    )
    base.update(kw)
    return RefineConfig(**base)


def test_selection_keeps_judged_successes_and_demos(recorded):
    sel = select_episodes(refine_cfg(Path("/unused"), recorded, demos=[recorded / "demos"]))
    assert sel.episodes == {str(recorded / "night"): [0, 2], str(recorded / "demos"): [0]}
    assert [(r["episode_index"], r["reason"]) for r in sel.rejected] == [(1, "verdict failure")]
    strict = select_episodes(refine_cfg(Path("/unused"), recorded, min_confidence=0.9999))
    assert strict.num_episodes == 0


def test_refine_writes_a_new_version_and_leaves_the_old_one_untouched(store, recorded):
    ps = PolicyStore(store, "act_pick")
    v1 = ps.current()
    before = digests(v1.path)
    result = refine(refine_cfg(store, recorded, report=True))
    assert result.version.version == "v0002" and result.parent == "act_pick/v0001"
    assert ps.current().version == "v0002"
    assert digests(v1.path) == before
    ps.verify(v1)
    meta = ps.verify(result.version)
    assert meta["datasets"] == {str(recorded / "night"): [0, 2]}
    assert meta["parent"] == "act_pick/v0001"
    assert len(meta["losses"]) == 3 and all(x > 0 for x in meta["losses"])
    assert meta["judge_thresholds"][str(recorded / "night")][0]["success_threshold"] == 0.5
    assert meta["training"]["steps"] == 3
    assert [r["episode_index"] for r in meta["selection"]["rejected"]] == [1]
    # the new version loads with lerobot and acts
    policy, pre, post, cfg = load_policy(result.version)
    assert cfg.type == "act" and cfg.chunk_size == 5
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    item = LeRobotDataset("lrm/night", root=recorded / "night", video_backend="pyav")[5]
    obs = {k: v for k, v in item.items() if k.startswith("observation.")}
    action = post(policy.select_action(pre(obs)))
    assert tuple(action.shape) == (1, 2) and bool(action.isfinite().all())
    # the report of this run
    assert result.report is not None and result.report.exists()
    for png in ("rewards.png", "nights.png", "loss.png"):
        assert (result.report.parent / png).stat().st_size > 1000
    history = ps.history()
    assert [h["version"] for h in history] == ["v0001", "v0002"]
    assert history[-1]["kept"] == 2 and history[-1]["rejected"] == 1


def test_from_scratch_is_reproducible_with_the_same_seed(recorded, tmp_path):
    def weights(store: Path, seed: int) -> str:
        result = refine(scratch_cfg(store, recorded, steps=1, seed=seed))
        return result.version.metadata()["files"]["model.safetensors"]

    first = weights(tmp_path / "a", seed=3)
    assert weights(tmp_path / "b", seed=3) == first  # the initial weights follow the seed too
    assert weights(tmp_path / "c", seed=4) != first


def test_no_promote_keeps_current(store, recorded):
    result = refine(refine_cfg(store, recorded, promote=False, report=False, steps=1))
    ps = PolicyStore(store, "act_pick")
    assert result.version.version == "v0002" and ps.current().version == "v0001"


def test_corrupt_current_checkpoint_is_refused_and_current_stays(store, recorded):
    ps = PolicyStore(store, "act_pick")
    weights = ps.current().path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        refine(refine_cfg(store, recorded))
    assert ps.current().version == "v0001"
    assert [v.version for v in ps.versions()] == ["v0001"]


def test_two_runs_at_once_are_refused(store, recorded):
    holder = PolicyStore(store, "act_pick")
    with holder, pytest.raises(StoreBusyError, match="another refinement run"):
        refine(refine_cfg(store, recorded))


def test_nothing_selected_and_no_current_are_clear_errors(store, recorded, tmp_path):
    with pytest.raises(NothingToTrainError, match="no episode selected"):
        refine(refine_cfg(store, recorded, min_confidence=0.9999))
    with pytest.raises(CorruptCheckpointError, match="--from-scratch"):
        refine(refine_cfg(tmp_path / "empty_store", recorded))


def test_killed_run_leaves_no_half_version(store, recorded):
    proc = subprocess.run(
        [sys.executable, str(HERE / "refine_scenarios.py"), str(store), str(recorded / "night")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "STAGED" in proc.stdout
    ps = PolicyStore(store, "act_pick")
    assert [v.version for v in ps.versions()] == ["v0001"]
    assert ps.current().version == "v0001"
    leftovers = list((store / "act_pick" / ".staging").iterdir())
    assert leftovers and (leftovers[0] / "model.safetensors").exists()  # staged, never moved into place
    result = refine(refine_cfg(store, recorded, steps=1, report=False))
    assert result.version.version == "v0002"
    assert not any((store / "act_pick" / ".staging").iterdir())
    assert (
        json.loads((store / "act_pick" / "v0002" / "metadata.json").read_text())["parent"] == "act_pick/v0001"
    )
    assert os.readlink(store / "act_pick" / "current") == "v0002"


def test_import_an_existing_lerobot_checkpoint_through_the_cli(store, tmp_path, capsys):
    from lrm_reward.refinement.refine_cli import main

    source = PolicyStore(store, "act_pick").current().path
    new_store = tmp_path / "other_store"
    assert main(["--store", str(new_store), "--policy", "imported", "--import-checkpoint", str(source)]) == 0
    assert "imported" in capsys.readouterr().out
    ps = PolicyStore(new_store, "imported")
    assert ps.current().version == "v0001"
    meta = ps.verify(ps.current())
    assert meta["imported_from"] == str(source.resolve()) and meta["policy_type"] == "act"
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    (broken / "config.json").write_text("{ not json")
    assert main(["--store", str(new_store), "--policy", "imported", "--import-checkpoint", str(broken)]) == 1
    assert "cannot load" in capsys.readouterr().err
    assert [v.version for v in ps.versions()] == ["v0001"]


def test_cosine_schedule_warms_up_peaks_and_decays_to_zero():
    import torch

    from lrm_reward.refinement.refine import _lr_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-4)
    cfg = RefineConfig(store_root=Path("/unused"), policy_name="p", demos=[Path("/unused")], steps=100)
    assert _lr_scheduler(cfg, optimizer, 2e-4) is None  # constant: the library default
    cfg = RefineConfig(
        store_root=Path("/unused"), policy_name="p", demos=[Path("/unused")], steps=100, lr_schedule="cosine"
    )
    scheduler = _lr_scheduler(cfg, optimizer, 2e-4)
    lrs = []
    for _ in range(cfg.steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = lrs.index(max(lrs))
    assert lrs[0] < 2e-4 / 4  # warmup: 5 steps by default
    # lerobot's cosine runs from step 0, so the peak after warmup is a hair under lr
    assert peak == 5 and 0.99 * 2e-4 < max(lrs) <= 2e-4
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True))  # decays without a rise
    assert lrs[-1] < 2e-4 * 1e-3  # the last step is nearly still


def test_schedule_reaches_training_and_metadata_and_bad_values_are_refused(store, recorded, capsys):
    from lrm_reward.refinement.refine_cli import main

    cosine = refine(refine_cfg(store, recorded, steps=4, lr=1e-3, lr_schedule="cosine", report=False))
    meta = cosine.version.metadata()
    assert meta["training"]["lr_schedule"] == "cosine" and meta["training"]["warmup_steps"] is None
    # the same run with a constant lr ends elsewhere: the schedule changed the steps taken
    ps = PolicyStore(store, "act_pick")
    ps.promote(ps.versions()[0])  # back to v0001: refine it again, constant lr
    constant = refine(refine_cfg(store, recorded, steps=4, lr=1e-3, report=False))
    assert constant.version.metadata()["files"]["model.safetensors"] != meta["files"]["model.safetensors"]
    with pytest.raises(ValueError, match="lr_schedule"):
        refine_cfg(store, recorded, lr_schedule="linear")
    with pytest.raises(ValueError, match="warmup_steps"):
        refine_cfg(store, recorded, steps=3, lr_schedule="cosine", warmup_steps=3)
    with pytest.raises(SystemExit):
        main(["--store", str(store), "--policy", "act_pick", "--lr-schedule", "linear"])
    assert "invalid choice" in capsys.readouterr().err
