"""Progress over vLLM, faithful to the adapter's own vision tower: the progress adapter merged into the base
(as lrm-vllm-server makes it) served as the model "progress", against the local engine running base +
progress LoRA + the adapter's tower. Once with vLLM's prefix caching on, once off (one server at a time).
Progress answers take several tokens ("0" "." "5"): the backend's later requests continue the first one's
prompt, so with caching on they reuse its KV blocks.
"""

from __future__ import annotations

import pytest
from vllm_servers import assert_same_answers, episode_queries, needs_vllm, running, server_for

from lrm_reward.core.engine import EngineConfig, make_engine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[True, False], ids=["prefix-caching", "no-prefix-caching"])
def server(request, tiny_vllm_lrm, merged_progress, module_tmp):
    needs_vllm()
    caching = request.param
    handle = server_for(
        tiny_vllm_lrm, module_tmp, ("progress",), merged=merged_progress, prefix_caching=caching
    )
    handle.prefix_caching = caching
    yield from running(handle)


@pytest.fixture(scope="module")
def local_answers(tiny_vllm_lrm, one_torch_thread):
    queries = episode_queries(("progress",), frames=8)
    cfg = EngineConfig(
        str(tiny_vllm_lrm.base),
        adapters={"progress": str(tiny_vllm_lrm.adapters["progress"])},
        dtype="float32",
    )
    with make_engine(cfg) as engine:
        return queries, engine.score(queries)


def test_progress_matches_the_local_engine(tiny_vllm_lrm, server, local_answers):
    queries, expected = local_answers
    hits_before = server.metric("vllm:prefix_cache_hits_total")
    cfg = EngineConfig(
        str(tiny_vllm_lrm.base),
        adapters={"progress": str(tiny_vllm_lrm.adapters["progress"])},
        backend="vllm",
        server_url=server.url,
        request_timeout_s=120.0,
    )
    with make_engine(cfg) as engine:
        got = engine.score(queries)
        stats = engine.stats
    assert_same_answers(expected, got)
    assert stats.http_requests >= 2 * len(queries)  # several tokens: at least two requests a query
    hits = server.metric("vllm:prefix_cache_hits_total") - hits_before
    if server.prefix_caching:
        assert hits > 0 and stats.cached_prompt_tokens > 0
    else:
        assert hits == 0 and stats.cached_prompt_tokens == 0
