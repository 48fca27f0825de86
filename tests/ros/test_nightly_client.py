"""lrm-nightly, the nightly entry point: which run's status it reads from /diagnostics, the log path it
follows, and what it says when no refinement node answers. The whole night through the day's launch is
tests/ros/test_self_improvement_launch.py."""

from __future__ import annotations

import subprocess
import time
from types import SimpleNamespace

import pytest

from lrm_reward.ros.nightly_client import EXIT_NO_NODE, LogFollower, NightlyWatch, log_path_from

pytestmark = pytest.mark.ros


def diagnostics(name: str, **values: str):
    kvs = [SimpleNamespace(key=k.replace("_", " "), value=v) for k, v in values.items()]
    return SimpleNamespace(status=[SimpleNamespace(name=name, values=kvs)])


def test_the_log_path_is_read_from_the_nodes_answer_spaces_included():
    assert (
        log_path_from("started judge + refine; log: /data/my runs/nightly_1.log")
        == "/data/my runs/nightly_1.log"
    )
    assert log_path_from("started refine; log: /d/n.log\n") == "/d/n.log"
    assert log_path_from("a run is already going") == ""


def test_the_watch_ends_only_on_its_own_runs_idle_status():
    watch = NightlyWatch("refinement_node", "/d/nightly_2.log")
    # another node's status, and an earlier run that ended with 1: neither is ours
    watch.on_diagnostics(diagnostics("reward_node: engine", nightly="idle", nightly_log="/d/nightly_2.log"))
    watch.on_diagnostics(
        diagnostics(
            "refinement_node: recorder",
            nightly="idle",
            nightly_log="/d/nightly_1.log",
            nightly_last_exit_code="1",
        )
    )
    assert watch.exit_code is None
    watch.on_diagnostics(
        diagnostics(
            "refinement_node: recorder", nightly="running refine since x", nightly_log="/d/nightly_2.log"
        )
    )
    assert watch.exit_code is None and watch.step.startswith("running refine")
    watch.on_diagnostics(
        diagnostics(
            "refinement_node: recorder",
            nightly="idle",
            nightly_log="/d/nightly_2.log",
            nightly_last_exit_code="1",
            nightly_last_failed_step="refine",
        )
    )
    assert (watch.exit_code, watch.failed_step) == (1, "refine")


def test_the_watch_knows_how_long_the_node_has_been_silent():
    watch = NightlyWatch("refinement_node", "/d/n.log")
    watch.last_seen -= 40.0
    assert watch.silent_for() >= 40.0
    watch.on_diagnostics(diagnostics("refinement_node: recorder", nightly="idle"))  # any status of the node
    assert watch.silent_for() < 1.0


def test_the_log_is_printed_as_it_grows(tmp_path):
    log = tmp_path / "n.log"
    out = []
    follower = LogFollower(log, SimpleNamespace(write=out.append, flush=lambda: None))
    follower.pump()  # not there yet: nothing, no error
    log.write_text("=== judge\n")
    follower.pump()
    with open(log, "a") as f:
        f.write("=== refine\n")
    follower.pump()
    follower.pump()
    assert "".join(out) == "=== judge\n=== refine\n"


def test_without_a_refinement_node_it_says_what_to_start_and_exits_2():
    started = time.monotonic()
    done = subprocess.run(
        ["lrm-nightly", "--node", "/nobody_here", "--service-timeout", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_NO_NODE, done.stderr
    assert "no /nobody_here/run_nightly" in done.stderr and "self_improvement.launch.py" in done.stderr
    assert time.monotonic() - started < 60
