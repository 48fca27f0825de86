"""The vLLM backend answers like the local engine: one real vLLM server (CPU build) on the head_dim-32 tiny
model, base + completion/contrastive LoRA modules, prefix caching on; the local engine in fp32 beside it.

Also: vLLM's prefix cache is hit by the second request of a query and by queries sharing a prompt prefix
(read from the server's /metrics), concurrent answers equal one-by-one answers (an upstream report of wrong
outputs with prefix caching under concurrency, vLLM issue 20261), and the generate readout parses the same.
"""

from __future__ import annotations

import pytest
from vllm_servers import (
    assert_same_answers,
    episode_queries,
    needs_vllm,
    running,
    server_for,
)

from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.types import Readout

pytestmark = pytest.mark.slow
MODALITIES = ("completion", "contrastive")


@pytest.fixture(scope="module")
def server(tiny_vllm_lrm, module_tmp):
    needs_vllm()
    yield from running(server_for(tiny_vllm_lrm, module_tmp, MODALITIES))


def _config(tiny, **changes) -> EngineConfig:
    adapters = {m: str(tiny.adapters[m]) for m in MODALITIES}
    return EngineConfig(str(tiny.base), adapters=adapters, dtype="float32", **changes)


@pytest.fixture(scope="module")
def local_answers(tiny_vllm_lrm, one_torch_thread):
    queries = episode_queries(MODALITIES)
    with make_engine(_config(tiny_vllm_lrm)) as engine:
        return queries, engine.score(queries)


def _remote(tiny, server, **changes):
    return make_engine(
        _config(tiny, backend="vllm", server_url=server.url, request_timeout_s=120.0, **changes)
    )


def test_completion_and_contrastive_match_the_local_engine(tiny_vllm_lrm, server, local_answers):
    queries, expected = local_answers
    with _remote(tiny_vllm_lrm, server) as engine:
        got = engine.score(queries)
        assert engine.stats.errors == 0 and engine.stats.unparsed == 0
    assert_same_answers(expected, got)
    assert {a.modality.value for a in got} == set(MODALITIES)


def test_prefix_cache_hits_are_read_from_the_server_metrics(tiny_vllm_lrm, server, local_answers):
    queries, expected = local_answers
    hits_before = server.metric("vllm:prefix_cache_hits_total")
    with _remote(tiny_vllm_lrm, server) as engine:
        got = engine.score(queries)
        cached = engine.stats.cached_prompt_tokens
    hits_after = server.metric("vllm:prefix_cache_hits_total")
    assert hits_after > hits_before, "no prefix-cache hit counted by the server"
    assert cached > 0, "the server reported no cached prompt tokens"
    assert_same_answers(expected, got)


def test_concurrent_answers_equal_one_by_one_answers(tiny_vllm_lrm, server, local_answers):
    queries, _ = local_answers
    with _remote(tiny_vllm_lrm, server, server_concurrency=16) as engine:
        together = engine.score(queries)
    with _remote(tiny_vllm_lrm, server, server_concurrency=1) as engine:
        alone = [engine.score([q])[0] for q in queries]
    assert_same_answers(alone, together, tolerance=1e-4)


def test_generate_readout_parses_the_same_answers(tiny_vllm_lrm, server, one_torch_thread):
    queries = episode_queries(("completion",), frames=4)
    with make_engine(_config(tiny_vllm_lrm, readout=Readout.GENERATE)) as engine:
        expected = engine.score(queries)
    with _remote(tiny_vllm_lrm, server, readout=Readout.GENERATE) as engine:
        got = engine.score(queries)
    assert [a.value for a in got] == [a.value for a in expected]
    assert all(a.parsed for a in got), [a.raw_text for a in got]


def test_a_server_serving_other_adapters_is_refused(tiny_vllm_lrm, server, tmp_path):
    import shutil

    from lrm_reward.core.loading import ModelLoadError

    other = tmp_path / "completion-copy"
    shutil.copytree(tiny_vllm_lrm.adapters["completion"], other)
    cfg = EngineConfig(
        str(tiny_vllm_lrm.base), adapters={"completion": str(other)}, backend="vllm", server_url=server.url
    )
    with pytest.raises(ModelLoadError, match="serves the adapter 'completion' from"):
        make_engine(cfg)
    cfg = EngineConfig(
        str(tiny_vllm_lrm.base), adapters={"progress": str(other)}, backend="vllm", server_url=server.url
    )
    with pytest.raises(ModelLoadError, match="no vLLM server serves 'progress'"):
        make_engine(cfg)
