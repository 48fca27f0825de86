#!/usr/bin/env bash
# The whole test suite: lint, then every pytest test inside a private network namespace that has only
# loopback, so no DDS packet can leave this machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh

echo "[test] ruff check + format check"
ruff check .
ruff format --check .

if [ "$(id -u)" = 0 ]; then NS=(unshare -n); else NS=(unshare -rn); fi
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-42}
export ROS_LOG_DIR=${ROS_LOG_DIR:-$(mktemp -d /tmp/lrm-roslog.XXXXXX)}
shm_before=$(mktemp)
ls /dev/shm 2>/dev/null | grep '^fastdds_' | sort > "$shm_before" || true
status=0
"${NS[@]}" bash -c 'ip link set lo up && exec python -m pytest "$@"' pytest "$@" || status=$?
# Fast DDS leaves shared-memory files when a participant is killed: remove the ones this run made.
ls /dev/shm 2>/dev/null | grep '^fastdds_' | sort | comm -13 "$shm_before" - | sed 's|^|/dev/shm/|' | xargs -r rm -f
rm -f "$shm_before"
exit $status
