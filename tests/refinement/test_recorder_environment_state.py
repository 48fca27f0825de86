"""EpisodeRecorder's optional observation.environment_state stream (e.g. object poses from a simulator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from recorder_scenarios import make_recorder
from synthetic_streams import feed_episode

from lrm_reward.refinement.recorder import ENV_STATE_KEY, RecorderConfig, SaveStatus

ENV_NAMES = ("cube_x", "cube_y", "cube_z")


def env_for(stamp_s: float) -> np.ndarray:
    return np.array([stamp_s, 10.0 + stamp_s, -stamp_s])


def feed_environment(rec, t_start: float, duration_s: float, hz: float = 25.0, nan_every: int = 0) -> int:
    sent_nan = 0
    for k, rel in enumerate(np.arange(0.0, duration_s, 1.0 / hz)):
        values = env_for(float(rel))
        if nan_every and k % nan_every == nan_every - 1:
            values[0] = np.nan
            sent_nan += 1
        rec.add_environment_state(t_start + float(rel), values)
    return sent_nan


def test_environment_state_is_recorded_resampled_and_loads(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rec = make_recorder(tmp_path, environment_state_names=ENV_NAMES)
    rec.start("move the cube")
    feed_episode(rec, t_start=50.0, duration_s=2.0)
    nans = feed_environment(rec, t_start=50.0, duration_s=2.0, nan_every=5)
    result = rec.stop("success")
    assert result.status is SaveStatus.SAVED, result.message
    sidecar = json.loads(result.sidecar.read_text())
    assert sidecar["dropped"]["nan_environment_states"] == nans > 0
    assert sidecar["received"]["environment_state"] == 50 - nans
    rec.close()

    ds = LeRobotDataset("lrm/run", root=tmp_path / "run", video_backend="pyav")
    assert ds.features[ENV_STATE_KEY]["names"] == list(ENV_NAMES)
    assert ds.features[ENV_STATE_KEY]["dtype"] == "float32"
    # frame 6 is at 0.6 s; env samples at 25 Hz -> 0.6 s exactly (index 15, not a NaN one: 15 % 5 != 4)
    np.testing.assert_allclose(ds[6][ENV_STATE_KEY].numpy(), env_for(0.6), atol=1e-4)
    values = np.stack([ds[i][ENV_STATE_KEY].numpy() for i in range(len(ds))])
    assert np.all(np.isfinite(values))


def test_environment_state_is_reordered_by_name_and_validated(tmp_path):
    rec = make_recorder(tmp_path, environment_state_names=ENV_NAMES)
    rec.start("validate")
    assert rec.add_environment_state(0.0, [3.0, 2.0, 1.0], names=list(reversed(ENV_NAMES)))
    _stamps, values = rec._episode.environment_state.arrays(3)
    np.testing.assert_allclose(values[0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="environment_state has 2 values, this recording expects 3"):
        rec.add_environment_state(0.1, [1.0, 2.0])
    with pytest.raises(ValueError, match="lacks"):
        rec.add_environment_state(0.1, [1.0, 2.0, 3.0], names=["a", "b", "c"])
    assert rec._episode.counters["bad_environment_states"] == 2
    rec.abort()


def test_environment_state_is_required_when_configured(tmp_path):
    rec = make_recorder(tmp_path, environment_state_names=ENV_NAMES)
    rec.start("no env samples")
    feed_episode(rec, t_start=0.0, duration_s=1.0)
    result = rec.stop()
    assert result.status is SaveStatus.EMPTY and "environment_state" in result.message


def test_environment_state_off_by_default(tmp_path):
    rec = make_recorder(tmp_path)
    rec.start("plain")
    assert rec.add_environment_state(0.0, [1.0, 2.0, 3.0]) is False
    feed_episode(rec, t_start=0.0, duration_s=1.0)
    assert rec.stop().status is SaveStatus.SAVED
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    assert ENV_STATE_KEY not in LeRobotDataset("lrm/run", root=tmp_path / "run").features


def test_environment_state_names_from_the_first_sample_when_none(tmp_path):
    rec = make_recorder(tmp_path, environment_state_names=None)
    rec.start("names learned")
    assert rec.add_environment_state(0.0, [1.0, 2.0], names=["door", "drawer"])
    assert rec.environment_state_names == ("door", "drawer")
    rec.abort()
    with pytest.raises(ValueError, match="duplicates"):
        RecorderConfig(data_root=tmp_path, environment_state_names=("a", "a"))
