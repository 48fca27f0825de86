"""Loading cannot go silently wrong: every adapter tensor accounted for, the processor found where the
authors keep it, base-only loads flagged, one-line errors, cuda:N honoured, OOM retries after the failed
batch is freed. Tiny models (tests/conftest.py's tiny_lrm)."""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lrm_reward.core import cuda_device, loading, tiny_model
from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.loading import ModelLoadError, load_model
from lrm_reward.core.types import Answer, Modality, Query

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
TOWER = "base_model.model.model.visual."


def _file_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / loading.ADAPTER_WEIGHTS_FILE), framework="pt") as weights:
        return list(weights.keys())


def _rewrite_adapter(src: Path, dst: Path, change) -> Path:
    """Copy an adapter folder, passing its tensors (dict) through change()."""
    shutil.copytree(src, dst)
    path = dst / loading.ADAPTER_WEIGHTS_FILE
    save_file(change(load_file(str(path))), str(path), metadata={"format": "pt"})
    return dst


# --- every adapter tensor accounted for ----------------------------------------------------------------


def test_every_tensor_of_every_adapter_file_is_placed(tiny_lrm):
    adapters = {name: str(path) for name, path in tiny_lrm.adapters.items()}
    loaded = load_model(str(tiny_lrm.base), adapters)
    expected = {name: len(_file_keys(path)) for name, path in tiny_lrm.adapters.items()}
    assert loaded.adapter_tensors == expected
    tower = [k for k in _file_keys(tiny_lrm.adapters["progress"]) if k.startswith(TOWER)]
    assert tower, "the tiny progress adapter must carry the vision tower, like the released one"
    assert expected["progress"] > expected["completion"]  # the tower's tensors are counted too
    assert not loaded.base_only


def test_progress_tower_tensor_without_a_place_is_refused(tiny_lrm, tmp_path):
    # a tower saved for a deeper vision model: PEFT (0.21) loads the rest and only warns, and the old check
    # looked at lora_ keys alone, so this loaded without a word
    def add_block(weights):
        key = next(k for k in weights if k.startswith(TOWER + "blocks.0.attn.qkv.weight"))
        weights[key.replace("blocks.0.", "blocks.9.")] = weights[key].clone()
        return weights

    folder = _rewrite_adapter(tiny_lrm.adapters["progress"], tmp_path / "progress", add_block)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tiny_lrm.base), {"progress": str(folder)})
    message = str(info.value)
    assert "'progress'" in message and "1 tensor(s) of the file have no place in the model" in message
    assert TOWER + "blocks.9.attn.qkv.weight" in message  # names the key
    assert "vision tower" in message
    assert "\n" not in message


def test_tower_weights_missing_from_the_file_are_refused(tiny_lrm, tmp_path):
    def drop_merger(weights):
        return {k: v for k, v in weights.items() if ".visual.merger." not in k}

    folder = _rewrite_adapter(tiny_lrm.adapters["progress"], tmp_path / "progress", drop_merger)
    # peft 0.21 raises a KeyError itself here; the file check would catch it otherwise
    with pytest.raises(ModelLoadError, match=r"'progress'.*visual\.merger"):
        load_model(str(tiny_lrm.base), {"progress": str(folder)})


@pytest.mark.parametrize("first", [True, False], ids=["first-adapter", "later-adapter"])
def test_lora_tensor_without_a_place_is_refused(tiny_lrm, tmp_path, first):
    # the first adapter's PEFT load result used to be dropped: a renamed LoRA tensor there went unnoticed
    def rename_one(weights):
        key = next(k for k in sorted(weights) if "q_proj.lora_A" in k)
        weights[key.replace("q_proj", "q_projection")] = weights.pop(key)
        return weights

    name = "progress" if first else "completion"
    folder = _rewrite_adapter(tiny_lrm.adapters[name], tmp_path / name, rename_one)
    adapters = {n: str(p) for n, p in tiny_lrm.adapters.items() if n in ("progress", "completion")}
    adapters[name] = str(folder)
    with pytest.raises(ModelLoadError, match=rf"'{name}'.*no place.*q_projection\.lora_A.*not in the file"):
        load_model(str(tiny_lrm.base), adapters)


def test_values_that_did_not_land_are_refused(tiny_lrm):
    folder = tiny_lrm.adapters["completion"]
    loaded = load_model(str(tiny_lrm.base), {"completion": str(folder)})
    assert loading.account_adapter_weights(loaded.model, "completion", folder) == len(_file_keys(folder))
    param = next(p for n, p in loaded.model.named_parameters() if "lora_A.completion" in n)
    with torch.no_grad():
        param.add_(1.0)
    with pytest.raises(ModelLoadError, match=r"values differ.*lora_A"):
        loading.account_adapter_weights(loaded.model, "completion", folder)


def test_key_mapping_applies_below_the_peft_prefix():
    mapping = {r"^model\.visual": "model.vision_tower"}
    key = "base_model.model.model.visual.blocks.0.attn.qkv.weight"
    assert (
        loading.map_adapter_key(key, mapping)
        == "base_model.model.model.vision_tower.blocks.0.attn.qkv.weight"
    )
    assert loading.map_adapter_key(key, None) == key


# --- processor ---------------------------------------------------------------------------------------


def _base_without_processor(tiny_lrm, root: Path) -> Path:
    base = root / "base"
    base.mkdir(parents=True)
    for path in tiny_lrm.base.iterdir():
        if path.name not in PROCESSOR_FILES:
            (base / path.name).symlink_to(path)
    return base


