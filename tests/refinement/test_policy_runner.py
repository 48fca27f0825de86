"""The policy runner (policy_node's and the sim's one path): safety on every action, versions switched only
between episodes, and a clear refusal of checkpoints that are corrupt or read what the robot lacks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lrm_reward.policy import runner as R
from lrm_reward.policy.action_guard import ActionGuard, SafetyConfig
from lrm_reward.policy.tiny_policy import store_tiny_act
from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, STATE_KEY, FeatureTopics

INPUTS = {STATE_KEY: (3,), ENV_STATE_KEY: (2,)}  # ACT needs an image or an environment state
PROVIDES = {STATE_KEY: (3,), ENV_STATE_KEY: (2,), "observation.images.front": None}
OBS = {STATE_KEY: np.array([0.1, 0.2, 0.3]), ENV_STATE_KEY: np.array([1.0, 2.0])}


# ------------------------------------------------------------------------------ safety, on a scripted policy
class _Scripted:
    def reset(self) -> None:
        pass


def scripted_runner(tmp_path: Path, actions: list, safety: SafetyConfig, clock=lambda: 100.0):
    """A runner whose 'policy' returns `actions` in turn (a list item that is an Exception is raised)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text("{}")
    script = iter(actions)

    class Loaded(R.LoadedPolicy):
        def act(self, batch):
            item = next(script)
            if isinstance(item, Exception):
                raise item
            return np.asarray(item, dtype=np.float64)

    def loader(version, path, store_version, device):
        return Loaded(version, path, _Scripted(), None, None, dict(INPUTS), 2)

    runner = R.PolicyRunner(R.RunnerConfig(tmp_path, PROVIDES, 2, safety=safety), clock=clock, loader=loader)
    runner.load()
    runner.start_episode()
    return runner


def test_actions_are_clamped_to_limits_and_to_the_largest_change_per_step(tmp_path):
    safety = SafetyConfig(action_min=(-1.0, 0.0), action_max=(1.0,), max_delta=(0.5, 10.0))
    runner = scripted_runner(tmp_path, [[3.0, -2.0], [-3.0, 0.5], [-0.8, 0.6]], safety)
    first = runner.step(OBS)
    assert first.status == R.OK and first.action.tolist() == [1.0, 0.0] and first.clamped_limit
    second = runner.step(OBS)  # -3 -> limit -1 -> at most 0.5 below the previous 1.0
    assert second.action.tolist() == [0.5, 0.5] and second.clamped_limit and second.clamped_delta
    third = runner.step(OBS)
    assert third.action.tolist() == [0.0, 0.6] and third.clamped_delta and not third.clamped_limit
    assert runner.counters["clamped_to_limits"] == 2 and runner.counters["clamped_max_delta"] == 2
    runner.stop_episode()
    runner.start_episode()  # a new episode: its first action is compared with nothing
    assert runner.guard.last is None


def test_a_nan_action_is_not_sent_and_counted(tmp_path):
    runner = scripted_runner(tmp_path, [[0.1, 0.2], [np.nan, 0.0], [0.1, 0.3]], SafetyConfig())
    assert runner.step(OBS).status == R.OK
    nan = runner.step(OBS)
    assert nan.status == R.NON_FINITE and nan.action is None
    assert runner.counters["non_finite_actions"] == 1
    assert runner.step(OBS).action.tolist() == [0.1, 0.3]


def test_stale_or_missing_observations_stop_the_actions_or_hold_the_last(tmp_path):
    now = [100.0]
    for mode, expect in (("stop", None), ("hold", [0.1, 0.2])):
        safety = SafetyConfig(max_observation_age_s=0.5, on_stale=mode)
        runner = scripted_runner(tmp_path / mode, [[0.1, 0.2]] * 3, safety, clock=lambda: now[0])
        assert runner.step(OBS, {STATE_KEY: 99.8, ENV_STATE_KEY: 99.9}).status == R.OK
        stale = runner.step(OBS, {STATE_KEY: 99.0, ENV_STATE_KEY: 99.9})  # 1 s old
        assert stale.status == (R.STALE if mode == "stop" else R.HELD)
        assert (stale.action is None) if expect is None else stale.action.tolist() == expect
        assert "1.00 s old" in stale.message and runner.counters["stale_observations"] == 1
        missing = runner.step({}, {})
        assert missing.status in (R.MISSING, R.HELD) and "no observation.state" in missing.message
        nan_state = {**OBS, STATE_KEY: np.array([np.nan, 0, 0])}
        bad = runner.step(nan_state, {STATE_KEY: 100.0, ENV_STATE_KEY: 100.0})
        assert bad.status in (R.BAD_OBSERVATION, R.HELD) and "NaN" in bad.message


def test_a_policy_that_fails_to_run_is_reported_and_sends_nothing(tmp_path):
    runner = scripted_runner(tmp_path, [RuntimeError("CUDA error"), [0.0, 0.0]], SafetyConfig())
    failed = runner.step(OBS)
    assert failed.status == R.ERROR and failed.action is None and "CUDA error" in failed.message
    assert runner.counters["policy_errors"] == 1 and "CUDA error" in runner.last_error
    assert runner.step(OBS).status == R.OK


def test_safety_settings_are_validated():
    with pytest.raises(ValueError, match="on_stale"):
        SafetyConfig(on_stale="brake")
    with pytest.raises(ValueError, match="max_delta must be > 0"):
        SafetyConfig(max_delta=(0.0,))
    with pytest.raises(ValueError, match=r"give 1 .* or 2"):
        ActionGuard(SafetyConfig(action_min=(0.0, 0.0, 0.0)), 2)
    with pytest.raises(ValueError, match="above action_max"):
        ActionGuard(SafetyConfig(action_min=(1.0,), action_max=(0.0,)), 2)


