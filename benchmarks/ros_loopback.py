"""For the benchmarks that run DDS: they rerun themselves inside a network namespace that has only
loopback, so no DDS packet can leave this machine (the tests get the same from scripts/loopback.sh)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REEXEC_MARK = "LRM_BENCH_IN_LOOPBACK_NAMESPACE"


def in_loopback_namespace() -> bool:
    # if_nameindex asks about this process's network namespace (/sys/class/net may show the host's).
    return sorted(name for _, name in socket.if_nameindex()) == ["lo"]


def enter_loopback_namespace(script: Path, domain_id: str) -> int | None:
    """None when this process already runs loopback-only (and DDS is set to stay local); otherwise rerun
    `script` with the same arguments inside `unshare -n` and return its exit code."""
    if not in_loopback_namespace():
        if os.environ.get(REEXEC_MARK):
            print(
                "could not get a network namespace with only loopback; refusing to run DDS", file=sys.stderr
            )
            return 1
        os.environ[REEXEC_MARK] = "1"
        unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        inner = f"ip link set lo up && exec {sys.executable} {Path(script).resolve()} " + " ".join(
            f"'{a}'" for a in sys.argv[1:]
        )
        return subprocess.call([*unshare, "bash", "-c", inner])
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    os.environ.setdefault("ROS_DOMAIN_ID", domain_id)
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    return None
