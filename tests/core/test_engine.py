"""The reward engine on tiny Qwen3-VL models: loading path, both readouts, batching, bad input, faults."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from lrm_reward.core import loading, readouts, tiny_model
from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.types import Modality, Query, Readout

P, C, K = Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION
TASK = "open the top drawer"
LEVELS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _adapters(tiny, names=("progress", "contrastive", "completion")):
    return {name: str(tiny.adapters[name]) for name in names}


def _query(modality, level, rng, task=TASK, size=(64, 64)):
    frame = tiny_model.synthetic_frame
    images = {
        P: [frame(0.0, rng, size), frame(level, rng, size)],
        C: [frame(1.0 - level, rng, size), frame(level, rng, size)],
        K: [frame(level, rng, size)],
    }[modality]
    return Query(modality, task, images)


def _queries(seed=0):
    rng = np.random.default_rng(seed)
    return [_query(m, level, rng) for m in (P, C, K) for level in LEVELS]


def _argmax(answer):
    return max(answer.probabilities, key=answer.probabilities.get)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def logits_engine(tiny_lrm):
    engine = make_engine(EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm), max_batch_size=8))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def generate_engine(tiny_lrm):
    engine = make_engine(EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm), readout=Readout.GENERATE))
    yield engine
    engine.close()


# --- loading ------------------------------------------------------------------------------------------


def test_progress_loads_first_with_vision_tower_restricted(tiny_lrm):
    from peft.utils import ModulesToSaveWrapper

    on_disk = json.loads((tiny_lrm.adapters["progress"] / "adapter_config.json").read_text())
    assert on_disk["modules_to_save"] == ["visual", "merger"]  # shaped like the released adapter
    # contrastive listed first on purpose: progress must still be attached first
    cfg = EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm, ("contrastive", "completion", "progress")))
    with make_engine(cfg) as engine:
        model = engine.model
        assert list(model.peft_config) == ["progress", "contrastive", "completion"]
        assert model.peft_config["progress"].modules_to_save == ["visual"]
        assert not model.peft_config["contrastive"].modules_to_save
        wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        assert len(wrappers) == 1
        tower = wrappers[0]
        assert "progress" in tower.modules_to_save
        saved = tower.modules_to_save["progress"].patch_embed.proj.weight
        original = tower.original_module.patch_embed.proj.weight
        assert not torch.equal(saved, original)  # switching to progress switches the vision tower
        assert all(count > 0 for count in engine._loaded.lora_b_nonzero.values())
        assert set(engine._loaded.lora_b_nonzero) == {"progress", "contrastive", "completion"}


def test_adapters_change_the_answers(tiny_lrm, logits_engine):
    queries = _queries()
    with make_engine(EngineConfig(str(tiny_lrm.base))) as base_only:
        plain = base_only.score(queries)
    adapted = logits_engine.score(queries)
    assert all(a.parsed for a in plain)
    diffs = [abs(a.value - b.value) for a, b in zip(plain, adapted, strict=True)]
    assert max(diffs) > 1e-3


def test_zero_lora_b_adapter_is_refused(tiny_lrm, tmp_path):
    broken = tiny_model.make_zero_b_adapter(tiny_lrm.adapters["completion"], tmp_path / "completion_zero")
    adapters = _adapters(tiny_lrm)
    adapters["completion"] = str(broken)
    with pytest.raises(ModelLoadError, match=r"'completion'.*lora_B.*zero"):
        make_engine(EngineConfig(str(tiny_lrm.base), adapters))


def test_missing_folders_give_clear_errors(tiny_lrm, tmp_path):
    with pytest.raises(ModelLoadError, match="base model folder not found"):
        make_engine(EngineConfig(str(tmp_path / "nope")))
    adapters = _adapters(tiny_lrm)
    adapters["contrastive"] = str(tmp_path / "missing_adapter")
    with pytest.raises(ModelLoadError, match="adapter folder not found"):
        make_engine(EngineConfig(str(tiny_lrm.base), adapters))


def test_hub_id_offline_and_not_cached_says_so():
    with pytest.raises(ModelLoadError, match="local_files_only"):
        loading.resolve_adapter_folder("USC-PSI-Lab/LRM-models/progress", local_files_only=True)


def test_bin_only_adapter_is_refused(tiny_lrm, tmp_path):
    folder = tmp_path / "bin_adapter"
    shutil.copytree(tiny_lrm.adapters["completion"], folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelLoadError, match="only safetensors"):
        make_engine(EngineConfig(str(tiny_lrm.base), {"completion": str(folder)}))


def test_adapter_for_another_base_is_refused(tiny_lrm, tmp_path):
    tokenizer = tiny_model.build_tiny_tokenizer()
    other = tiny_model.build_tiny_model(tokenizer, seed=1, hidden_size=32, intermediate_size=64)
    other.save_pretrained(tmp_path / "other_base")
    adapter = tiny_model.save_random_adapter(tmp_path / "other_base", tmp_path / "other_completion", K)
    with pytest.raises(ModelLoadError, match=r"'completion'.*does not fit the base model"):
        make_engine(EngineConfig(str(tiny_lrm.base), {"completion": str(adapter)}))


def test_missing_rank_falls_back_to_authors_defaults(tiny_lrm, tmp_path):
    folder = tmp_path / "no_rank"
    shutil.copytree(tiny_lrm.adapters["progress"], folder)
    raw = json.loads((folder / "adapter_config.json").read_text())
    del raw["r"], raw["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    config = loading.read_adapter_config(folder, "progress")
    assert (config.r, config.lora_alpha) == (64, 128)
    assert config.modules_to_save == ["visual"]


def test_merged_checkpoint_answers_like_base_plus_adapter(tiny_lrm, tmp_path, logits_engine):
    merged = tiny_model.make_merged_checkpoint(tiny_lrm, "completion", tmp_path / "merged")
    queries = [q for q in _queries() if q.modality is K]
    with make_engine(EngineConfig(str(merged))) as engine:
        assert engine.adapter_names == []
        from_merged = engine.score(queries)
    from_adapter = logits_engine.score(queries)
    for a, b in zip(from_merged, from_adapter, strict=True):
        assert a.value == pytest.approx(b.value, abs=1e-4)


def test_dtype_and_attention_are_configurable(tiny_lrm, logits_engine):
    queries = _queries()[:4]
    reference = logits_engine.score(queries)
    cfg = EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm), attn_implementation="eager", dtype="float32")
    with make_engine(cfg) as engine:
        assert engine.model.get_base_model().config._attn_implementation == "eager"
        assert next(engine.model.parameters()).dtype == torch.float32
        eager = engine.score(queries)
    for a, b in zip(eager, reference, strict=True):
        assert a.value == pytest.approx(b.value, abs=1e-4)
    with make_engine(EngineConfig(str(tiny_lrm.base), dtype="bfloat16")) as engine:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        assert all(a.parsed for a in engine.score(queries))


# --- readouts -----------------------------------------------------------------------------------------


def test_both_readouts_agree_on_argmax(logits_engine, generate_engine):
    queries = _queries()
    scored = logits_engine.score(queries)
    generated = generate_engine.score(queries)
    for query, a, g in zip(queries, scored, generated, strict=True):
        assert g.parsed, g.raw_text
        label = {
            P: lambda v: f"{v:.1f}",
            C: lambda v: "ImageB" if v > 0 else "ImageA",
            K: lambda v: "yes" if v else "no",
        }
        assert _argmax(a) == label[query.modality](g.value), (query.modality, a.probabilities, g.raw_text)
    # the agreement means something: the tiny model's answers depend on the frames
    for modality in (P, C, K):
        winners = {_argmax(a) for q, a in zip(queries, scored, strict=True) if q.modality is modality}
        assert len(winners) >= 2, modality


def test_logits_answers_are_calibrated_summaries(logits_engine):
    for answer in logits_engine.score(_queries()):
        probs = answer.probabilities
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert answer.confidence == pytest.approx(max(probs.values()))
        if answer.modality is P:
            assert answer.value == pytest.approx(sum(float(k) * p for k, p in probs.items()), abs=1e-6)
        elif answer.modality is C:
            assert answer.value == pytest.approx(2 * probs["ImageB"] - 1, abs=1e-6)
        else:
            assert answer.value == pytest.approx(probs["yes"], abs=1e-6)


def test_candidate_scores_match_full_forward_passes(logits_engine):
    """The trie + KV-cache pass gives the same candidate probabilities as scoring each one from scratch."""
    loaded = logits_engine._loaded
    model, processor = loaded.model, loaded.processor
    rng = np.random.default_rng(7)
    query = _query(P, 0.6, rng)
    model.set_adapter("progress")
    logits_engine._active_adapter = "progress"
    fast = logits_engine.score([query])[0].probabilities

    prefix = readouts.prompt_text(processor, query, 2000) + '{ "completion_progress": '
    scores = {}
    with torch.inference_mode():
        for label in fast:
            inputs = processor(text=[prefix + label], images=query.images, return_tensors="pt")
            n_label = len(inputs["input_ids"][0]) - len(
                processor(text=[prefix], images=query.images)["input_ids"][0]
            )
            logprobs = torch.log_softmax(model(**inputs).logits[0].float(), dim=-1)
            ids = inputs["input_ids"][0]
            total = len(ids)
            scores[label] = sum(float(logprobs[i - 1, ids[i]]) for i in range(total - n_label, total))
    norm = math.log(sum(math.exp(s) for s in scores.values()))
    for label, p in fast.items():
        assert p == pytest.approx(math.exp(scores[label] - norm), abs=1e-4)


def test_trie_shares_prefixes(logits_engine):
    trie = logits_engine._tries[P]
    assert len(trie.labels) == 11
    # "0.x" and "1.0" share their first tokens: far fewer nodes than candidate tokens
    assert 0 < len(trie.node_tokens) < sum(sum(v) for v in trie.valid) - len(trie.labels)


def test_chain_of_thought_decodes_even_with_logits_readout(tiny_lrm):
    cfg = EngineConfig(
        str(tiny_lrm.base), _adapters(tiny_lrm, ("contrastive",)), max_new_tokens={"contrastive": 24}
    )
    rng = np.random.default_rng(3)
    query = _query(C, 0.8, rng)
    query.chain_of_thought = True
    with make_engine(cfg) as engine:
        answer = engine.score([query])[0]
    assert answer.probabilities is None  # came from decoding, not from the answer-set scores
    assert answer.raw_text and "logits readout" not in answer.raw_text
    assert answer.parsed


def test_output_without_json_is_unparsed_with_raw_text(tiny_lrm):
    cfg = EngineConfig(
        str(tiny_lrm.base), _adapters(tiny_lrm), readout="generate", max_new_tokens={"progress": 2}
    )
    with make_engine(cfg) as engine:
        answer = engine.score([_query(P, 0.5, np.random.default_rng(0))])[0]
        assert engine.stats.unparsed == 1
    assert not answer.parsed and answer.value is None
    assert answer.raw_text  # kept for logs
    assert "unparsed" in answer.error


# --- batching -----------------------------------------------------------------------------------------


def test_batched_equals_one_by_one(logits_engine, generate_engine):
    rng = np.random.default_rng(11)
    # mixed modalities and frame sizes, so padding differs per row
    queries = [
        _query(P, 0.3, rng, size=(48, 80)),
        _query(K, 0.9, rng),
        _query(C, 0.7, rng, size=(96, 64)),
        _query(P, 0.8, rng),
        _query(K, 0.1, rng, size=(40, 40), task="close the laptop lid and then push it to the back"),
        _query(C, 0.2, rng),
    ]
    for engine in (logits_engine, generate_engine):
        together = engine.score(queries)
        alone = [engine.score([q])[0] for q in queries]
        for q, a, b in zip(queries, together, alone, strict=True):
            assert a.modality is q.modality
            assert a.value == pytest.approx(b.value, abs=1e-4)
            if engine is generate_engine:
                assert a.raw_text == b.raw_text


def test_max_batch_size_is_respected(tiny_lrm):
    cfg = EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm, ("completion",)), max_batch_size=2)
    rng = np.random.default_rng(1)
    with make_engine(cfg) as engine:
        answers = engine.score([_query(K, level, rng) for level in (0.0, 0.3, 0.6, 0.9, 1.0)])
        assert engine.stats.forward_batches == 3
    assert all(a.parsed for a in answers)


@pytest.fixture(scope="module")
def plain_engine(tiny_lrm):
    """The reference logits path (prompt pass + separate candidate pass, no prefix reuse)."""
    engine = make_engine(EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm), fast_path=False))
    yield engine
    engine.close()


@pytest.mark.parametrize("path", ["plain", "fast"])
def test_cuda_oom_retries_at_half_batch_then_reports(path, plain_engine, logits_engine, monkeypatch):
    from lrm_reward.core.fast_readout import FastLogitsReadout

    engine = plain_engine if path == "plain" else logits_engine
    owner, name = (readouts, "score_answer_sets") if path == "plain" else (FastLogitsReadout, "score")
    real = getattr(owner, name)
    seen = []

    def fail_above_two(*args, **kwargs):
        queries = next(a for a in args if isinstance(a, list))
        seen.append(len(queries))
        if len(queries) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, fail_above_two)
    rng = np.random.default_rng(2)
    queries = [_query(K, level, rng) for level in (0.0, 0.2, 0.4, 0.6, 0.8)]
    answers = engine.score(queries)
    assert seen[0] == 5 and 2 in seen and max(seen[1:]) <= 3
    assert all(a.parsed for a in answers)

    def always_fail(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(owner, name, always_fail)
    answers = engine.score(queries[:2])
    assert all(not a.parsed and "out of memory" in a.error for a in answers)


# --- bad input ----------------------------------------------------------------------------------------


def test_bad_queries_get_errors_and_good_ones_still_answer(logits_engine):
    rng = np.random.default_rng(5)
    good = _query(K, 0.9, rng)
    frame = good.images[0]
    bad = [
        Query(K, "", [frame]),  # empty task
        Query(K, "x" * 5000, [frame]),  # huge task
        Query(K, TASK, [frame[:, :, 0]]),  # grayscale
        Query(K, TASK, [np.dstack([frame, frame[:, :, :1]])]),  # RGBA
        Query(K, TASK, [np.full((32, 32, 3), np.nan, dtype=np.float32)]),  # NaN floats
        Query(K, TASK, [np.zeros((1, 300, 3), np.uint8)]),  # aspect ratio beyond the processor's limit
        Query(K, TASK, [np.zeros((0, 10, 3), np.uint8)]),  # empty image
        Query(C, TASK, [frame]),  # one image for contrastive
        Query(K, TASK, "not a list"),
        Query("reward", TASK, [frame]),  # unknown modality
    ]
    answers = logits_engine.score([good, *bad, good])
    assert answers[0].parsed and answers[-1].parsed
    assert answers[0].value == pytest.approx(answers[-1].value)
    for answer in answers[1:-1]:
        assert not answer.parsed and answer.value is None
        assert answer.error.startswith("bad query:")


def test_odd_image_sizes_are_answered(logits_engine):
    rng = np.random.default_rng(6)
    sizes = [(1, 1), (3, 517), (479, 641), (17, 33), (2000, 30)]
    queries = [Query(K, TASK, [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)]) for h, w in sizes]
    answers = logits_engine.score(queries)
    assert all(a.parsed and 0.0 <= a.value <= 1.0 for a in answers), [a.error for a in answers]


def test_string_modality_and_flipped_frames_are_accepted(logits_engine):
    rng = np.random.default_rng(8)
    query = _query(C, 0.7, rng)
    flipped = [image[:, ::-1] for image in query.images]  # negative strides, as from a BGR->RGB view
    reference = logits_engine.score([Query(C, TASK, [np.ascontiguousarray(i) for i in flipped])])[0]
    answer = logits_engine.score([Query("contrastive", TASK, flipped)])[0]
    assert answer.parsed and answer.modality is C
    assert answer.value == pytest.approx(reference.value, abs=1e-6)


def test_missing_adapter_for_modality_is_an_error_answer(tiny_lrm):
    with make_engine(EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm, ("completion",)))) as engine:
        answers = engine.score(
            [_query(P, 0.5, np.random.default_rng(0)), _query(K, 0.5, np.random.default_rng(0))]
        )
    assert "no 'progress' adapter" in answers[0].error
    assert answers[1].parsed


def test_closed_engine_answers_with_errors(tiny_lrm):
    engine = make_engine(EngineConfig(str(tiny_lrm.base), _adapters(tiny_lrm, ("completion",))))
    engine.close()
    answer = engine.score([_query(K, 0.5, np.random.default_rng(0))])[0]
    assert not answer.parsed and "closed" in answer.error


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(base_model=""), "base_model"),
        (dict(readout="beam"), "readout"),
        (dict(adapters={"reward": "x"}), "not a modality"),
        (dict(adapters={}), "non-empty"),
        (dict(device="gpu0"), "device"),
        (dict(dtype="int8"), "dtype"),
        (dict(max_batch_size=0), "max_batch_size"),
        (dict(max_new_tokens={"progress": 0}), "max_new_tokens"),
        (dict(max_new_tokens={"reward": 3}), "not a modality"),
        (dict(prefix_cache_entries=0), "prefix_cache_entries"),
        (dict(prefix_cache_bytes=-1), "prefix_cache_bytes"),
        (dict(fast_path="yes"), "fast_path"),
    ],
)
def test_config_validation(kwargs, message):
    args = dict(base_model="some/model") | kwargs
    with pytest.raises(ValueError, match=message):
        EngineConfig(**args)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown engine backend"):
        make_engine(EngineConfig("some/model", backend="triton"))


def test_model_id_names_base_and_adapters(logits_engine, tiny_lrm):
    assert str(tiny_lrm.base) in logits_engine.model_id
    for name in ("progress", "contrastive", "completion"):
        assert name in logits_engine.model_id