def test_processor_comes_from_the_adapter_folder_when_the_base_lacks_one(tiny_lrm, tmp_path):
    base = _base_without_processor(tiny_lrm, tmp_path)
    progress = tmp_path / "progress"
    shutil.copytree(tiny_lrm.adapters["progress"], progress)
    for name in PROCESSOR_FILES:
        shutil.copy(tiny_lrm.base / name, progress / name)
    adapters = {"progress": str(progress), "completion": str(tiny_lrm.adapters["completion"])}
    loaded = load_model(str(base), adapters)
    assert loaded.processor_source == str(progress)
    assert loaded.processor.tokenizer.padding_side == "left"
    # an explicit processor wins over both
    explicit = load_model(str(base), adapters, processor=str(tiny_lrm.base))
    assert explicit.processor_source == str(tiny_lrm.base)


def test_no_processor_anywhere_says_where_it_looked(tiny_lrm, tmp_path):
    base = _base_without_processor(tiny_lrm, tmp_path)
    with pytest.raises(ModelLoadError, match=r"no processor.*model\.processor.*Tried:") as info:
        load_model(str(base), {"completion": str(tiny_lrm.adapters["completion"])})
    assert str(tiny_lrm.adapters["completion"]) in str(info.value)


def test_engine_config_processor_reaches_the_loader(tiny_lrm, tmp_path):
    base = _base_without_processor(tiny_lrm, tmp_path)
    cfg = EngineConfig(
        str(base), {"completion": str(tiny_lrm.adapters["completion"])}, processor=str(tiny_lrm.base)
    )
    with make_engine(cfg) as engine:
        assert engine._loaded.processor_source == str(tiny_lrm.base)


# --- base only -----------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_no_adapters_warns_and_is_flagged(tiny_lrm):
    # a handler on the module's own logger, not caplog: the launch_pytest plugin makes loggers created after
    # it loads stop propagating to the root (launch.logging.LaunchLogger)
    seen = _Records()
    loading.log.addHandler(seen)
    try:
        with make_engine(EngineConfig(str(tiny_lrm.base))) as engine:
            assert engine.base_only
        with make_engine(
            EngineConfig(str(tiny_lrm.base), {"completion": str(tiny_lrm.adapters["completion"])})
        ) as engine:
            assert not engine.base_only
    finally:
        loading.log.removeHandler(seen)
    warned = [r for r in seen.records if "base model only, not a reward model" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


# --- errors on one line -------------------------------------------------------------------------------


def test_load_errors_are_one_line():
    error = ModelLoadError("cannot load:\n  OSError: file\n\tmissing")
    assert str(error) == "cannot load: OSError: file missing"


def test_lrm_judge_prints_one_line_and_fails(tiny_lrm, tmp_path, capsys):
    from lrm_reward.refinement import judge_cli

    status = judge_cli.main([str(tmp_path / "dataset"), "--model", str(tmp_path / "no_model"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("lrm-judge:")]
    assert len(lines) == 1 and "base model folder not found" in lines[0]


# --- cuda:N -------------------------------------------------------------------------------------------


def test_cuda_n_that_is_not_there_is_refused_before_loading(tiny_lrm):
    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ModelLoadError, match=r"'cuda:7'"):
        load_model(str(tiny_lrm.base), None, device="cuda:7")


def test_memory_is_released_on_the_configured_device(monkeypatch):
    current = [0]
    emptied = []

    @contextlib.contextmanager
    def fake_device(device):
        before = current[0]
        current[0] = torch.device(device).index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(current[0]))
    cuda_device.release_memory(torch.device("cuda:1"))
    cuda_device.release_memory("cuda:2")
    cuda_device.release_memory(torch.device("cpu"))  # nothing to give back
    assert emptied == [1, 2]
    with cuda_device.on_device("cuda:3"):
        assert current[0] == 3
    assert current[0] == 0


# --- OOM retry -----------------------------------------------------------------------------------------


def test_oom_retry_runs_after_the_failed_batch_is_freed(tiny_lrm, monkeypatch):
    engine = make_engine(
        EngineConfig(
            str(tiny_lrm.base), {"completion": str(tiny_lrm.adapters["completion"])}, fast_path=False
        )
    )
    failed_batches: list[weakref.ref] = []
    alive_at_retry: list[int] = []
    sizes: list[int] = []

    def fake_run(route, queries):
        sizes.append(len(queries))
        # what a failed forward pass leaves behind: activations referenced from its frame
        activations = torch.zeros(len(queries), 1024)
        if len(queries) > 1:
            failed_batches.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        gc.collect()  # the engine may collect too; only a live reference (the exception's frame) keeps it
        alive_at_retry.append(sum(ref() is not None for ref in failed_batches))
        return [Answer(modality=Modality(q.modality), value=1.0, parsed=True) for q in queries]

    monkeypatch.setattr(engine, "_run", fake_run)
    rng = np.random.default_rng(0)
    queries = [
        Query(Modality.COMPLETION, "open the drawer", [tiny_model.synthetic_frame(v, rng)])
        for v in (0, 1, 0, 1)
    ]
    answers = engine.score(queries)
    engine.close()
    assert sizes == [4, 2, 1, 1, 2, 1, 1]
    assert engine.stats.oom_retries == 3
    assert [a.value for a in answers] == [1.0] * 4
    assert alive_at_retry == [0, 0, 0, 0]  # no failed batch alive when a smaller one runs
