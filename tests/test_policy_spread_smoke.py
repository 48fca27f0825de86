"""benchmarks/policy_spread.py: its statistics on known numbers, and --arms / --rounds end to end at --smoke
scale on a tiny demo run made here (no ROS, no demo script).

The fake demo run has what a finished scripts/demo.py run leaves for the benchmark: two noisy-expert
demonstrations, a rollout1 recording of three episodes by a policy trained for two steps (recorded by the
benchmark's own in-process recorder, so without live progress), lrm-judge's verdicts on it by the test
suite's tiny reward model, and a state.json that names them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmark's spread package
sys.path.insert(0, str(REPO / "scripts"))  # the demo's lrm_demo package, which it uses

IMAGE_SIZE, MAX_STEPS, LAYOUTS = 48, 15, [1000, 1001, 1002]


# ---------------------------------------------------------------------------------------------- statistics
def test_the_interval_of_a_constant_delta_is_that_delta():
    from spread.intervals import bootstrap_interval, compare

    assert bootstrap_interval(np.ones((3, 40))) == (1.0, 1.0)
    row = compare(np.ones((3, 40), int), np.zeros((3, 40), int))
    assert row["successes"] == [40, 40, 40] and row["delta"] == [40, 40, 40]
    assert row["mean_delta"] == 40.0 and row["interval"] == [40.0, 40.0]


def test_the_interval_covers_the_mean_and_is_reproducible():
    from spread.intervals import bootstrap_interval

    rng = np.random.default_rng(1)
    delta = rng.integers(-1, 2, (3, 40))
    lo, hi = bootstrap_interval(delta)
    assert lo < delta.mean() < hi
    assert bootstrap_interval(delta) == (lo, hi)  # fixed rng seed
    # a seed far off the others widens the interval: seeds are resampled, not only layouts
    wide = delta.copy()
    wide[2] = 1
    lo2, hi2 = bootstrap_interval(wide)
    assert hi2 - lo2 > hi - lo


def _summary(default_all, default_unseen, oracle_all, oracle_unseen, per_seed):
    def row(mean, layouts, delta=None):
        return {"mean_delta": mean, "layouts": layouts, "delta": delta or []}

    return {
        "both": {"all": row(default_all, 40, per_seed), "unseen": row(default_unseen, 20)},
        "oracle": {"all": row(oracle_all, 40), "unseen": row(oracle_unseen, 20)},
    }


def test_the_target_is_computed_from_the_numbers():
    from spread.arms import target_verdict

    met = target_verdict(_summary(4.0, 2.0, 7.0, 3.0, [3, 5, 4]), "both")
    assert met["met"] and all(c["met"] for c in met["checks"])
    short = target_verdict(_summary(3.0, 1.0, 7.0, 3.0, [3, 5, 1]), "both")
    assert not short["met"]
    assert "short by 0.5 of 40 layouts" in short["checks"][0]["detail"]
    assert "short by 0.5 of 20 layouts" in short["checks"][1]["detail"]
    below = target_verdict(_summary(4.0, 2.0, 7.0, 3.0, [6, 7, -1]), "both")
    assert not below["met"] and not below["checks"][2]["met"] and "worst -1" in below["checks"][2]["detail"]
    no_headroom = target_verdict(_summary(1.0, 1.0, 0.0, -1.0, [1, 1, 1]), "both")
    assert not no_headroom["met"] and "no headroom" in no_headroom["checks"][0]["detail"]


def test_the_product_default_is_lrm_refines_cli_default():
    from spread.arms import SELECTION_ARMS
    from spread.demo_run import product_default_selection

    from lrm_reward.refinement.refine_cli import build_arg_parser

    assert (
        product_default_selection()
        == build_arg_parser().parse_args(["--store", "s", "--policy", "p"]).selection
    )
    assert product_default_selection() in SELECTION_ARMS


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def fake_demo_run(tmp_path_factory, tiny_lrm):
    from lrm_demo.sim_episodes import record_expert_episodes
    from spread.demo_run import POLICY_INPUTS, POLICY_NAME, act_overrides
    from spread.rollouts import record_rollouts

    from lrm_reward.refinement import judge as J
    from lrm_reward.refinement import judge_cli
    from lrm_reward.refinement.refine import RefineConfig, refine

    out = tmp_path_factory.mktemp("demo_run")
    s = SimpleNamespace(image_size=IMAGE_SIZE, max_steps=MAX_STEPS, camera_view="workspace")
    demos = out / "data" / "demos"
    episodes = record_expert_episodes(demos, [0, 1], [(0.05, 0.01, "", 0.0)], s, lambda ok: "demos", "demos")
    first = refine(
        RefineConfig(
            store_root=out / "policies", policy_name=POLICY_NAME, demos=[demos / "demos"], steps=2,
            batch_size=4, from_scratch=True, policy_overrides=act_overrides(None),
            policy_inputs=POLICY_INPUTS, cache_frames=True, report=False, progress_bar=False,
        )
    )  # fmt: skip
    rows = record_rollouts(
        first.version.path, LAYOUTS, MAX_STEPS, IMAGE_SIZE, "workspace", out / "rollout1", "rollouts", "fake"
    )
    rollout = out / "rollout1" / "rollouts"
    adapters = tiny_lrm.base.parent
    spec = ",".join(f"{m}={adapters / m}" for m in ("progress", "completion"))
    argv = [str(rollout), "--model", str(tiny_lrm.base), "--adapters", spec, "--every-k", "5", "--quiet"]
    assert judge_cli.main([*argv, "--success-threshold", "0.25"]) == 0
    judged = J.load_judgments(rollout)
    settings = {
        "max_steps": MAX_STEPS, "image_size": IMAGE_SIZE, "camera_view": "workspace", "judge_threshold": 0.25,
        "policy_steps": 2, "refine_steps": 2, "batch_size": 4, "policy_lr": 5e-4, "refine_lr": 2e-4,
        "device": "cpu",
    }  # fmt: skip
    done = {
        "demos": {"root": str(demos / "demos"), "episodes": episodes},
        "reward": {"base": str(tiny_lrm.base), "adapters": str(adapters)},
        "rollout1": {"dataset": str(rollout), "episodes": rows},
        "judge1": {"rows": [{**r, "judged_success": judged[r["episode_index"]].success} for r in rows]},
    }
    (out / "state.json").write_text(json.dumps({"settings": settings, "done": done}))
    return out


def _smoke(*args: str, json_path: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / "policy_spread.py"), *args, "--smoke", "--json", str(json_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"stdout": proc.stdout, **json.loads(json_path.read_text())}


@pytest.mark.slow
def test_arms_smoke(fake_demo_run, tmp_path):
    from spread.arms import ARMS

    got = _smoke("--arms", str(fake_demo_run), json_path=tmp_path / "arms.json")
    assert list(got["results"]) == ["base", *ARMS]
    assert got["layouts"] == [LAYOUTS[-1], LAYOUTS[-1] + 1]  # one layout rollout1 ran on, one it did not
    assert got["subsets"] == {"all": got["layouts"], "seen": [LAYOUTS[-1]], "unseen": [LAYOUTS[-1] + 1]}
    for arm, per_seed in got["results"].items():
        assert sorted(per_seed) == ["0", "1"], arm
        for row in per_seed.values():
            assert len(row["outcomes"]) == 2 and row["successes"] == sum(row["outcomes"])
    used = got["rollout1_used"]
    assert used["no filter"]["full"] == [0, 1, 2] and used["demos only"]["full"] == []
    # weighting trains on every episode by progress: here the judge's curves (no live progress recorded)
    assert used["weighting"]["full"] == [] and used["weighting"]["weighted"]
    assert set(used["weighting"]["progress_sources"]) <= {"judge", "none"}
    judged = sorted(int(e) for e, ok in got["judged"].items() if ok)
    assert used["judged"]["full"] == judged == used["both"]["full"]
    assert got["product_default"]["arm"] in ARMS
    for arm in ARMS:
        for subset in ("all", "seen", "unseen"):
            row = got["summary"][arm][subset]
            assert len(row["delta"]) == 2 and len(row["interval"]) == 2
    target = got["target"]
    assert target["arm"] == got["product_default"]["arm"] and len(target["checks"]) == 3
    assert target["met"] == all(c["met"] for c in target["checks"])
    assert "(product default)" in got["stdout"] and "Target for the product default" in got["stdout"]


@pytest.mark.slow
def test_rounds_smoke(fake_demo_run, tmp_path):
    got = _smoke(
        "--rounds",
        "--demo-out",
        str(fake_demo_run),
        "--selection",
        "both",
        "--keep-best",
        json_path=tmp_path / "rounds.json",
    )
    assert got["rounds"] == 3 and got["round_layouts"] == [1000] and got["other_layouts"] == [1001]
    assert got["selection"] == "both"  # not lrm-refine's default: the option reaches every round's refine
    assert got["keep_best"] is True
    for seed, rows in got["per_seed"].items():
        assert [r["round"] for r in rows] == [1, 2, 3], seed
        assert [r["version"].rsplit("/", 1)[1] for r in rows] == ["v0001", "v0002", "v0003"]
        assert "judge" in rows[0] and "judge" in rows[1] and "judge" not in rows[2]
        # round 2 refines on both rounds recorded so far
        assert len(rows[0]["refine"]["used"]) == 1 and len(rows[1]["refine"]["used"]) == 2
        # "both": the one episode of each round trains at full weight if judged a success, else weighted
        called = [r["judge"]["matrix"]["tp"] + r["judge"]["matrix"]["fp"] for r in rows[:2]]
        for use, success in zip(rows[1]["refine"]["used"].values(), called, strict=True):
            assert (use["full"], use["weighted"]) == (([0], []) if success else ([], [0])), seed
        # keep best: round 2's refinement starts from the version judged better on its own round (ties: newer)
        best = "v0002" if called[1] >= called[0] else "v0001"
        assert rows[1]["refine"]["parent"].rsplit("/", 1)[1] == best, seed
    assert [e["round"] for e in got["summary"]] == [1, 2, 3]
    assert got["summary"][0]["seen"]["delta"] == [0, 0]  # round 1 against itself
    assert "| round | round layouts, per seed |" in got["stdout"]


def test_keep_best_goes_back_to_the_version_judged_better(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "refinement"))
    from spread.demo_run import POLICY_NAME
    from spread.rounds import keep_best
    from store_records import add_episode, add_version

    from lrm_reward.refinement.policy_store import PolicyStore

    store = PolicyStore(tmp_path / "policies", POLICY_NAME)
    add_version(store, None, [], 0.5)
    add_version(store, f"{POLICY_NAME}/v0001", [], 0.4)  # v0002, current: last night's, judged worse
    for i in range(4):
        add_episode(tmp_path / "data" / "round1", i, f"{POLICY_NAME}/v0001", "unknown", i < 3)
        add_episode(tmp_path / "data" / "round2", i, f"{POLICY_NAME}/v0002", "unknown", i < 1)
    assert keep_best(store.root, tmp_path / "data", 4) == "v0001 (4 episodes, judge 3/4 (75%))"
    assert store.current().version == "v0001"
