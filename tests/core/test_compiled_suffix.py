"""The static-shape suffix pass (EngineConfig.compile) against the eager fast path, on the tiny model (CPU).

- "cuda-graphs" without CUDA runs the padded static path with the decoder loop eager: same answers as the
  one-call fast path (padding of batch, suffix and prefix, dense DeepStack features, dummy rows).
- the torch.compile modes run with the "aot_eager" backend (compiled_suffix.BACKEND_OVERRIDE): inductor's
  C++ compile took ~2 min for these shapes on this shared 2-core CPU (same answers, checked by hand);
  aot_eager still traces the decoder layer with Dynamo (guards, recompiles, graphs) and runs the traced
  graph. Same answers; another suffix or prefix length inside the same bucket and switching adapters do
  not recompile. (Without CUDA no CUDA graph is captured: reduce-overhead and compile+cuda-graphs run
  their compiled layers uncaptured.)
- a failing compile falls back (warning + counter), never raises; warm-up compiles and leaves no trace.
"""

import dataclasses

import numpy as np
import pytest
import torch
from tiny_engines import tiny_engine

from lrm_reward.core import compiled_suffix, tiny_model
from lrm_reward.core.engine import EngineConfig
from lrm_reward.core.types import Modality, Query

P, C, K = Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION
SHORT_TASK = "open the drawer"
LONG_TASK = "open the top drawer of the cabinet slowly"  # a longer prefix, in the same 64-token bucket
frame = tiny_model.synthetic_frame


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _argmax(answer):
    return max(answer.probabilities, key=answer.probabilities.get)


def _assert_same(answers, reference, tolerance):
    assert all(a.parsed for a in reference)
    diff = max(abs(a.value - b.value) for a, b in zip(answers, reference, strict=True))
    assert diff <= tolerance, diff
    assert [_argmax(a) for a in answers] == [_argmax(b) for b in reference]


def _mixed_queries(rng):
    """Two streams (own task, frame sizes), all three modalities, and a progress query without initial."""
    initials = [frame(0.0, rng), frame(1.0, rng, (48, 64))]
    queries = []
    for level, size in ((0.3, (64, 64)), (0.8, (48, 80))):
        for initial, task in zip(initials, (SHORT_TASK, LONG_TASK), strict=True):
            current = frame(level, rng, size)
            queries += [Query(P, task, [initial, current]), Query(K, task, [current])]
    queries.append(Query(C, LONG_TASK, [frame(0.2, rng), frame(0.9, rng)]))
    queries.append(Query(P, SHORT_TASK, [frame(0.6, rng)]))
    return queries


