"""Read a rosbag2 recording (MCAP or sqlite3) with the `rosbags` library: no ROS install, no bag parser here.

What it is for: the importer asks a BagSource for the bag's topics and their message types, the receive
times of some topics (planning episodes), and the deserialized messages of a time window. Every failure
comes out as a BagError that names the bag, and where it is known the topic and the time of the message:
a truncated or corrupt file, a message that does not deserialize, a type the bag has no definition for.

Message definitions: bags from Iron on carry them; for older bags (and for lrm_interfaces types missing
from a bag) the definitions of ROS 2 Kilted that rosbags ships are used, plus this project's own messages
(lrm_interfaces/msg/*.msg, from the installed share folder or the source tree).

What it is not: no feature mapping, no decoding of images, no ROS (rosbags is pure Python).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

LRM_INTERFACES = "lrm_interfaces"
_SOURCE_MSG_DIR = Path(__file__).resolve().parents[3] / LRM_INTERFACES / "msg"  # ros2_ws/src/lrm_interfaces


class BagError(ValueError):
    """A bag, or one of its messages, that cannot be read. `topic` and `time_ns` say where, when known."""

    def __init__(self, bag: Path | str, message: str, topic: str | None = None, time_ns: int | None = None):
        self.bag = str(bag)
        self.topic = topic
        self.time_ns = time_ns
        self.reason = message
        where = ""
        if topic:
            where += f" topic {topic}"
        if time_ns is not None:
            where += f" at {describe_time(time_ns)}"
        super().__init__(f"{bag}:{where}: {message}" if where else f"{bag}: {message}")


def describe_time(time_ns: int) -> str:
    """ns since the epoch -> '1712345678.123456789 (2024-04-05T19:34:38.123Z)': exact and readable."""
    sec, nsec = divmod(int(time_ns), 1_000_000_000)
    try:
        iso = _dt.datetime.fromtimestamp(sec, _dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"t={sec}.{nsec:09d} ({iso}.{nsec // 1_000_000:03d}Z)"
    except (OverflowError, OSError, ValueError):
        return f"t={sec}.{nsec:09d}"


def lrm_interface_files() -> list[Path]:
    """The .msg files of lrm_interfaces: from an installed share folder (AMENT_PREFIX_PATH), else the
    source tree beside this package."""
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        folder = Path(prefix) / "share" / LRM_INTERFACES / "msg" if prefix else None
        if folder is not None and folder.is_dir() and any(folder.glob("*.msg")):
            return sorted(folder.glob("*.msg"))
    return sorted(_SOURCE_MSG_DIR.glob("*.msg")) if _SOURCE_MSG_DIR.is_dir() else []


def default_typestore():
    """ROS 2 Kilted's message types (as shipped with rosbags) plus lrm_interfaces' messages."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    types: dict = {}
    for path in lrm_interface_files():
        types.update(get_types_from_msg(path.read_text(), f"{LRM_INTERFACES}/msg/{path.stem}"))
    if types:
        store.register(types)
    return store


def storage_of(path: Path) -> str:
    """'mcap' or 'sqlite3' (what `ros2 bag record -s` calls them)."""
    files = [path] if path.is_file() else sorted(path.iterdir())
    for f in files:
        if f.suffix == ".mcap":
            return "mcap"
        if f.suffix == ".db3":
            return "sqlite3"
    return "unknown"


