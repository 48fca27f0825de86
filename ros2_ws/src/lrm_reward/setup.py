"""ament_python build of lrm_reward. The top-level launch/ and config/ folders of the repository are
installed into this package's share directory, so `ros2 launch lrm_reward reward.launch.py` works."""

import os
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "lrm_reward"
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]


def repo_files(folder: str, pattern: str) -> list[str]:
    # data_files wants paths relative to setup.py; the shared folders live at the repository top level.
    return sorted(os.path.relpath(p, HERE) for p in glob(str(REPO / folder / pattern)))


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", repo_files("launch", "*.launch.py")),
        (f"share/{PACKAGE}/config", repo_files("config", "*.*")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="lrm developers",
    maintainer_email="lrm@example.com",
    description="Dense rewards from a vision-language reward model, and the nightly policy refinement loop.",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "reward_node = lrm_reward.ros.reward_node:main",
            "refinement_node = lrm_reward.ros.refinement_node:main",
            "sim_robot_node = lrm_reward.ros.sim_robot_node:main",
            "policy_node = lrm_reward.ros.policy_node:main",
            "lrm-judge = lrm_reward.refinement.judge_cli:main",
            "lrm-refine = lrm_reward.refinement.refine_cli:main",
            "lrm-policy = lrm_reward.refinement.policy_cli:main",
            "lrm-train-reward = lrm_reward.adaptation.train:main",
            "lrm-eval-reward = lrm_reward.adaptation.evaluate:main",
            "lrm-import-bag = lrm_reward.bags.import_cli:main",
            "lrm-score = lrm_reward.bags.offline_scoring:main",
            "lrm-vllm-server = lrm_reward.serving.vllm_server:main",
            "lrm-distill = lrm_reward.student.train:main",
            "lrm-nightly = lrm_reward.ros.nightly_client:main",
        ],
    },
)
