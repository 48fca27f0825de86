"""The simulated SO-101 scene and the noisy expert: goal visible to the camera, ground truth from the sim,
bad actions refused with a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from lrm_reward.sim.noisy_expert import ExpertNoise, NoisyExpert
from lrm_reward.sim.so101_scene import JOINT_NAMES, SceneConfig, So101Scene

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scene():
    with So101Scene(SceneConfig(image_size=64, max_steps=70)) as s:
        yield s


def _green_pixels(image: np.ndarray) -> int:
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return int(np.sum((g > 150) & (g > r + 60) & (g > b + 60)))


def test_the_goal_marker_is_drawn_and_only_in_the_rendered_image(scene):
    state = scene.reset(3)
    assert state.image.shape == (64, 64, 3) and state.image.dtype == np.uint8
    assert _green_pixels(state.image) > 5
    scene.cfg.marker_rgba = (0.6, 0.3, 0.6, 0.0)  # transparent marker: the green disappears
    try:
        assert _green_pixels(scene.render()) == 0
    finally:
        scene.cfg.marker_rgba = SceneConfig().marker_rgba
    assert state.joint_positions.shape == (len(JOINT_NAMES),)


def test_the_noise_free_expert_succeeds_by_the_simulators_ground_truth(scene):
    expert = NoisyExpert(ExpertNoise())
    state = scene.reset(5)
    expert.reset(5)
    while not state.done:
        state = scene.step(expert.act(state))
    assert state.success and state.info["succeed"]
    assert np.linalg.norm(state.block_position[:2] - state.goal_position[:2]) < 0.03


def test_a_large_grasp_offset_makes_the_expert_fail(scene):
    expert = NoisyExpert(ExpertNoise(grasp_offset_sigma_m=0.2, seed=1))
    state = scene.reset(5)
    expert.reset(5)
    while not state.done:
        state = scene.step(expert.act(state))
    assert not state.success


def test_bad_actions_are_refused_with_a_clear_error(scene):
    scene.reset(0)
    with pytest.raises(ValueError, match="4 values"):
        scene.step(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        scene.step(np.array([0.0, np.nan, 0.0, 1.0]))


def _cube_pixels(image: np.ndarray) -> int:
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return int(np.sum((r > 150) & (b > 150) & (g < r - 40)))  # the purple-pink cube


def test_the_workspace_view_shows_cube_and_target_larger_than_the_front_view():
    """The reward model must see the cube on the target: the default view makes them cover many pixels."""
    sizes = {}
    for view in ("front", "workspace"):
        with So101Scene(SceneConfig(image_size=96, max_steps=5, camera=view)) as sc:
            image = sc.reset(7).image
        sizes[view] = (_cube_pixels(image), _green_pixels(image))
    assert SceneConfig().camera == "workspace"
    front, workspace = sizes["front"], sizes["workspace"]
    # measured at seed 7, 96 px: cube 29 -> 87 pixels, target 61 -> 139
    assert workspace[0] >= 2 * max(1, front[0]) and workspace[1] >= 2 * max(1, front[1]), sizes


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="image_size"):
        SceneConfig(image_size=4)
    with pytest.raises(ValueError, match="camera must be one of"):
        SceneConfig(camera="ceiling")
    with pytest.raises(ValueError, match="action_sigma"):
        ExpertNoise(action_sigma=-1.0)