class BagSource:
    """One open rosbag2 recording (a bag folder with metadata.yaml, or a single .mcap / .db3 file)."""

    def __init__(self, path: Path | str) -> None:
        from rosbags.highlevel import AnyReader

        self.path = Path(path)
        if not self.path.exists():
            raise BagError(self.path, "no such bag (a rosbag2 folder, or a .mcap / .db3 file)")
        if self.path.suffix == ".bag":
            raise BagError(
                self.path, "a ROS 1 bag: convert it first (rosbags-convert) or give a rosbag2 folder"
            )
        self.storage = storage_of(self.path)
        self._default = default_typestore()
        try:
            self._reader = AnyReader([self.path], default_typestore=self._default)
            self._reader.open()
        except Exception as exc:  # rosbags, sqlite (apsw), mcap and OS errors alike: say which bag and why
            raise BagError(
                self.path, f"cannot open the bag ({_reason(exc)}){_repair_hint(self.storage)}"
            ) from None
        self._add_missing_types()
        self.start_ns = int(self._reader.start_time) if self._reader.message_count else 0
        self.end_ns = int(self._reader.end_time) - 1 if self._reader.message_count else 0
        self.message_count = int(self._reader.message_count)
        self.topics: dict[str, str | None] = {
            name: info.msgtype for name, info in self._reader.topics.items()
        }
        self.counts: dict[str, int] = {name: int(info.msgcount) for name, info in self._reader.topics.items()}

    def _add_missing_types(self) -> None:
        """Types the bag names but does not define (older bags, or some connections without a definition):
        take them from the default typestore, so they deserialize."""
        store = self._reader.typestore
        missing = {c.msgtype for c in self._reader.connections} - set(store.fielddefs)
        if not missing:
            return
        known = {k: v for k, v in self._default.fielddefs.items() if k not in store.fielddefs}
        if known:
            store.register(known)

    def close(self) -> None:
        if getattr(self._reader, "stack", None):
            self._reader.close()

    def __enter__(self) -> BagSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _connections(self, topics: Iterable[str]):
        wanted = set(topics)
        return [c for c in self._reader.connections if c.topic in wanted]

    def times(self, topics: Iterable[str]) -> np.ndarray:
        """Sorted receive times (ns) of the messages of `topics`, without deserializing them."""
        out = []
        for _, time_ns, _ in self._raw(self._connections(topics)):
            out.append(time_ns)
        return np.asarray(out, dtype=np.int64)

    def messages(
        self, topics: Iterable[str], start_ns: int | None = None, stop_ns: int | None = None
    ) -> Iterator[tuple[str, str, int, Any]]:
        """(topic, message type, receive time ns, message) of `topics` in [start_ns, stop_ns), in bag order.

        Raises BagError naming the topic and time of a message that does not deserialize, or the time of
        the last good message when the file itself breaks off.
        """
        store = self._reader.typestore
        for conn, time_ns, raw in self._raw(self._connections(topics), start_ns, stop_ns):
            if conn.msgtype not in store.fielddefs:
                raise BagError(
                    self.path,
                    f"message type {conn.msgtype} is unknown (the bag has no definition for it and it is "
                    "not a ROS 2 Kilted or lrm_interfaces type)",
                    conn.topic,
                    time_ns,
                )
            try:
                msg = store.deserialize_cdr(raw, conn.msgtype)
            except Exception as exc:  # a corrupt CDR payload fails in many ways (struct, index, unicode)
                raise BagError(
                    self.path,
                    f"{conn.msgtype} message does not deserialize ({_reason(exc)})",
                    conn.topic,
                    time_ns,
                ) from None
            yield conn.topic, conn.msgtype, time_ns, msg

    def _raw(self, connections, start_ns: int | None = None, stop_ns: int | None = None):
        if not connections:
            return
        last = None
        try:
            for conn, time_ns, raw in self._reader.messages(connections, start=start_ns, stop=stop_ns):
                last = time_ns
                yield conn, time_ns, raw
        except BagError:
            raise
        except Exception as exc:  # the storage broke off mid-way (truncated chunk, malformed database page)
            after = "" if last is None else " after the message"
            raise BagError(
                self.path,
                f"the bag is truncated or corrupt{after} ({_reason(exc)}){_repair_hint(self.storage)}",
                None,
                last,
            ) from None


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _repair_hint(storage: str) -> str:
    if storage == "mcap":
        return "; a recording that was killed can often be repaired with `mcap recover`"
    if storage == "sqlite3":
        return "; a recording that was killed can often be repaired with `ros2 bag reindex`"
    return ""
