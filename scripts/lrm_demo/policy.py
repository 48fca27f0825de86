"""The policy stages: ACT trained on the demonstrations, refined on judged rollouts (lrm-refine's code)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from lrm_demo.common import POLICY_INPUTS, POLICY_NAME, DemoError, DemoSettings


def act_overrides(s: DemoSettings) -> dict:
    return {
        "chunk_size": 10,
        "n_action_steps": 10,
        "dim_model": 128,
        "dim_feedforward": 512,
        "n_heads": 4,
        "n_encoder_layers": 2,
        "n_decoder_layers": 1,
        "use_vae": False,
        # ACT leaves observation.environment_state unnormalized; the cube/goal offsets are centimetres,
        # small next to the joint angles, so they get the same mean/std scaling as the state.
        "normalization_mapping": {"ENV": "MEAN_STD"},
    }


@contextlib.contextmanager
def one_torch_thread():
    """A policy this small trains fastest on one thread; two OpenMP threads on a busy 2-core machine spin
    against each other (measured: the same ACT steps became several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_policy(out: Path, s: DemoSettings, demos: dict) -> dict:
    store = out / "policies"
    if store.exists():
        shutil.rmtree(store)
    with one_torch_thread():
        result = _train_from_scratch(store, s, demos)
    return {
        "store": str(store),
        "version": result.version.ref,
        "path": str(result.version.path),
        "final_loss": result.losses[-1] if result.losses else None,
    }


def _train_from_scratch(store: Path, s: DemoSettings, demos: dict):
    from lrm_reward.refinement.refine import RefineConfig, refine

    return refine(
        RefineConfig(
            store_root=store,
            policy_name=POLICY_NAME,
            demos=[Path(demos["root"])],
            steps=s.policy_steps,
            batch_size=s.batch_size,
            lr=s.policy_lr,
            device=s.device,
            from_scratch=True,
            policy_type="act",
            policy_overrides=act_overrides(s),
            policy_inputs=POLICY_INPUTS,
            cache_frames=True,
            report=False,
        )
    )


def refine_policy(out: Path, s: DemoSettings, rollouts: list[dict], demos: dict) -> dict:
    from lrm_reward.refinement.refine import NothingToTrainError, RefineConfig, refine

    try:
        result = refine(
            RefineConfig(
                store_root=Path(out / "policies"),
                policy_name=POLICY_NAME,
                datasets=[Path(roll["dataset"]) for roll in rollouts],
                demos=[Path(demos["root"])],
                steps=s.refine_steps,
                batch_size=s.batch_size,
                lr=s.refine_lr,
                lr_schedule=s.refine_schedule,
                cache_frames=True,
                device=s.device,
                selection=s.selection,
            )
        )
    except NothingToTrainError as exc:
        raise DemoError(f"refinement selected nothing: {exc}") from exc
    judged = [r for r in result.selection.kept if r["source"] == "judged"]
    judged_kept = [r for r in judged if r["weight"] == "full"]
    return {
        "selection": s.selection,
        "weighted_episodes": len(judged) - len(judged_kept),
        "version": result.version.ref,
        "path": str(result.version.path),
        "parent": result.parent,
        "judged_successes_used": len(judged_kept),
        "demos_used": sum(1 for r in result.selection.kept if r["source"] == "demo"),
        "final_loss": result.losses[-1] if result.losses else None,
        "report": str(result.report) if result.report else "",
    }
