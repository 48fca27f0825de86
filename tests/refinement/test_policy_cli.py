"""lrm-policy: versions with how each did on the robot; promote (and roll back) `current` safely."""

from __future__ import annotations

import json

import pytest
from store_records import add_episode, add_version

from lrm_reward.refinement.policy_cli import PROMOTIONS, main
from lrm_reward.refinement.policy_store import PolicyStore


@pytest.fixture
def store(tmp_path) -> PolicyStore:
    store = PolicyStore(tmp_path / "policies", "act_pick")
    add_version(store, None, [{"source": "demo"}] * 3, 0.5)
    add_version(store, "act_pick/v0001", [{"source": "judged"}] * 2 + [{"source": "demo"}] * 3, 0.25)
    return store


def test_list_shows_versions_and_how_each_did_on_the_robot(store, tmp_path, capsys):
    night1, night2 = tmp_path / "data" / "rec_2026-11-25", tmp_path / "data" / "rec_2026-11-26"
    add_episode(night1, 0, "act_pick/v0001", "success", True)
    add_episode(night1, 1, "act_pick/v0001", "failure", False)
    add_episode(night1, 2, "v0001", "unknown", True)  # bare version names count too
    add_episode(night2, 0, "act_pick/v0002", "unknown", True)
    add_episode(night2, 1, "act_pick/v0002", "unknown", None)  # not judged yet
    add_episode(night2, 2, "other_policy/v0002", "success", True)  # another policy's: not counted
    add_episode(night2, 3, "teleop", "success", None)  # free-form label: not counted

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


def test_promote_best_picks_the_version_the_judge_liked_most(store, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(10):  # v0001: 6 of 10 judged successes; v0002 (current): 3 of 10
        add_episode(data / "night1", i, "act_pick/v0001", "unknown", i < 6)
        add_episode(data / "night2", i, "act_pick/v0002", "unknown", i < 3)
    argv = ["promote", "--store", str(store.root), "--policy", "act_pick", "--data-root", str(data)]
    assert main([*argv, "--best"]) == 0
    out = capsys.readouterr().out
    assert "best on the robot: v0001 (10 episodes, judge 6/10 (60%))" in out
    assert "current v0002 -> v0001" in out and store.current().version == "v0001"
    # a version with too few judged episodes does not compete, however good its rate
    add_version(store, "act_pick/v0001", [{"source": "judged"}], 0.2)  # v0003, now current
    for i in range(4):
        add_episode(data / "night3", i, "act_pick/v0003", "unknown", True)
    assert main([*argv, "--best"]) == 0
    assert store.current().version == "v0001"
    capsys.readouterr()
    assert main([*argv, "--best", "--min-judged", "4"]) == 0
    assert "best on the robot: v0003 (4 episodes, judge 4/4 (100%))" in capsys.readouterr().out
    # ties go to the newer version
    for i in range(10):
        add_episode(data / "night4", i, "act_pick/v0002", "unknown", i < 9)  # v0002: 12 of 20, 60 % as v0001
    assert main([*argv, "--best", "--min-judged", "10"]) == 0
    assert "best on the robot: v0002 (20 episodes, judge 12/20 (60%))" in capsys.readouterr().out


def test_promote_best_needs_recordings_and_no_version(store, tmp_path, capsys):
    argv = ["promote", "--store", str(store.root), "--policy", "act_pick"]
    assert main([*argv, "--best", "--data-root", str(tmp_path / "empty")]) == 2
    assert "no version of act_pick has 10 or more judged episodes" in capsys.readouterr().err
    assert main([*argv, "--best", "v0001"]) == 2
    assert main(argv) == 2
    assert "name a version or pass --best" in capsys.readouterr().err
    assert main([*argv, "v0001", "--min-judged", "3"]) == 2
    assert "go with --best" in capsys.readouterr().err
    assert store.current().version == "v0002"


def test_promote_best_past_a_corrupt_version(store, tmp_path, capsys):
    data = tmp_path / "data"
    for i in range(10):
        add_episode(data / "night1", i, "act_pick/v0001", "unknown", i < 6)
        add_episode(data / "night2", i, "act_pick/v0002", "unknown", i < 3)
    argv = ["promote", "--store", str(store.root), "--policy", "act_pick", "--data-root", str(data), "--best"]
    (store.dir / "v0001" / "config.json").write_text("{}")  # the best one fails its checksum
    assert main(argv) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    assert main([*argv, "--or-current"]) == 0  # the nightly step: the night goes on from current
    assert "current stays" in capsys.readouterr().out and store.current().version == "v0002"
    (store.dir / "v0001" / "config.json").write_text(json.dumps({"type": "act"}))  # restored
    (store.dir / "v0002" / "config.json").write_text("{}")  # now current is the corrupt one
    assert main(argv) == 0
    assert "act_pick: current v0002 -> v0001" in capsys.readouterr().out  # a corrupt current does not block
    assert store.current().version == "v0001"
