"""Keep service callers inside the data root: a dataset path given over ROS must resolve below it.

Not for anything else (no dataset loading).
"""

from __future__ import annotations

from pathlib import Path


class OutsideDataRootError(ValueError):
    """The path escapes the data root (.., an absolute path elsewhere, or a symlink pointing out)."""


def resolve_inside(data_root: Path | str, path: Path | str) -> Path:
    """Resolve `path` (relative paths are taken relative to the data root) and check it lies inside.

    Symlinks are resolved before the check, so a link inside the root pointing elsewhere is refused.
    """
    root = Path(data_root).expanduser().resolve()
    candidate = Path(path).expanduser()
    if not str(path).strip():
        raise OutsideDataRootError("empty dataset path")
    if not candidate.is_absolute():
        candidate = root / candidate
    resolved = candidate.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise OutsideDataRootError(f"{path} is not inside the data root {root}")
    return resolved
