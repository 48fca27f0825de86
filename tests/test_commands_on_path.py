"""The commands the docs tell users to type are installed and, after `. scripts/env.sh` (which the test
runner sources), on PATH."""

import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_documented_command_runs_from_path():
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "policies" / "README.md"]
    documented = set()
    for doc in docs:
        documented |= set(re.findall(r"(?m)^\s*(lrm-[a-z-]+) ", doc.read_text()))
    assert {"lrm-judge", "lrm-refine", "lrm-policy", "lrm-train-reward"} <= documented
    for command in sorted(documented):
        path = shutil.which(command)
        assert path, f"{command} is in the docs but not on PATH"
        result = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "usage" in result.stdout.lower(), (command, result.stderr[-500:])
