# Source me: the venv, ROS 2 (system install or the PyPI wheels) and the built workspace.
#   . scripts/env.sh
# The ROS mode comes from .venv/.lrm-mode, written by scripts/setup.sh ("wheels" or "system <prefix>").
_lrm_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# ROS setup files read unset variables: lift `set -u` while sourcing, restore it afterwards.
case $- in *u*) _lrm_nounset=1; set +u ;; *) _lrm_nounset= ;; esac
_lrm_mode=$(cat "$_lrm_repo/.venv/.lrm-mode" 2>/dev/null || true)
if [ -z "$_lrm_mode" ] && [ -n "${ROS_DISTRO:-}" ] && [ -f "/opt/ros/${ROS_DISTRO}/setup.bash" ]; then
  _lrm_mode="system /opt/ros/${ROS_DISTRO}"  # a venv from before setup.sh recorded its mode
fi
. "$_lrm_repo/.venv/bin/activate"
case "$_lrm_mode" in
  system\ *)
    . "${_lrm_mode#system }/setup.bash"
    ;;
  *)
    export AMENT_PREFIX_PATH="$_lrm_repo/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
    export CMAKE_PREFIX_PATH="$_lrm_repo/.venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
    ;;
esac
. "$_lrm_repo/ros2_ws/install/setup.bash"
[ -n "$_lrm_nounset" ] && set -u
# lrm-judge, lrm-refine, lrm-policy, ...: ROS puts a package's commands in lib/<package> (for `ros2 run`)
export PATH="$_lrm_repo/ros2_ws/install/lrm_reward/lib/lrm_reward:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} WANDB_MODE=${WANDB_MODE:-disabled}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
unset _lrm_repo _lrm_mode _lrm_nounset
