# Sourced by the setup scripts: stop before an install that cannot fit, instead of pip's "[Errno 28] No space
# left on device" halfway through a multi-GB venv (a half-written venv is then rebuilt on the next run).
#
#   require_free_gb DIR GB WHAT   # exits 1 with a message when DIR's file system has less than GB GiB free
require_free_gb() {
  local dir=$1 need=$2 what=$3 free_kb
  mkdir -p "$dir"
  free_kb=$(df -Pk "$dir" 2>/dev/null | awk 'NR == 2 {print $4}')
  [ -n "$free_kb" ] || return 0  # df cannot tell (unusual mounts): let the install try
  # pip also unpacks into $TMPDIR, usually the same disk; GB counts both.
  if [ "$free_kb" -lt $((need * 1024 * 1024)) ]; then
    printf 'error: %s needs about %s GB free on the disk of %s; it has %s GB (df -h %s). Free some space, e.g. old clones, ~/.cache/pip or /tmp/pytest-of-%s, and run it again.\n' \
      "$what" "$need" "$dir" "$((free_kb / 1024 / 1024))" "$dir" "$(id -un)" >&2
    exit 1
  fi
}