# ------------------------------------------------------------------------------ real tiny ACT in a store
@pytest.fixture(scope="module")
def store_v1(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("policies")
    store_tiny_act(root, "act_pick", INPUTS, 2, bias=0.5)
    return root


@pytest.fixture
def store(store_v1, tmp_path) -> Path:
    shutil.copytree(store_v1, tmp_path / "policies", symlinks=True)
    return tmp_path / "policies"


def store_runner(path: Path, **kw) -> R.PolicyRunner:
    cfg = R.RunnerConfig(path, kw.pop("provides", PROVIDES), kw.pop("action_dim", 2), **kw)
    return R.PolicyRunner(cfg)


def test_a_promotion_during_an_episode_acts_only_from_the_next_episode(store):
    runner = store_runner(store / "act_pick" / "current")
    assert runner.load() == "act_pick/v0001"
    first = runner.start_episode()
    assert first.version == "act_pick/v0001" and first.switched_from is None
    np.testing.assert_allclose(runner.step(OBS).action, [0.5, 0.5], atol=1e-6)

    store_tiny_act(store, "act_pick", INPUTS, 2, bias=2.0)  # v0002, promoted mid-episode
    assert runner.pending_version() == "act_pick/v0002"
    result = runner.step(OBS)
    assert result.version == "act_pick/v0001"
    np.testing.assert_allclose(result.action, [0.5, 0.5], atol=1e-6)
    with pytest.raises(R.EpisodeRunningError):
        runner.start_episode()

    runner.stop_episode()
    second = runner.start_episode()
    assert second.version == "act_pick/v0002" and second.switched_from == "act_pick/v0001"
    result = runner.step(OBS)
    assert result.version == "act_pick/v0002"
    np.testing.assert_allclose(result.action, [2.0, 2.0], atol=1e-6)
    assert runner.pending_version() is None


def test_a_pinned_version_never_switches(store):
    runner = store_runner(store / "act_pick" / "v0001")
    runner.load()
    store_tiny_act(store, "act_pick", INPUTS, 2, bias=2.0)
    assert runner.pending_version() is None
    assert runner.start_episode().version == "act_pick/v0001"


def test_a_corrupt_checkpoint_is_refused_and_a_corrupt_promotion_keeps_the_running_version(store):
    version = store_tiny_act(store, "act_pick", INPUTS, 2, bias=2.0, promote=False)
    weights = version.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
    with pytest.raises(R.PolicyLoadError, match=r"model\.safetensors does not match its checksum"):
        store_runner(version.path).load()

    runner = store_runner(store / "act_pick")
    runner.load()
    (store / "act_pick" / "current").unlink()
    (store / "act_pick" / "current").symlink_to("v0002")  # promoted by hand, corrupt
    started = runner.start_episode()
    assert started.version == "act_pick/v0001" and "checksum" in started.switch_error
    assert runner.counters["switch_failures"] == 1
    assert runner.step(OBS).status == R.OK


def test_unreadable_paths_are_a_clear_error(tmp_path):
    with pytest.raises(R.PolicyLoadError, match=r"no config\.json"):
        store_runner(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(R.PolicyLoadError, match="cannot be loaded"):
        store_runner(tmp_path).load()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "current").symlink_to("v0009")
    with pytest.raises(R.PolicyLoadError, match="not a version"):
        store_runner(tmp_path / "empty").load()


@pytest.mark.parametrize(
    ("provides", "action_dim", "message"),
    [
        ({STATE_KEY: (3,)}, 2, r"reads observation\.environment_state, which no configured topic"),
        (
            {**PROVIDES, STATE_KEY: (6,)},
            2,
            r"observation\.state has shape \(3,\), the configured topics provide",
        ),
        (PROVIDES, 4, r"action shape \(2,\), the robot takes 4 values"),
    ],
)
def test_a_policy_whose_features_do_not_match_the_topics_is_refused(store, provides, action_dim, message):
    with pytest.raises(R.FeatureMismatchError, match=message):
        store_runner(store / "act_pick", provides=provides, action_dim=action_dim).load()


def test_limits_that_do_not_fit_the_action_are_refused_at_load(store):
    runner = store_runner(store / "act_pick", safety=SafetyConfig(action_max=(1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="action_max has 3 values"):
        runner.load()


# ------------------------------------------------------------------------------ the shared topic mapping
def test_feature_topics_are_the_recorders_definition():
    topics = FeatureTopics(cameras=("front",), image_topics=("",))
    assert topics.feature_topics() == {"observation.images.front": "image", STATE_KEY: "joint_states"}
    two = FeatureTopics(
        cameras=("front", "wrist"),
        state_names=("a", "b"),
        environment_state_topic="objects",
        environment_state_names=("x", "y", "z"),
    )
    assert two.camera_topics() == {"front": "image_front", "wrist": "image_wrist"}
    assert two.feature_shapes() == {
        "observation.images.front": None,
        "observation.images.wrist": None,
        STATE_KEY: (2,),
        ENV_STATE_KEY: (3,),
    }
    assert topics.missing_inputs([STATE_KEY, ENV_STATE_KEY]) == [ENV_STATE_KEY]
    with pytest.raises(ValueError, match="one topic per camera"):
        FeatureTopics(cameras=("a", "b"), image_topics=("x",))
    with pytest.raises(ValueError, match="environment_state_names is required"):
        FeatureTopics(environment_state_topic="objects")


def test_the_runner_imports_without_ros():
    code = "import sys; sys.modules['rclpy'] = None; import lrm_reward.policy.runner"
    src = Path(__file__).resolve().parents[2] / "ros2_ws" / "src" / "lrm_reward"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=src)
