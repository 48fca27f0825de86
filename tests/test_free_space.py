"""scripts/free_space.sh: the setup scripts stop with a message, before pip, when the disk is too full."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _require(tmp_path: Path, gb: int) -> subprocess.CompletedProcess:
    script = f'. scripts/free_space.sh; require_free_gb "{tmp_path}/venv" {gb} "the test venv"; echo went-on'
    return subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)


def test_enough_space_goes_on(tmp_path):
    done = _require(tmp_path, 0)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "went-on"
    assert (tmp_path / "venv").is_dir()  # the folder may not exist yet: df needs one


def test_too_little_space_stops_with_the_numbers(tmp_path):
    done = _require(tmp_path, 10**9)  # no disk has a billion GB free
    assert done.returncode == 1
    assert "went-on" not in done.stdout
    assert "the test venv needs about 1000000000 GB free" in done.stderr
    assert f"df -h {tmp_path}/venv" in done.stderr
