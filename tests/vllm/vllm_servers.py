"""Helpers for the vLLM backend tests: real vLLM server processes (CPU build, from .venv-vllm) on free
loopback ports, and parity checks against the local engine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_CACHE = REPO / ".cache" / "tiny_lrm"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
VLLM_MISSING = (
    f"no vLLM venv at {VLLM_PYTHON.parent.parent} (run scripts/setup_vllm.sh; it needs python3.11): "
    "the tests with a real vLLM server are skipped"
)
# The CPU build refuses head_dim 16 (the default tiny model) at the first request: the head32 variant.
TINY_VARIANT = "head32"
SERVER_START_TIMEOUT_S = 420.0


def needs_vllm() -> None:
    if not VLLM_PYTHON.exists():
        pytest.skip(VLLM_MISSING)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """One vLLM server process (built by lrm_reward.serving.vllm_server) that a test can kill, restart,
    stall (SIGSTOP) and resume (SIGCONT). Its log goes to a file, shown when it fails to start."""

    def __init__(self, process, log_path: Path) -> None:
        self.process = process  # ServerProcess
        self.url = process.url
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> VllmServer:
        from lrm_reward.serving.vllm_server import start_server, wait_healthy

        self.proc = start_server(self.process, self.log_path)
        try:
            wait_healthy(self.url, self.proc, timeout_s)
        except RuntimeError as exc:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
            raise RuntimeError(f"{exc}\n--- server log (end) ---\n{tail}") from exc
        return self

    def stop(self) -> None:
        from lrm_reward.serving.vllm_server import stop_server

        if self.proc is not None:
            self.resume()
            stop_server(self.proc, grace_s=10.0)
            self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole server (API process and engine core), as a crash would."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stall(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter over its label sets, from /metrics."""
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
            f"{self.url}/metrics", timeout=10
        ) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def post(self, path: str, body: dict) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                request, timeout=60
            ) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()


def server_for(
    tiny,
    tmp_path: Path,
    modalities: tuple[str, ...],
    merged: Path | None = None,
    prefix_caching: bool = True,
    env: dict[str, str] | None = None,
) -> VllmServer:
    """A (not yet started) server for the tiny model: base + LoRA modules, or the merged progress model."""
    from lrm_reward.serving.vllm_server import ServerProcess, ServerSpec, server_processes

    adapters = {m: str(tiny.adapters[m]) for m in modalities}
    port = free_port()
    spec = ServerSpec(
        base_model=str(tiny.base),
        adapters=adapters,
        merged_progress=str(merged) if merged else None,
        port=port,
        progress_port=port,
        device="cpu",
        dtype="float32",
        max_model_len=2048,
        prefix_caching=prefix_caching,
        python=str(VLLM_PYTHON),
    )
    processes = server_processes(spec)
    process = processes[-1] if merged else processes[0]
    if env:
        process = ServerProcess(process.name, process.argv, {**process.env, **env}, process.url)
    return VllmServer(process, tmp_path / f"vllm-{process.name}-{port}.log")


def running(server: VllmServer) -> Iterator[VllmServer]:
    """Start, yield, stop: the body of the per-module server fixtures."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


def episode_queries(modalities: tuple[str, ...], frames: int = 6, seed: int = 1) -> list:
    """Queries of two episodes (each its own task and initial frame), progress levels across the range."""
    from lrm_reward.core import tiny_model
    from lrm_reward.core.types import Modality, Query

    rng = np.random.default_rng(seed)
    queries = []
    for episode, task in enumerate(tiny_model.TINY_TASKS[:2]):
        initial = tiny_model.synthetic_frame(0.05, rng)
        previous = initial
        for i in range(frames):
            level = (i + episode * 0.5) / frames
            current = tiny_model.synthetic_frame(level, rng)
            for name in modalities:
                images = {"progress": [initial, current], "contrastive": [previous, current]}.get(
                    name, [current]
                )
                queries.append(Query(Modality(name), task, images))
            previous = current
    return queries


def assert_same_answers(expected, got, tolerance: float = 1e-3) -> None:
    """Parity: every answer parsed, expected values within tolerance, the same most likely answer."""
    assert len(expected) == len(got)
    worst = 0.0
    for index, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert a.parsed and b.parsed, (index, a.error, b.error)
        worst = max(worst, abs(a.value - b.value))
        if a.probabilities is not None:
            assert b.probabilities is not None
            top_a = max(a.probabilities, key=a.probabilities.get)
            top_b = max(b.probabilities, key=b.probabilities.get)
            assert top_a == top_b, (index, a.probabilities, b.probabilities)
    assert worst <= tolerance, f"max |diff| of the expected value {worst:.2e} > {tolerance}"


def wait_until(check, timeout_s: float, step_s: float = 0.5):
    """Call check() until it returns something truthy; return it, or the last value after timeout_s."""
    deadline = time.monotonic() + timeout_s
    value = check()
    while not value and time.monotonic() < deadline:
        time.sleep(step_s)
        value = check()
    return value
