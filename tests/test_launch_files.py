"""Static checks of the launch files (launch/launch_ros have no PyPI wheels, so they cannot run here):
each compiles, and every package, executable and config file it names exists in this workspace."""

import ast
import configparser
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((REPO / "launch").glob("*.launch.py"))
PACKAGES = {p.parent.name: p.parent for p in (REPO / "ros2_ws" / "src").glob("*/package.xml")}
CONFIG_SUFFIXES = (".yaml", ".rviz", ".perspective", ".xml")


def console_scripts(package_dir: Path) -> set[str]:
    setup_py = (package_dir / "setup.py").read_text()
    return set(re.findall(r'"([\w\-]+)\s*=\s*[\w.]+:\w+"', setup_py))


def string_constants(tree: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def keyword_constants(tree: ast.AST, keyword: str) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg == keyword and isinstance(kw.value, ast.Constant):
                    found.append(kw.value.value)
    return found


def test_there_are_launch_files():
    assert any(p.name == "reward.launch.py" for p in LAUNCH_FILES), "launch/reward.launch.py is missing"


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_launch_file_compiles_and_names_only_existing_things(path: Path):
    source = path.read_text()
    tree = ast.parse(source, filename=str(path))
    compile(tree, str(path), "exec")
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)

    ours = {"lrm_reward", "lrm_interfaces"}
    for package in keyword_constants(tree, "package"):
        if package in ours:
            assert package in PACKAGES, f"{path.name} names package {package!r}, not in ros2_ws/src"
    for executable in keyword_constants(tree, "executable"):
        if executable in {"rviz2", "rqt", "plotjuggler"}:
            continue  # from the user's ROS install
        scripts = console_scripts(PACKAGES["lrm_reward"])
        assert executable in scripts, f"{path.name}: no executable {executable!r}"
    for name in string_constants(tree):
        if name.endswith(CONFIG_SUFFIXES) and "/" not in name and not name.startswith("$"):
            assert (REPO / "config" / name).exists() or (REPO / "launch" / name).exists(), (
                f"{path.name} names {name!r}, which is neither in config/ nor launch/"
            )

    # Every DeclareLaunchArgument carries a description.
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == (
            "DeclareLaunchArgument"
        ):
            assert any(kw.arg == "description" for kw in node.keywords), (
                f"{path.name}: a launch argument has no description (line {node.lineno})"
            )


def test_launch_and_config_are_installed_into_the_share_directory():
    share = REPO / "ros2_ws" / "install" / "lrm_reward" / "share" / "lrm_reward"
    if not share.exists():
        pytest.fail("ros2_ws/install is missing: run scripts/setup.sh")
    for path in LAUNCH_FILES:
        assert (share / "launch" / path.name).exists(), f"{path.name} not installed: rerun colcon build"
    for path in (REPO / "config").glob("*.*"):
        assert (share / "config" / path.name).exists(), f"config/{path.name} not installed"


def test_setup_cfg_installs_scripts_where_ros2_run_looks():
    cfg = configparser.ConfigParser()
    cfg.read(PACKAGES["lrm_reward"] / "setup.cfg")
    assert cfg["install"]["install_scripts"] == "$base/lib/lrm_reward"
