"""Run the nightly judge + refine as child processes, one run at a time, without blocking the caller.

What it is for: the refinement node's `~/run_nightly` service (and anything else that wants to start the
nightly loop on demand). The commands are the same entry points as the `lrm-judge` and `lrm-refine`
console scripts, run with this Python (`python -m lrm_reward.refinement.judge_cli ...`), so they work
whether or not the console scripts are on PATH. They run one after the other (refine only when judge
exited 0) in their own session, so a Ctrl-C to the node does not kill a training run; all output goes
to one log file.

Judging needs the reward model. With `judge_via_node` set (the refinement node's default, judge.mode
reward_node) the judge step is `lrm-judge --via-node <action>`: the running reward node judges with the
model it already holds, and this run loads none. The refine step then trains the policy on the same GPU
while the reward node keeps its model: on a 24 GB card with the 8B that is tight (docs/refinement.md, "One
copy of the reward model"); train on another device or stop the reward node for the night if it does not fit.

What it is not: a scheduler (systemd/cron do that: docs/refinement.md) and no ROS.
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

JUDGE_MODULE = "lrm_reward.refinement.judge_cli"
POLICY_MODULE = "lrm_reward.refinement.policy_cli"
REFINE_MODULE = "lrm_reward.refinement.refine_cli"


@dataclass
class NightlyConfig:
    datasets: list[Path]  # judged, then refined on
    store: Path  # policy store root
    policy: str  # policy name inside the store
    judge_model: str = ""  # lrm-judge loads this model itself; "" and no judge_via_node = skip judging
    judge_via_node: str = ""  # judge through this reward node / action (lrm-judge --via-node): no model here
    judge_adapters: str = ""
    judge_device: str = "cpu"
    judge_dtype: str = "auto"
    last_n: int = 3
    every_k: int = 10
    success_threshold: float = 0.5
    progress_threshold: float | None = None
    progress_success_threshold: float | None = None  # lrm-judge --progress-success-threshold
    data_root: Path | None = None  # judge refuses datasets outside it
    demos: list[Path] = field(default_factory=list)
    steps: int = 2000
    batch_size: int = 8
    device: str = "cpu"
    # before refining, point current at the version the judge called successful most often on the
    # recordings under data_root (lrm-policy promote --best --or-current): a bad night is not built on
    keep_best: bool = False
    keep_best_min_judged: int = 10
    judge_args: list[str] = field(default_factory=list)  # extra arguments, appended as given
    refine_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("nightly: no dataset to judge and refine on")
        if self.judge_model and self.judge_via_node:
            raise ValueError(
                "nightly: judge_model and judge_via_node exclude each other (one copy of the model)"
            )
        if not str(self.store).strip() or not self.policy.strip():
            raise ValueError(
                "nightly: the policy store and policy name must be set (nightly.store, nightly.policy)"
            )
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("nightly: steps and batch_size must be >= 1")
        if self.keep_best and (self.data_root is None or self.keep_best_min_judged < 1):
            raise ValueError("nightly: keep_best needs the data root and keep_best_min_judged >= 1")

    def commands(self) -> list[list[str]]:
        py = [sys.executable, "-m"]
        data = [str(d) for d in self.datasets]
        out = []
        if self.judge_model or self.judge_via_node:
            if self.judge_via_node:
                judge = [*py, JUDGE_MODULE, *data, "--via-node", self.judge_via_node]
            else:
                judge = [*py, JUDGE_MODULE, *data, "--model", self.judge_model, "--device", self.judge_device]
                judge += ["--dtype", self.judge_dtype]
            judge += [
                "--last-n",
                str(self.last_n),
                "--every-k",
                str(self.every_k),
            ]
            judge += ["--success-threshold", str(self.success_threshold), "--quiet"]
            if self.judge_adapters and not self.judge_via_node:
                judge += ["--adapters", self.judge_adapters]
            if self.progress_threshold is not None:
                judge += ["--progress-threshold", str(self.progress_threshold)]
            if self.progress_success_threshold is not None:
                judge += ["--progress-success-threshold", str(self.progress_success_threshold)]
            if self.data_root is not None:
                judge += ["--data-root", str(self.data_root)]
            out.append(judge + list(self.judge_args))
        if self.keep_best:
            best = [*py, POLICY_MODULE, "promote", "--store", str(self.store), "--policy", self.policy]
            best += ["--best", "--or-current", "--data-root", str(self.data_root)]
            out.append([*best, "--min-judged", str(self.keep_best_min_judged)])
        refine = [*py, REFINE_MODULE, *data, "--store", str(self.store), "--policy", self.policy]
        refine += ["--steps", str(self.steps), "--batch-size", str(self.batch_size), "--device", self.device]
        if self.demos:
            refine += ["--demos", *[str(d) for d in self.demos]]
        out.append([*refine, "--quiet", *self.refine_args])
        return out


class NightlyRunner:
    """At most one run at a time. `start` returns at once; `status()` says what happened."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.step = ""  # "judge" | "keep best" | "refine" while running
        self.started_at = ""
        self.log_path: Path | None = None
        self.last_exit_code: int | None = None  # of the last finished run: 0 ok, else the failing step's
        self.last_failed_step = ""
        self.last_finished_at = ""

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, cfg: NightlyConfig) -> str:
        """Start a run. Raises RuntimeError when one is running, OSError when the log cannot be created."""
        with self._lock:
            if self.running:
                raise RuntimeError(
                    f"a nightly run is already running ({self.step}, since {self.started_at}; "
                    f"log {self.log_path})"
                )
            commands = cfg.commands()
            self.log_dir.mkdir(parents=True, exist_ok=True)
            stamp = _dt.datetime.now().strftime("%Y%m%d_%H%M%S")
            self.log_path = self.log_dir / f"nightly_{stamp}_{os.getpid()}.log"
            log = open(self.log_path, "ab")  # noqa: SIM115 - closed by the run thread
            self.started_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
            self.step = _step_name(commands[0])
            self._thread = threading.Thread(
                target=self._run, args=(commands, log), name="nightly", daemon=True
            )
            self._thread.start()
            return f"started {' + '.join(_step_name(c) for c in commands)}; log: {self.log_path}"

    def _run(self, commands: list[list[str]], log) -> None:
        code = 0
        failed = ""
        # the children import lrm_reward from wherever this process does (source tree or install)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            for argv in commands:
                self.step = _step_name(argv)
                log.write(f"\n=== {time.strftime('%F %T')} {' '.join(argv)}\n".encode())
                log.flush()
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                        env=env,
                    )
                except OSError as exc:
                    log.write(f"cannot start: {exc}\n".encode())
                    code, failed = 127, self.step
                    break
                self._proc = proc
                code = proc.wait()
                log.write(f"=== {self.step} exited with {code}\n".encode())
                log.flush()
                if code != 0:
                    failed = self.step
                    break
        finally:
            log.close()
            self._proc = None
            self.last_exit_code = code
            self.last_failed_step = failed
            self.last_finished_at = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
            self.step = ""

    def wait(self, timeout: float | None = None) -> bool:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def status(self) -> dict[str, str]:
        out = {"nightly": f"running {self.step} since {self.started_at}" if self.running else "idle"}
        if self.log_path is not None:
            out["nightly log"] = str(self.log_path)
        if self.last_exit_code is not None:
            out["nightly last exit code"] = str(self.last_exit_code)
            out["nightly last finished"] = self.last_finished_at
            if self.last_failed_step:
                out["nightly last failed step"] = self.last_failed_step
        return out


def _step_name(argv: list[str]) -> str:
    return "judge" if JUDGE_MODULE in argv else "keep best" if POLICY_MODULE in argv else "refine"
