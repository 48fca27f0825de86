"""Fixtures for the vLLM backend tests: the head_dim-32 tiny model and its merged progress model. The server
processes are started per test module (vllm_servers.py); tests that need one skip with the reason when
.venv-vllm is missing (scripts/setup_vllm.sh makes it; CI runs that step)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_servers import TINY_CACHE, TINY_VARIANT


@pytest.fixture(scope="session")
def tiny_vllm_lrm():
    """The tiny LRM with head_dim 32 (cached in .cache/tiny_lrm under its own key): vLLM's CPU attention
    refuses the default tiny model's head_dim 16 at the first request."""
    from lrm_reward.core import tiny_model

    return tiny_model.cached_tiny_lrm(TINY_CACHE, seed=0, variant=TINY_VARIANT)


@pytest.fixture(scope="session")
def merged_progress(tiny_vllm_lrm, tmp_path_factory) -> Path:
    """The tiny progress adapter merged into its base, as lrm-vllm-server makes it."""
    import torch

    from lrm_reward.serving.vllm_server import merge_adapter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("vllm") / "merged-progress"
        return merge_adapter(str(tiny_vllm_lrm.base), str(tiny_vllm_lrm.adapters["progress"]), out)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vllm-server")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The local engine on tiny models runs several times faster single-threaded on a shared 2-core CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
