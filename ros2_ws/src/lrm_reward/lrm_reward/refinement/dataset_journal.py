"""All-or-nothing episode appends to a LeRobotDataset v3 folder, so a crash never damages earlier episodes.

Why: lerobot 0.6.1 rewrites meta/info.json and meta/stats.json on every save_episode() and only writes
the episode index (meta/episodes/*.parquet) and the parquet footers in finalize(). A process killed in
between leaves a dataset that no longer loads. Appending through LeRobotDataset.resume() always starts
new data/video/episode files (checked in tests/refinement/test_recorder.py), so only meta/ is modified in
place. The journal therefore snapshots meta/ and the list of files before an append; if the append does
not commit, recover() deletes the new files and restores meta/.

What it is not: a lock (the recorder holds one), and no protection against power loss (no fsync of the
video/parquet payload; a kill -9 keeps the page cache).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Folders inside a dataset that an append may touch. Anything else (judgments/, user files) is left alone
# by a rollback, even if it appeared during the append.
MANAGED_DIRS = ("data", "videos", "meta", "images", "recording")


class DatasetJournal:
    """One pending append to the dataset at `dataset_root`; the journal lives beside it."""

    def __init__(self, dataset_root: Path) -> None:
        self.dataset_root = Path(dataset_root)
        self.journal_dir = self.dataset_root.parent / f".{self.dataset_root.name}.journal"
        self._journal_file = self.journal_dir / "journal.json"

    @property
    def pending(self) -> bool:
        return self._journal_file.exists()

    def begin(self, note: str = "") -> None:
        """Snapshot the dataset before an append. Raises OSError when the snapshot cannot be written."""
        if self.pending:
            raise RuntimeError(f"an append to {self.dataset_root} is still pending: call recover() first")
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        self.journal_dir.mkdir(parents=True)
        existed = (self.dataset_root / "meta" / "info.json").exists()
        files = sorted(_managed_files(self.dataset_root)) if existed else []
        if existed:
            shutil.copytree(self.dataset_root / "meta", self.journal_dir / "meta")
        record = {"existed": existed, "files": files, "note": note}
        tmp = self.journal_dir / "journal.json.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._journal_file)  # the journal is live from here on

    def commit(self) -> None:
        """The append is complete: drop the snapshot (removing journal.json is the commit point)."""
        self._journal_file.unlink(missing_ok=True)
        shutil.rmtree(self.journal_dir, ignore_errors=True)

    def recover(self) -> str | None:
        """Undo an append that did not commit. Returns what was done, or None when nothing was pending."""
        if not self.pending:
            shutil.rmtree(self.journal_dir, ignore_errors=True)  # a snapshot that never went live
            return None
        record = json.loads(self._journal_file.read_text())
        if not record["existed"]:
            # The dataset was being created: nothing of it was ever complete.
            shutil.rmtree(self.dataset_root, ignore_errors=True)
            self.commit()
            return f"removed {self.dataset_root.name}: its first episode was never completely saved"
        keep = set(record["files"])
        removed = 0
        for rel in _managed_files(self.dataset_root):
            if rel not in keep:
                (self.dataset_root / rel).unlink()
                removed += 1
        shutil.rmtree(self.dataset_root / "meta", ignore_errors=True)
        shutil.copytree(self.journal_dir / "meta", self.dataset_root / "meta")
        _remove_empty_dirs(self.dataset_root)
        self.commit()
        note = f" ({record['note']})" if record.get("note") else ""
        return f"rolled back an unfinished append to {self.dataset_root.name}{note}: removed {removed} files"


def _managed_files(root: Path) -> list[str]:
    out = []
    for top in MANAGED_DIRS:
        base = root / top
        if base.exists():
            out.extend(str(p.relative_to(root)) for p in base.rglob("*") if p.is_file() or p.is_symlink())
    return out


def _remove_empty_dirs(root: Path) -> None:
    for top in MANAGED_DIRS:
        base = root / top
        if not base.exists():
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not any(d.iterdir()):
                d.rmdir()
        if not any(base.iterdir()):
            base.rmdir()
