"""benchmarks/bench_student.py end to end at --quick scale: it distills, plays hold vs student and times the
student, and prints its three tables (the numbers of a quick run mean nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_its_tables(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_student.py"), "--quick", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "## Student vs teacher on held-out episodes" in out
    assert "| progress mean abs. difference to the teacher" in out
    for curve in ("| hold |", "| student (raw) between queries |", "| student (offset) between queries |"):
        assert curve in out
    assert out.count("| 96 |") == 3 and out.count("| 224 |") == 3
    assert (tmp_path / "adapters" / "student" / "v0001" / "config.json").is_file()
