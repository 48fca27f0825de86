"""lrm-policy: look at a policy store's versions, how each did on the robot, and move `current` by hand.

    lrm-policy list --store ~/lrm/policies --policy act_pick --data-root ~/lrm_data
    lrm-policy promote --store ~/lrm/policies --policy act_pick v0003     # e.g. back to last week's
    lrm-policy promote --store ~/lrm/policies --policy act_pick --best --data-root ~/lrm_data

`list` prints one row per version: parent, when it was made, what it was trained on, the final loss, and,
with --data-root, the episodes recorded while it ran (StartEpisode.policy_version names it as
"<policy>/vNNNN" or "vNNNN") with the judge's and the operator's success counts. That is the number that
says whether a night's refinement helped on the real robot.

`promote --best --data-root DIR` picks the version the judge called successful most often on those
recordings (at least --min-judged judged episodes, default 10; ties go to the newer version): run before
a night's refinement, the loop refines from its best version so far rather than from last night's, which
may have been a bad one. With --or-current, a night where no version qualifies, or the best one fails its
checksum, keeps current and exits 0 (the nightly loop goes on to refine).

`promote` points `current` at any existing version after checking its files against their checksums,
under the store lock (not while a refinement run writes), and logs the move in `promotions.jsonl`. A
nightly run with `--no-promote`, then `lrm-policy promote` after a look at the report, is the careful
way; promoting an older version is the rollback.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import getpass
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lrm_reward.refinement.judge import JUDGMENTS_DIR
from lrm_reward.refinement.policy_store import (
    CorruptCheckpointError,
    PolicyStore,
    PolicyVersion,
    StoreBusyError,
)
from lrm_reward.refinement.recorder_config import SIDECAR_DIR

PROMOTIONS = "promotions.jsonl"


@dataclass
class RobotRecord:
    """Episodes recorded while one version ran."""

    episodes: int = 0
    judged: int = 0
    judged_successes: int = 0
    labelled: int = 0  # operator said success or failure at stop
    labelled_successes: int = 0

    def describe(self) -> str:
        if not self.episodes:
            return "-"
        parts = [f"{self.episodes} episodes"]
        if self.judged:
            parts.append(
                f"judge {self.judged_successes}/{self.judged} ({self.judged_successes / self.judged:.0%})"
            )
        if self.labelled:
            rate = self.labelled_successes / self.labelled
            parts.append(f"operator {self.labelled_successes}/{self.labelled} ({rate:.0%})")
        return ", ".join(parts)


def robot_records(data_roots: list[Path], policy: str) -> dict[str, RobotRecord]:
    """Version -> what the recordings under the data roots say about it (sidecars + judgments, as JSON)."""
    records: dict[str, RobotRecord] = {}
    infos = sorted({info for root in data_roots for info in Path(root).glob("*/meta/info.json")})
    for info in infos:
        dataset = info.parent.parent
        for sidecar in sorted((dataset / SIDECAR_DIR).glob("episode_*.json")):
            try:
                side = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                continue
            version = _version_of(str(side.get("policy_version") or ""), policy)
            if version is None:
                continue
            rec = records.setdefault(version, RobotRecord())
            rec.episodes += 1
            if side.get("outcome") in ("success", "failure"):
                rec.labelled += 1
                rec.labelled_successes += side["outcome"] == "success"
            try:
                judgment = json.loads((dataset / JUDGMENTS_DIR / sidecar.name).read_text())
            except (OSError, ValueError):
                continue
            rec.judged += 1
            rec.judged_successes += bool(judgment.get("success"))
    return records


def best_version(store: PolicyStore, data_roots: list[Path], min_judged: int = 10) -> tuple[str, RobotRecord]:
    """The version whose recorded episodes the judge called successes most often (ties: the newer one).

    Only versions with at least `min_judged` judged episodes compete: a rate over a handful of episodes
    says little. LookupError when none has that many."""
    if min_judged < 1:
        raise ValueError("min_judged must be at least 1")
    known = {v.version for v in store.versions()}
    robot = robot_records(data_roots, store.name)
    ranked = [(rec.judged_successes / rec.judged, v, rec) for v, rec in robot.items() if v in known]
    ranked = [r for r in ranked if r[2].judged >= min_judged]
    if not ranked:
        seen = ", ".join(f"{v} {rec.judged}" for v, rec in sorted(robot.items()) if v in known) or "none"
        raise LookupError(
            f"no version of {store.name} has {min_judged} or more judged episodes under "
            f"{', '.join(str(d) for d in data_roots) or 'no data root'} (judged per version: {seen})"
        )
    _, version, record = max(ranked, key=lambda r: (r[0], int(r[1][1:])))
    return version, record


def _version_of(policy_version: str, policy: str) -> str | None:
    """ "act_pick/v0003" or "v0003" -> "v0003"; another policy's or a free-form label -> None."""
    name, _, version = policy_version.strip().rpartition("/")
    if not version.startswith("v") or not version[1:].isdigit():
        return None
    return version if name in ("", policy) else None


