"""Faults of a real vLLM server, as the reward node meets them through the vllm backend: not up yet when the
engine is made (retried with backoff), killed mid-run (errors, counted; answers again once it is back),
stalled (SIGSTOP: each call ends at its timeout, later calls fail fast), and HTTP errors (the server's
message, logged once per kind). One server for the module, on the completion adapter only.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from vllm_servers import assert_same_answers, episode_queries, needs_vllm, server_for, wait_until

from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX

pytestmark = pytest.mark.slow
QUERIES = episode_queries(("completion",), frames=3)


@pytest.fixture(scope="module")
def server(tiny_vllm_lrm, module_tmp):
    """Not started here: the first test starts it while an engine is already waiting for it."""
    needs_vllm()
    handle = server_for(
        tiny_vllm_lrm, module_tmp, ("completion",), env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    )
    yield handle
    handle.stop()


@pytest.fixture
def up(server):
    if server.proc is None:
        server.start()
    return server


def _config(tiny, url: str, **changes) -> EngineConfig:
    settings = dict(request_timeout_s=30.0, server_connect_s=5.0)
    settings.update(changes)
    adapters = {"completion": str(tiny.adapters["completion"])}
    return EngineConfig(str(tiny.base), adapters=adapters, backend="vllm", server_url=url, **settings)


def _all_ok(answers) -> bool:
    return all(a.parsed for a in answers)


def test_engine_waits_for_a_server_that_comes_up_late(tiny_vllm_lrm, server, caplog):
    made: dict = {}

    def make() -> None:
        try:
            made["engine"] = make_engine(_config(tiny_vllm_lrm, server.url, server_connect_s=600.0))
        except Exception as exc:  # reported by the assertion below
            made["error"] = exc

    with caplog.at_level(logging.WARNING, logger="lrm_reward.core.vllm_client"):
        thread = threading.Thread(target=make)
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive(), made  # still retrying: nothing listens yet
        server.start()
        thread.join(timeout=120)
    assert "engine" in made, made
    assert any("not ready" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records)
    with made["engine"] as engine:
        assert _all_ok(engine.score(QUERIES))


def test_server_killed_mid_run_gives_counted_errors_then_answers_again(tiny_vllm_lrm, up):
    with make_engine(_config(tiny_vllm_lrm, up.url)) as engine:
        before = engine.score(QUERIES)
        assert _all_ok(before)
        up.kill()
        started = time.monotonic()
        failed = engine.score(QUERIES)
        assert time.monotonic() - started < 5.0
        assert not any(a.parsed for a in failed)
        assert all(a.error.startswith(ENGINE_ERROR_PREFIX) for a in failed), failed[0].error
        assert sum(engine.stats.server_faults.get(k, 0) for k in ("unreachable", "disconnected")) >= 1
        assert engine.health()[0] is False
        engine.score(QUERIES)  # within the backoff: answered as errors without a request
        assert engine.stats.failed_fast >= len(QUERIES)

        up.start()
        after = wait_until(lambda: (lambda a: a if _all_ok(a) else None)(engine.score(QUERIES)), 60.0)
        assert after, "no answers after the server came back"
        assert engine.stats.reconnects >= 1
        assert engine.health()[0] is True
    assert_same_answers(before, after, tolerance=1e-4)


def test_stalled_server_times_out_and_never_blocks_for_long(tiny_vllm_lrm, up):
    with make_engine(_config(tiny_vllm_lrm, up.url, request_timeout_s=2.0)) as engine:
        before = engine.score(QUERIES)
        assert _all_ok(before)
        up.stall()
        try:
            started = time.monotonic()
            timed_out = engine.score(QUERIES)
            assert time.monotonic() - started < 3.0
            assert all(a.error and "timeout" in a.error for a in timed_out), timed_out[0].error
            started = time.monotonic()
            engine.score(QUERIES)  # the server is known down: fails fast, or after one short /health probe
            assert time.monotonic() - started < 2.0
        finally:
            up.resume()
        after = wait_until(lambda: (lambda a: a if _all_ok(a) else None)(engine.score(QUERIES)), 30.0)
        assert after, "no answers after the server resumed"
        assert engine.stats.server_faults.get("timeout", 0) >= 1
    assert_same_answers(before, after, tolerance=1e-4)


def test_http_errors_carry_the_server_message_and_are_logged_once(tiny_vllm_lrm, up, caplog):
    with make_engine(_config(tiny_vllm_lrm, up.url)) as engine:
        assert _all_ok(engine.score(QUERIES))
        status, text = up.post("/v1/unload_lora_adapter", {"lora_name": "completion"})
        assert status == 200, text
        try:
            with caplog.at_level(logging.ERROR, logger="lrm_reward.core.vllm_client"):
                first = engine.score(QUERIES)
                second = engine.score(QUERIES)
        finally:
            path = str(tiny_vllm_lrm.adapters["completion"].resolve())
            status, text = up.post("/v1/load_lora_adapter", {"lora_name": "completion", "lora_path": path})
            assert status == 200, text
        errors = [a.error for a in first + second]
        assert all(e and "http_404" in e and "does not exist" in e for e in errors), errors[0]
        assert engine.stats.server_faults["http_404"] == 2 * len(QUERIES)
        logged = [r for r in caplog.records if "http_404" in r.getMessage()]
        assert len(logged) == 1, [r.getMessage() for r in logged]
        assert engine.health()[0] is True  # an HTTP error is the server answering: it stays "up"
        assert _all_ok(engine.score(QUERIES))
