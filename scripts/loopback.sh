#!/usr/bin/env bash
# Run a command with ROS 2 (Fast DDS) confined to this machine: a private network namespace holding only
# loopback, localhost-only discovery, a private log folder; afterwards remove the Fast DDS shared-memory
# files the command left behind (a killed participant leaves them in /dev/shm).
#   scripts/loopback.sh python -m pytest tests/ros
set -euo pipefail
if [ "$(id -u)" = 0 ]; then NS=(unshare -n); else NS=(unshare -rn); fi
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-42}
export RMW_IMPLEMENTATION=${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}
export ROS_LOG_DIR=${ROS_LOG_DIR:-$(mktemp -d /tmp/lrm-roslog.XXXXXX)}
shm_before=$(mktemp)
trap 'rm -f "$shm_before"' EXIT
{ ls /dev/shm 2>/dev/null | grep -E '^(sem\.)?fastdds_' || true; } | sort > "$shm_before"
status=0
"${NS[@]}" bash -c 'ip link set lo up && exec "$@"' loopback "$@" || status=$?
{ ls /dev/shm 2>/dev/null | grep -E '^(sem\.)?fastdds_' || true; } | sort | comm -13 "$shm_before" - \
  | sed 's|^|/dev/shm/|' | xargs -r rm -f
exit $status
