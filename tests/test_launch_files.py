"""The launch file's own logic, without starting anything: which launch arguments become which node
parameters and remappings (an argument left empty must leave the params file's value), how ``adapters:=``
picks the folders that exist, and the fix it prints when the node cannot configure. Real launches (the node
started by ``ros2 launch``, parameters read back with ``ros2 param get``) are in tests/ros/test_launch.py."""

import importlib.util
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILE = REPO / "launch" / "reward.launch.py"
SHARE = REPO / "ros2_ws" / "install" / "lrm_reward" / "share" / "lrm_reward"


@pytest.fixture(scope="module")
def launch_file():
    spec = importlib.util.spec_from_file_location("reward_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def given(**values: str):
    """arg(name) for node_parameters: the launch arguments given on the command line, defaults otherwise."""
    return lambda name: values.get(name, {"image": "/camera/image_raw"}.get(name, ""))


def test_every_argument_has_a_description(launch_file):
    description = launch_file.generate_launch_description()
    arguments = description.get_launch_arguments()
    assert {a.name for a in arguments} >= {
        "compressed",
        "image_topics",
        "autostart",
        "adapters",
        "namespace",
        "use_sim_time",
        "modalities",
        "interval_frames",
        "dtype",
        "compile",
    }
    assert all(a.description.strip() for a in arguments)


def test_arguments_left_empty_leave_the_params_file_alone(launch_file):
    overrides, remappings = launch_file.node_parameters(given())
    assert overrides == {}  # not even compressed/autostart/image_topics: the params file decides
    assert remappings == [("image", "/camera/image_raw")]


def test_given_arguments_become_parameters(launch_file, tmp_path):
    for name in ("progress", "completion"):  # no contrastive/ folder
        (tmp_path / name).mkdir()
    overrides, remappings = launch_file.node_parameters(
        given(
            image_topics="/a/image,/b/image",
            compressed="true,false",
            autostart="false",
            use_sim_time="true",
            interval_frames="7",
            modalities="progress, completion",
            dtype="float32",
            compile="cuda-graphs",
            adapters=str(tmp_path),
            model_path="~/models/base",
        )
    )
    assert remappings == [("image_0", "/a/image"), ("image_1", "/b/image")]
    assert overrides == {
        "image_topics": ["image_0", "image_1"],
        "compressed": [True, False],
        "autostart": False,
        "use_sim_time": True,
        "interval_frames": 7,
        "modalities": ["progress", "completion"],
        "model.dtype": "float32",
        "model.compile": "cuda-graphs",
        "model.base": str(Path.home() / "models" / "base"),
        # whichever folders exist; the missing one is cleared, not left at the params file's Hub id
        "model.adapters.progress": str(tmp_path / "progress"),
        "model.adapters.contrastive": "",
        "model.adapters.completion": str(tmp_path / "completion"),
    }


def test_bad_arguments_are_named(launch_file, tmp_path):
    with pytest.raises(ValueError, match="interval_frames"):
        launch_file.node_parameters(given(interval_frames="ten"))
    with pytest.raises(ValueError, match="autostart"):
        launch_file.node_parameters(given(autostart="maybe"))
    with pytest.raises(ValueError, match="none of the adapter folders"):
        launch_file.node_parameters(given(adapters=str(tmp_path)))


def test_params_file_is_read_with_dotted_names(launch_file):
    params = launch_file.file_parameters(str(REPO / "config" / "reward_node.yaml"))
    assert params["autostart"] is True
    assert params["model.adapters.progress"] == "USC-PSI-Lab/LRM-models/progress"


def test_configure_failure_hint_names_missing_paths_and_the_download(launch_file, tmp_path):
    hint = launch_file.configure_failure_hint(
        {"model.base": str(tmp_path / "nowhere"), "model.adapters.progress": str(tmp_path)}
    )
    assert f"model_path {tmp_path / 'nowhere'} does not exist" in hint
    assert "huggingface-cli download Qwen/Qwen3-VL-8B-Instruct" in hint
    assert str(tmp_path) + " does not" not in hint  # the existing adapter folder is not blamed


def test_launch_and_config_are_installed_into_the_share_directory():
    if not SHARE.exists():
        pytest.fail("ros2_ws/install is missing: run scripts/setup.sh")
    for path in (REPO / "launch").glob("*.launch.py"):
        installed = SHARE / "launch" / path.name
        assert installed.exists(), f"{path.name} not installed: rerun scripts/setup.sh"
        assert installed.read_text() == path.read_text(), f"{path.name} is stale: rerun scripts/setup.sh"
    for path in (REPO / "config").glob("*.*"):
        assert (SHARE / "config" / path.name).exists(), f"config/{path.name} not installed"
    yaml.safe_load((SHARE / "config" / "reward_node.yaml").read_text())
