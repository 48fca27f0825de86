"""lrm-nightly: start the running refinement node's nightly judge + refine and wait for it to finish.

    lrm-nightly                          # /refinement_node: judge today's dataset, refine, promote
    lrm-nightly --node /robot1/refinement_node --timeout 7200

What it is for: the nightly entry point of a workstation that runs the day's launch
(launch/self_improvement.launch.py) — the systemd timer or cron line of docs/refinement.md. It calls the
node's `~/run_nightly` (std_srvs/Trigger), so the night uses the node's own settings (`nightly.*`,
`judge.*` in the params file) and judges through the reward node's loaded model: no second copy of the
reward model. It then follows the run's log file (the node's children write it) and the node's
/diagnostics until the run ends, and exits with the run's exit code, so systemd and cron see a failed
night as failed. The running policy_node picks a promoted version up at its next episode.

Exit codes: the run's (0: judged, refined and promoted); 2: no refinement node answers (is the day's
launch running?); 3: the node refused (a run is already going, or a setting is wrong: the message says
which); 4: the node stopped reporting while the run was going; 124: --timeout passed (the run goes on in
the node); 130: Ctrl-C (the run goes on in the node: its children have their own session).

What it is not: no judging or training here, and no scheduler.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path

EXIT_NO_NODE = 2
EXIT_REFUSED = 3
EXIT_NODE_GONE = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
DIAGNOSTICS_SILENCE_S = 30.0  # the node publishes /diagnostics at 1 Hz


class NightlyWatch:
    """What the node's /diagnostics say about one nightly run (the one writing `log_path`)."""

    def __init__(self, node_name: str, log_path: str) -> None:
        self.status_name = f"{node_name}: recorder"
        self.log_path = log_path
        self.last_seen = time.monotonic()
        self.exit_code: int | None = None
        self.failed_step = ""
        self.step = ""
        self._lock = threading.Lock()

    def on_diagnostics(self, msg) -> None:
        for status in msg.status:
            if status.name != self.status_name:
                continue
            values = {kv.key: kv.value for kv in status.values}
            with self._lock:
                self.last_seen = time.monotonic()
                if values.get("nightly log") != self.log_path:
                    continue  # another run's status (or none yet)
                state = values.get("nightly", "")
                self.step = state
                if state == "idle" and "nightly last exit code" in values:
                    self.exit_code = int(values["nightly last exit code"])
                    self.failed_step = values.get("nightly last failed step", "")

    def silent_for(self) -> float:
        with self._lock:
            return time.monotonic() - self.last_seen


class LogFollower:
    """Prints what the run's children append to its log, as they write it."""

    def __init__(self, path: Path, out=sys.stdout) -> None:
        self.path, self.out, self.offset = path, out, 0

    def pump(self) -> None:
        with contextlib.suppress(OSError):  # the log lives on the node's machine; elsewhere: nothing to show
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
            self.offset += len(chunk)
            if chunk:
                self.out.write(chunk.decode(errors="replace"))
                self.out.flush()


def log_path_from(message: str) -> str:
    found = re.search(r"; log: (.+?)\s*$", message)
    return found.group(1) if found else ""


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-nightly",
        description="Start the running refinement node's nightly judge + refine (~/run_nightly) and wait "
        "for it: its settings are the node's nightly.* and judge.* parameters.",
    )
    p.add_argument("--node", default="/refinement_node", help="the refinement node (default %(default)s)")
    p.add_argument(
        "--service-timeout", type=float, default=30.0, help="seconds to wait for the node to answer"
    )
    p.add_argument("--timeout", type=float, default=0.0, help="give up waiting after this many s (0: never)")
    p.add_argument("--no-wait", action="store_true", help="start the run and return at once")
    p.add_argument("--quiet", action="store_true", help="do not print the run's log as it goes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    node = "/" + args.node.strip("/")
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    context = rclpy.Context()
    rclpy.init(context=context)
    client_node = rclpy.create_node(f"lrm_nightly_{os.getpid()}", context=context)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(client_node)
    try:
        client = client_node.create_client(Trigger, f"{node}/run_nightly")
        deadline = time.monotonic() + args.service_timeout
        while not client.service_is_ready():
            if time.monotonic() > deadline:
                print(
                    f"lrm-nightly: no {node}/run_nightly after {args.service_timeout:.0f} s: is the day's "
                    "launch running (ros2 launch lrm_reward self_improvement.launch.py), with this "
                    "ROS_DOMAIN_ID? Without it, run lrm-judge and lrm-refine yourself (docs/refinement.md)",
                    file=sys.stderr,
                )
                return EXIT_NO_NODE
            executor.spin_once(timeout_sec=0.1)
        watch: NightlyWatch | None = None

        def on_diagnostics(msg) -> None:
            if watch is not None:
                watch.on_diagnostics(msg)

        client_node.create_subscription(DiagnosticArray, "/diagnostics", on_diagnostics, 50)
        future = client.call_async(Trigger.Request())
        while not future.done():
            executor.spin_once(timeout_sec=0.1)
        res = future.result()
        if not res.success:
            print(f"lrm-nightly: {node} refused: {res.message}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"lrm-nightly: {node}: {res.message}", flush=True)
        log_path = log_path_from(res.message)
        if args.no_wait:
            return 0
        watch = NightlyWatch(node.rsplit("/", 1)[-1], log_path)
        follower = None if args.quiet or not log_path else LogFollower(Path(log_path))
        started = time.monotonic()
        try:
            while watch.exit_code is None:
                executor.spin_once(timeout_sec=0.2)
                if follower is not None:
                    follower.pump()
                if watch.silent_for() > DIAGNOSTICS_SILENCE_S:
                    print(
                        f"lrm-nightly: {node} has published no /diagnostics for "
                        f"{DIAGNOSTICS_SILENCE_S:.0f} s: it stopped or is unreachable; the run's log: "
                        f"{log_path}",
                        file=sys.stderr,
                    )
                    return EXIT_NODE_GONE
                if args.timeout and time.monotonic() - started > args.timeout:
                    print(
                        f"lrm-nightly: still {watch.step or 'running'} after {args.timeout:.0f} s; the run "
                        f"goes on in {node} (log: {log_path})",
                        file=sys.stderr,
                    )
                    return EXIT_TIMEOUT
        except KeyboardInterrupt:
            print(
                f"lrm-nightly: stopped waiting; the run goes on in {node} (log: {log_path})", file=sys.stderr
            )
            return EXIT_INTERRUPTED
        if follower is not None:
            follower.pump()
        took = time.monotonic() - started
        if watch.exit_code == 0:
            print(f"lrm-nightly: judge + refine done in {took:.0f} s (log: {log_path})")
        else:
            print(
                f"lrm-nightly: the {watch.failed_step or 'nightly'} step exited with {watch.exit_code} after "
                f"{took:.0f} s; the log says why: {log_path}",
                file=sys.stderr,
            )
        return watch.exit_code
    finally:
        executor.shutdown(timeout_sec=2.0)
        client_node.destroy_node()
        rclpy.try_shutdown(context=context)


if __name__ == "__main__":
    sys.exit(main())
