"""A policy store's versions and the episodes recorded while each ran (sidecar + judgment), written
directly: lrm-policy's and the nightly keep-best step's test data."""

from __future__ import annotations

import json
from pathlib import Path

from lrm_reward.refinement.policy_store import PolicyStore


def add_version(store: PolicyStore, parent: str | None, kept: list[dict], loss: float) -> str:
    """A committed version (config only) with this metadata, promoted to current."""
    with store:
        staging = store.new_staging_dir()
        (staging / "config.json").write_text(json.dumps({"type": "act"}))
        meta = {
            "created_at": "2026-11-25T23:30:00+00:00",
            "parent": parent,
            "selection": {"kept": kept, "rejected": []},
            "final_loss": loss,
        }
        version = store.commit(staging, meta)
        store.promote(version)
    return version.version


def add_episode(dataset: Path, index: int, policy_version: str, outcome: str, judged: bool | None) -> None:
    """One recorded episode's sidecar and, unless judged is None, its judgment."""
    (dataset / "meta").mkdir(parents=True, exist_ok=True)
    (dataset / "meta" / "info.json").write_text("{}")
    (dataset / "recording").mkdir(exist_ok=True)
    name = f"episode_{index:06d}.json"
    sidecar = {"policy_version": policy_version, "outcome": outcome}
    (dataset / "recording" / name).write_text(json.dumps(sidecar))
    if judged is not None:
        (dataset / "judgments").mkdir(exist_ok=True)
        (dataset / "judgments" / name).write_text(json.dumps({"success": judged}))