def list_versions(store: PolicyStore, data_roots: list[Path]) -> str:
    versions = store.versions()
    if not versions:
        return f"no versions of {store.name} in {store.root}"
    try:
        current = store.current()
    except CorruptCheckpointError as exc:
        current, note = None, f" ({exc})"
    else:
        note = ""
    robot = robot_records(data_roots, store.name)
    rows = [("", "version", "parent", "created", "trained on", "final loss", "on the robot")]
    for v in versions:
        try:
            meta = v.metadata()
        except (OSError, ValueError):
            meta = {"created_at": "unreadable metadata"}
        selection = meta.get("selection") or {}
        kept = selection.get("kept", []) if isinstance(selection, dict) else []
        judged = sum(1 for r in kept if r.get("source") == "judged")
        demos = sum(1 for r in kept if r.get("source") == "demo")
        loss = meta.get("final_loss")
        rows.append(
            (
                "*" if current is not None and current.version == v.version else "",
                v.version,
                str(meta.get("parent") or "-").rpartition("/")[2],
                str(meta.get("created_at", ""))[:16].replace("T", " "),
                f"{judged} judged + {demos} demos"
                if kept
                else ("imported" if meta.get("imported_from") else "-"),
                f"{loss:.4f}" if isinstance(loss, int | float) else "-",
                robot.get(v.version, RobotRecord()).describe(),
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{store.name} in {store.root} (current: {current.version if current else 'none'}{note})"]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if not data_roots:
        lines.append("(--data-root adds how each version did on the robot)")
    return "\n".join(lines)


def promote(store: PolicyStore, version_name: str) -> str:
    """Point `current` at a verified version under the store lock; returns what changed."""
    versions = {v.version: v for v in store.versions()}
    if version_name not in versions:
        known = ", ".join(versions) or "none"
        raise LookupError(f"{store.name} has no version {version_name!r} (versions: {known})")
    target: PolicyVersion = versions[version_name]
    with store:
        store.verify(target)  # CorruptCheckpointError: current stays where it is
        try:
            previous = store.current()
        except CorruptCheckpointError:
            previous = None
        store.promote(target)
        record = {
            "at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "version": target.version,
            "previous": previous.version if previous else None,
            "by": getpass.getuser(),
        }
        with open(store.dir / PROMOTIONS, "a") as f:
            f.write(json.dumps(record) + "\n")
    return f"{store.name}: current {record['previous'] or 'none'} -> {target.version}"


def promote_best(store: PolicyStore, roots: list[Path], min_judged: int = 10) -> tuple[str, RobotRecord, str]:
    """Point `current` at best_version() unless it is there already: (version, its record, what changed)."""
    version, record = best_version(store, roots, min_judged)
    try:
        current = store.current()
    except CorruptCheckpointError:
        current = None  # promoting the best version repairs it
    if current is not None and current.version == version:
        return version, record, f"{store.name}: current is {version} already"
    return version, record, promote(store, version)


def _promote_best(store: PolicyStore, roots: list[Path], min_judged: int, or_current: bool) -> int:
    """promote --best; with or_current, a night without a usable best version keeps current (exit 0)."""
    try:
        version, record, change = promote_best(store, roots, min_judged)
        print(f"best on the robot: {version} ({record.describe()})")
        print(change)
    except (LookupError, CorruptCheckpointError) as exc:
        if not or_current:
            raise
        print(f"{exc}; current stays")
    return 0


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lrm-policy", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "versions and how each did"), ("promote", "point current at a version")):
        s = sub.add_parser(name, help=help_text)
        s.add_argument("--store", required=True, type=Path, help="policy store root")
        s.add_argument("--policy", required=True, help="policy name inside the store")
        s.add_argument(
            "--data-root", type=Path, action="append", default=[], help="recordings to count (repeatable)"
        )
        if name == "promote":
            s.add_argument("version", nargs="?", help="vNNNN")
            s.add_argument(
                "--best",
                action="store_true",
                help="the version the judge called successful most often on the recordings under --data-root",
            )
            s.add_argument(
                "--min-judged", type=int, default=None, help="--best: judged episodes a version needs (10)"
            )
            s.add_argument(
                "--or-current",
                action="store_true",
                help="--best: if no version has enough judged episodes, keep current and exit 0",
            )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    try:
        store = PolicyStore(args.store.expanduser(), args.policy)
        roots = [d.expanduser() for d in args.data_root]
        if args.command == "list":
            print(list_versions(store, roots))
        elif args.best == bool(args.version):
            raise ValueError("promote: name a version or pass --best (with --data-root), not both")
        elif args.best:
            min_judged = 10 if args.min_judged is None else args.min_judged
            return _promote_best(store, roots, min_judged, args.or_current)
        elif roots or args.min_judged is not None or args.or_current:
            raise ValueError("promote: --data-root, --min-judged and --or-current go with --best")
        else:
            print(promote(store, args.version))
    except (ValueError, LookupError) as exc:
        print(f"lrm-policy: {exc}", file=sys.stderr)
        return 2
    except (StoreBusyError, CorruptCheckpointError, OSError) as exc:
        print(f"lrm-policy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