def test_padded_sizes():
    assert [compiled_suffix.padded_batch(n) for n in (1, 2, 3, 5, 8, 9, 33)] == [1, 2, 4, 8, 8, 16, 64]
    assert [compiled_suffix.padded_length(n, 64) for n in (0, 1, 64, 65, 372)] == [0, 64, 64, 128, 384]
    with pytest.raises(ValueError):
        compiled_suffix.padded_batch(0)
    with pytest.raises(ValueError):
        compiled_suffix.padded_length(3, 0)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(compile="fast"), "compile must be one of"),
        (dict(compile="default", fast_path=False), "needs fast_path"),
        (dict(compile_length_step=0), "compile_length_step"),
        (dict(compile_warmup_batches=(1, 0)), "compile_warmup_batches"),
        (dict(compile_warmup_image=(480,)), "compile_warmup_image"),
        (dict(compile_warmup_s=-1), "compile_warmup_s"),
    ],
)
def test_config_validates_compile_settings(changes, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig("some/model", **changes)
    cfg = EngineConfig("some/model", compile="reduce-overhead", compile_warmup_batches=[1, 8])
    assert cfg.compile_warmup_batches == (1, 8)


@pytest.mark.parametrize(
    "dtype, tolerance, prefix_cache",
    [("float32", 1e-4, True), ("bfloat16", 0.02, True), ("float32", 1e-4, False)],
    ids=["float32", "bfloat16", "float32-no-prefix"],
)
def test_static_path_matches_the_one_call_fast_path(tiny_lrm, dtype, tolerance, prefix_cache):
    queries = _mixed_queries(np.random.default_rng(0))
    with tiny_engine(tiny_lrm, dtype=dtype, max_batch_size=3, prefix_cache=prefix_cache) as eager:
        reference = eager.score(queries)
    # cuda-graphs without CUDA: padded static shapes, decoder loop run eagerly; batches of 3 pad to 4
    changes = dict(dtype=dtype, max_batch_size=3, prefix_cache=prefix_cache, compile="cuda-graphs")
    with tiny_engine(tiny_lrm, **changes) as static:
        first = static.score(queries)
        again = static.score(queries)  # prefix hits
        stats = static.stats
    _assert_same(first, reference, tolerance)
    _assert_same(again, reference, tolerance)
    assert stats.fast_path_fallbacks == 0 and stats.compile_failures == 0
    assert stats.compile_eager_passes >= 6  # every suffix pass went through the static path


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per function by Dynamo: start and leave each compile test without any."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "compile+cuda-graphs"])
def test_compiled_pass_matches_eager_and_does_not_recompile_within_a_bucket(
    tiny_lrm, monkeypatch, fresh_dynamo, mode
):
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled_suffix, "BACKEND_OVERRIDE", "aot_eager")
    rng = np.random.default_rng(1)
    initial = frame(0.0, rng)
    first_round = [
        Query(P, SHORT_TASK, [initial, frame(0.4, rng, (64, 64))]),
        Query(K, SHORT_TASK, [frame(0.4, rng)]),
    ]
    # another task (longer prefix) and another frame size (longer suffix): same buckets
    second_round = [
        Query(P, LONG_TASK, [frame(0.1, rng), frame(0.7, rng, (64, 128))]),
        Query(K, LONG_TASK, [frame(0.7, rng, (64, 128))]),
    ]
    with tiny_engine(tiny_lrm) as eager:
        reference = [eager.score([q])[0] for q in first_round + second_round]

    seen = []  # (unpadded, padded) lengths the static path asked for
    real_padded_length = compiled_suffix.padded_length

    def spy(length, step):
        seen.append((length, real_padded_length(length, step)))
        return seen[-1][1]

    monkeypatch.setattr(compiled_suffix, "padded_length", spy)
    with tiny_engine(tiny_lrm, compile=mode) as engine:
        answers = [engine.score([first_round[0]])[0]]  # progress adapter
        per_adapter = engine.stats.compiled_graphs
        answers.append(engine.score([first_round[1]])[0])  # completion adapter: its own graphs
        graphs = counters["stats"]["unique_graphs"]
        compiled = engine.stats.compiled_graphs
        first_lengths = list(seen)
        seen.clear()
        answers += [engine.score([q])[0] for q in second_round]  # switches adapters twice more
        answers += [engine.score([q])[0] for q in first_round]  # and back
        assert counters["stats"]["unique_graphs"] == graphs  # no recompile at all
        stats = dataclasses.replace(engine.stats)
        # a batch of two rows (different prefix and suffix lengths): the dynamic-batch graph
        pair = engine.score([first_round[0], second_round[0]])
        assert engine.stats.compiled_graphs > stats.compiled_graphs
    _assert_same(answers, reference + reference[:2], 1e-4)
    _assert_same(pair, [reference[0], reference[2]], 1e-4)
    # regional compilation: the same layer graph(s) for every layer, one set per adapter, none added later
    assert per_adapter >= 1 and compiled == stats.compiled_graphs == 2 * per_adapter
    assert stats.compile_failures == stats.compile_unexpected_recompiles == stats.compile_eager_passes == 0
    assert stats.compile_s > 0
    # every suffix and prefix length differed between the rounds, while their buckets were the same
    second_lengths = seen[: len(first_lengths)]
    assert len(first_lengths) == 4  # (suffix + nodes, prefix) for progress, then for completion
    assert [padded for _, padded in first_lengths] == [padded for _, padded in second_lengths]
    assert all(a != b for (a, _), (b, _) in zip(first_lengths, second_lengths, strict=True))


def test_a_failing_compile_falls_back_to_the_eager_fast_path(tiny_lrm, monkeypatch, caplog, fresh_dynamo):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("injected compiler failure")

    monkeypatch.setattr(compiled_suffix, "BACKEND_OVERRIDE", broken_backend)
    queries = _mixed_queries(np.random.default_rng(2))[:4]
    with tiny_engine(tiny_lrm) as eager:
        reference = eager.score(queries)
    with tiny_engine(tiny_lrm, compile="default") as engine:
        first = engine.score(queries)
        again = engine.score(queries)
        stats = engine.stats
        assert not engine._fast.decoder.active
    _assert_same(first, reference, 1e-4)
    _assert_same(again, reference, 1e-4)
    assert stats.compile_failures == 1  # turned off at the first failure: no second compile attempt
    assert stats.errors == 0 and stats.fast_path_fallbacks == 0
    assert "injected compiler failure" in caplog.text


def test_warm_up_prepares_shapes_and_leaves_no_trace(tiny_lrm):
    with tiny_engine(
        tiny_lrm, compile="cuda-graphs", compile_warmup_batches=(1, 2), compile_warmup_image=(48, 64)
    ) as engine:
        stats = engine.stats
        assert stats.compile_warmup_s > 0
        # three modalities x two batch sizes x two calls each, none of it counted as queries or cached
        assert stats.compile_eager_passes == 12
        assert stats.queries == stats.forward_batches == 0
        assert len(engine.prefix_cache) == 0
        assert engine.warm_up((1,), modalities=(K,)) > 0
        assert engine.stats.compile_eager_passes == 14
    with tiny_engine(
        tiny_lrm, compile="cuda-graphs", compile_warmup_batches=(1,), compile_warmup_s=0
    ) as engine:
        assert engine.stats.compile_eager_passes == 0  # no time for any shape: everything on first use
