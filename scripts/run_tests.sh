#!/usr/bin/env bash
# The whole test suite: lint, then every pytest test inside a private network namespace that has only
# loopback, so no DDS packet can leave this machine. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
set +u  # colcon's setup.bash reads unset variables
. scripts/env.sh
set -u

echo "[test] ruff check + format check"
ruff check .
ruff format --check .

# Tiny models lose more to thread hand-offs than they gain on 2 cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "[test] pytest (loopback-only network namespace)"
exec scripts/loopback.sh python -m pytest "$@"
