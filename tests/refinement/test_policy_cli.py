"""lrm-policy: versions with how each did on the robot; promote (and roll back) `current` safely."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lrm_reward.refinement.policy_cli import PROMOTIONS, main
from lrm_reward.refinement.policy_store import PolicyStore


def _version(store: PolicyStore, parent: str | None, kept: list[dict], loss: float) -> str:
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


def _episode(dataset: Path, index: int, policy_version: str, outcome: str, judged: bool | None) -> None:
    (dataset / "meta").mkdir(parents=True, exist_ok=True)
    (dataset / "meta" / "info.json").write_text("{}")
    (dataset / "recording").mkdir(exist_ok=True)
    name = f"episode_{index:06d}.json"
    sidecar = {"policy_version": policy_version, "outcome": outcome}
    (dataset / "recording" / name).write_text(json.dumps(sidecar))
    if judged is not None:
        (dataset / "judgments").mkdir(exist_ok=True)
        (dataset / "judgments" / name).write_text(json.dumps({"success": judged}))


@pytest.fixture
def store(tmp_path) -> PolicyStore:
    store = PolicyStore(tmp_path / "policies", "act_pick")
    _version(store, None, [{"source": "demo"}] * 3, 0.5)
    _version(store, "act_pick/v0001", [{"source": "judged"}] * 2 + [{"source": "demo"}] * 3, 0.25)
    return store


def test_list_shows_versions_and_how_each_did_on_the_robot(store, tmp_path, capsys):
    night1, night2 = tmp_path / "data" / "rec_2026-11-25", tmp_path / "data" / "rec_2026-11-26"
    _episode(night1, 0, "act_pick/v0001", "success", True)
    _episode(night1, 1, "act_pick/v0001", "failure", False)
    _episode(night1, 2, "v0001", "unknown", True)  # bare version names count too
    _episode(night2, 0, "act_pick/v0002", "unknown", True)
    _episode(night2, 1, "act_pick/v0002", "unknown", None)  # not judged yet
    _episode(night2, 2, "other_policy/v0002", "success", True)  # another policy's: not counted
    _episode(night2, 3, "teleop", "success", None)  # free-form label: not counted

    argv = ["list", "--store", str(store.root), "--policy", "act_pick", "--data-root", str(tmp_path / "data")]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("(current: v0002)")
    v1 = next(line for line in out if " v0001 " in line)
    v2 = next(line for line in out if " v0002 " in line)
    assert "0 judged + 3 demos" in v1 and "0.5000" in v1
    assert "3 episodes, judge 2/3 (67%), operator 1/2 (50%)" in v1
    assert v2.startswith("*") and "v0001" in v2 and "2 judged + 3 demos" in v2
    assert v2.endswith("2 episodes, judge 1/1 (100%)")


def test_promote_moves_current_back_and_logs_it(store, capsys):
    assert main(["promote", "--store", str(store.root), "--policy", "act_pick", "v0001"]) == 0
    assert "current v0002 -> v0001" in capsys.readouterr().out
    assert store.current().version == "v0001"
    log = [json.loads(line) for line in (store.dir / PROMOTIONS).read_text().splitlines()]
    assert log[-1]["version"] == "v0001" and log[-1]["previous"] == "v0002"


def test_promote_refuses_unknown_corrupt_or_busy(store, capsys):
    argv = ["promote", "--store", str(store.root), "--policy", "act_pick"]
    assert main([*argv, "v0009"]) == 2
    assert "no version 'v0009' (versions: v0001, v0002)" in capsys.readouterr().err
    (store.dir / "v0001" / "config.json").write_text("{}")  # altered after it was checksummed
    assert main([*argv, "v0001"]) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    assert store.current().version == "v0002"  # current stays
    with PolicyStore(store.root, "act_pick"):  # a refinement run holds the store
        assert main([*argv, "v0002"]) == 1
    assert "another refinement run is using policy store" in capsys.readouterr().err
