# Source me: the venv, ROS 2 (system install or the PyPI wheels) and the built workspace.
#   . scripts/env.sh
_lrm_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$_lrm_repo/.venv/bin/activate"
if [ -n "${ROS_DISTRO:-}" ] && [ -d "/opt/ros/${ROS_DISTRO}" ]; then
  . "/opt/ros/${ROS_DISTRO}/setup.bash"
else
  export AMENT_PREFIX_PATH="$_lrm_repo/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
  export CMAKE_PREFIX_PATH="$_lrm_repo/.venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
fi
. "$_lrm_repo/ros2_ws/install/setup.bash"
# lrm-judge, lrm-refine, lrm-policy, ...: ROS puts a package's commands in lib/<package> (for `ros2 run`)
export PATH="$_lrm_repo/ros2_ws/install/lrm_reward/lib/lrm_reward:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
unset _lrm_repo
