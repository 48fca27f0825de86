"""The versioned policy store: policies/<name>/vNNNN/ folders, a `current` pointer, a run lock, history.

Layout (see policies/README.md):
    <store>/<name>/v0001/            lerobot save_pretrained() output + metadata.json (+ report/)
    <store>/<name>/current           symlink -> vNNNN (replaced atomically)
    <store>/<name>/history.jsonl     one line per finished run (the report plots it)
    <store>/<name>/.lock             fcntl lock held by a refinement run
    <store>/<name>/.staging/         versions being written; a killed run leaves its folder here and the
                                     next run deletes it

Rules: a version folder is written completely in .staging/, checksummed into metadata.json, then moved
into place with one rename (never over an existing version); `current` moves only after that. A version
whose files do not match its checksums, or that lerobot cannot load, is refused (CorruptCheckpointError).

What it is not: no training (refine.py), no lerobot import at module load (only in load_policy()).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from lrm_reward.durable_files import try_exclusive_lock

VERSION_RE = re.compile(r"^v(\d{4,})$")
METADATA_FILE = "metadata.json"
CURRENT = "current"
HISTORY = "history.jsonl"
STAGING = ".staging"


class StoreBusyError(RuntimeError):
    """Another refinement run holds the store lock."""


class CorruptCheckpointError(RuntimeError):
    """A version's files are missing, altered, or not loadable."""


@dataclass
class PolicyVersion:
    name: str
    version: str  # "v0003"
    path: Path

    @property
    def number(self) -> int:
        return int(self.version[1:])

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def metadata(self) -> dict:
        return json.loads((self.path / METADATA_FILE).read_text())


class PolicyStore:
    def __init__(self, root: Path | str, name: str) -> None:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            raise ValueError(f"policy name {name!r}: use letters, digits, '_', '-', '.'")
        self.root = Path(root)
        self.name = name
        self.dir = self.root / name
        self._lock_handle = None

    # ------------------------------------------------------------------ reading
    def versions(self) -> list[PolicyVersion]:
        if not self.dir.exists():
            return []
        found = [
            PolicyVersion(self.name, p.name, p)
            for p in self.dir.iterdir()
            if p.is_dir() and VERSION_RE.match(p.name)
        ]
        return sorted(found, key=lambda v: v.number)

    def current(self) -> PolicyVersion | None:
        link = self.dir / CURRENT
        if not link.is_symlink() and not link.exists():
            return None
        target = Path(os.readlink(link)) if link.is_symlink() else Path(link.read_text().strip())
        name = target.name
        if not VERSION_RE.match(name) or not (self.dir / name).is_dir():
            raise CorruptCheckpointError(f"{link} points to {target}, which is not a version of {self.name}")
        return PolicyVersion(self.name, name, self.dir / name)

    def history(self) -> list[dict]:
        path = self.dir / HISTORY
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def verify(self, version: PolicyVersion) -> dict:
        """Check the version's files against the checksums in its metadata. Returns the metadata."""
        try:
            meta = version.metadata()
        except (OSError, ValueError) as exc:
            raise CorruptCheckpointError(f"{version.ref}: unreadable {METADATA_FILE}: {exc}") from exc
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            raise CorruptCheckpointError(f"{version.ref}: {METADATA_FILE} lists no checksummed files")
        for rel, digest in files.items():
            path = version.path / rel
            if not path.is_file():
                raise CorruptCheckpointError(f"{version.ref}: {rel} is missing")
            if _sha256(path) != digest:
                raise CorruptCheckpointError(f"{version.ref}: {rel} does not match its checksum (corrupt)")
        return meta

    # ------------------------------------------------------------------ writing
    def lock(self) -> None:
        """Take the run lock (non-blocking). Raises StoreBusyError when another run holds it."""
        handle = try_exclusive_lock(self.dir / ".lock")  # kept open while locked
        if handle is None:
            raise StoreBusyError(
                f"another refinement run is using policy store {self.dir} (lock {self.dir / '.lock'})"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {_now_iso()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> PolicyStore:
        self.lock()
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def clean_staging(self) -> list[str]:
        """Delete what killed runs left in .staging/ (call with the lock held)."""
        staging = self.dir / STAGING
        removed = []
        if staging.exists():
            for p in staging.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p.name)
        return removed

    def new_staging_dir(self) -> Path:
        self._require_lock()
        path = self.dir / STAGING / f"run-{os.getpid()}-{_dt.datetime.now().strftime('%Y%m%dT%H%M%S%f')}"
        path.mkdir(parents=True)
        return path

    def next_version_name(self) -> str:
        versions = self.versions()
        return f"v{(versions[-1].number + 1 if versions else 1):04d}"

    def commit(self, staging_dir: Path, metadata: dict) -> PolicyVersion:
        """Checksum the staged files into metadata.json and move the folder into place as a new version."""
        self._require_lock()
        files = {
            str(p.relative_to(staging_dir)): _sha256(p)
            for p in sorted(staging_dir.rglob("*"))
            if p.is_file() and p.name != METADATA_FILE
        }
        version = self.next_version_name()
        metadata = {**metadata, "policy": self.name, "version": version, "files": files}
        _write_json_synced(staging_dir / METADATA_FILE, metadata)
        target = self.dir / version
        if target.exists():
            raise FileExistsError(f"{target} exists: a version is never overwritten")
        os.rename(staging_dir, target)  # atomic on one filesystem; .staging is inside the policy folder
        _fsync_dir(self.dir)
        return PolicyVersion(self.name, version, target)

    def promote(self, version: PolicyVersion) -> None:
        """Point `current` at the version (atomic symlink swap)."""
        tmp = self.dir / f".{CURRENT}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(version.version, tmp)
        os.replace(tmp, self.dir / CURRENT)
        _fsync_dir(self.dir)

    def append_history(self, record: dict) -> None:
        with open(self.dir / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _require_lock(self) -> None:
        if self._lock_handle is None:
            raise RuntimeError("take the store lock first (PolicyStore.lock() or `with store:`)")


def load_policy(version: PolicyVersion, device: str = "cpu"):
    """(policy, preprocessor, postprocessor, config) of a verified version. CorruptCheckpointError if not."""
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    store = PolicyStore(version.path.parent.parent, version.name)
    store.verify(version)
    try:
        cfg = PreTrainedConfig.from_pretrained(version.path)
        cfg.device = device
        policy = get_policy_class(cfg.type).from_pretrained(version.path, config=cfg)
        pre, post = make_pre_post_processors(
            cfg,
            pretrained_path=str(version.path),
            preprocessor_overrides={"device_processor": {"device": device}},
        )
    except Exception as exc:  # any load failure means the checkpoint cannot be used
        raise CorruptCheckpointError(f"{version.ref}: lerobot cannot load it: {exc}") from exc
    return policy, pre, post, cfg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_synced(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
