"""Writes and locks that survive a kill mid-way, shared by recording, judging, refining and adapter training.

Not for anything ROS or model specific: plain files only.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so readers see the old file or the whole new one, never half (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def try_exclusive_lock(path: Path) -> IO[str] | None:
    """Take an exclusive advisory lock on ``path`` without waiting.

    Returns the open handle (the lock lasts until it is closed) or None when another process holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - the caller keeps it open while locked
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
