"""Refinement with a chosen set of policy inputs: a state-only policy on data that also holds images.

The demo's policy reads observation.state + observation.environment_state (a pose estimator's output)
while the camera stays in the data for the judge; a refinement of that version keeps those inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lrm_reward.refinement.policy_store import PolicyStore, load_policy
from lrm_reward.refinement.recorder import EpisodeRecorder, RecorderConfig, SaveStatus
from lrm_reward.refinement.refine import RefineConfig, refine
from lrm_reward.refinement.refine_cli import main

STATE_ONLY = ("observation.state", "observation.environment_state")
TINY_ACT = {
    "dim_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "use_vae": False,
    "chunk_size": 4,
    "n_action_steps": 4,
    "normalization_mapping": {"ENV": "MEAN_STD"},  # ACT leaves ENV raw by default
}


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rec = EpisodeRecorder(
        RecorderConfig(
            data_root=root,
            cameras=("front",),
            fps=10,
            dataset_name="demos",
            image_writer_threads=0,
            environment_state_names=("cube_x", "cube_y"),
        )
    )
    rng = np.random.default_rng(0)
    for e in range(2):
        rec.start("move the cube")
        cube = rng.uniform(-1, 1, size=2)
        for k in range(20):
            t = 10.0 * e + k * 0.1
            rec.add_image("front", t, np.full((24, 32, 3), 10 * k, np.uint8))
            rec.add_state(t, [k * 0.1, -k * 0.1, 0.5])
            rec.add_environment_state(t, cube + 0.01 * k)
            rec.add_action(t, [cube[0], cube[1]])
        assert rec.stop("success").status is SaveStatus.SAVED
    rec.close()
    return root / "demos"


def cfg(store: Path, demos: Path, **kw) -> RefineConfig:
    base = dict(
        store_root=store,
        policy_name="act_state",
        demos=[demos],
        steps=2,
        batch_size=4,
        progress_bar=False,
        report=False,
    )
    base.update(kw)
    return RefineConfig(**base)


def test_a_state_only_policy_is_built_recorded_and_kept_by_refinement(tmp_path, demos):
    store = tmp_path / "policies"
    first = refine(cfg(store, demos, from_scratch=True, policy_overrides=TINY_ACT, policy_inputs=STATE_ONLY))
    meta = PolicyStore(store, "act_state").verify(first.version)
    assert meta["policy_inputs"] == list(STATE_ONLY)
    assert meta["training"]["policy_inputs"] == list(STATE_ONLY)
    policy, pre, post, pcfg = load_policy(first.version)
    assert set(pcfg.input_features) == set(STATE_ONLY)
    assert pcfg.normalization_mapping["ENV"].value == "MEAN_STD"
    assert pcfg.normalization_mapping["VISUAL"].value == "MEAN_STD"  # the defaults stay
    # it acts without any image
    obs = {
        "observation.state": np.array([[0.1, -0.1, 0.5]], np.float32),
        "observation.environment_state": np.array([[0.3, -0.2]], np.float32),
    }
    import torch

    action = post(policy.select_action(pre({k: torch.from_numpy(v) for k, v in obs.items()})))
    assert tuple(action.shape) == (1, 2) and bool(action.isfinite().all())

    second = refine(cfg(store, demos))  # no inputs given: the parent's are kept
    assert second.parent == first.version.ref
    assert PolicyStore(store, "act_state").verify(second.version)["policy_inputs"] == list(STATE_ONLY)
    with pytest.raises(ValueError, match="keeps the inputs"):
        refine(cfg(store, demos, policy_inputs=("observation.state", "observation.images.front")))


def test_unknown_inputs_and_bad_settings_are_clear_errors(tmp_path, demos):
    with pytest.raises(ValueError, match=r"observation\.images\.front"):  # the message lists what there is
        refine(
            cfg(
                tmp_path / "p",
                demos,
                from_scratch=True,
                policy_overrides=TINY_ACT,
                policy_inputs=("observation.state", "observation.depth"),
            )
        )
    with pytest.raises(ValueError, match="observation feature names"):
        cfg(tmp_path / "p", demos, policy_inputs=("action",))
    with pytest.raises(ValueError, match="not a string"):
        cfg(tmp_path / "p", demos, policy_inputs="observation.state")
    bad_mode = {**TINY_ACT, "normalization_mapping": {"ENV": "LOUDNESS"}}
    with pytest.raises(ValueError, match="unknown mode"):
        refine(cfg(tmp_path / "p", demos, from_scratch=True, policy_overrides=bad_mode))


def test_the_cli_takes_policy_inputs(tmp_path, demos, capsys):
    store = tmp_path / "policies"
    argv = ["--store", str(store), "--policy", "cli", "--demos", str(demos), "--steps", "1"]
    argv += ["--batch-size", "4", "--from-scratch", "--no-report", "--quiet"]
    argv += ["--policy-config", json.dumps(TINY_ACT), "--policy-inputs", *STATE_ONLY]
    assert main(argv) == 0
    version = PolicyStore(store, "cli").current()
    assert version.metadata()["policy_inputs"] == list(STATE_ONLY)
    assert main([*argv[:-2], "observation.nothing"]) == 1
    assert "observation.nothing" in capsys.readouterr().err


def test_training_from_cached_frames_sees_the_same_batches(tmp_path, demos):
    store = tmp_path / "policies"
    refine(cfg(store, demos, from_scratch=True, policy_overrides=TINY_ACT, policy_inputs=STATE_ONLY))
    # two refinements of the same version, same seed: from the datasets and from the cached frames
    plain = refine(cfg(store, demos, steps=4, promote=False))
    cached = refine(cfg(store, demos, steps=4, promote=False, cache_frames=True))
    assert cached.parent == plain.parent
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    assert PolicyStore(store, "act_state").verify(cached.version)["training"]["cache_frames"] is True
