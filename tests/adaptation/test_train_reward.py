"""lrm-train-reward: config handling, resume after a kill, and the bad-input cases (tiny model, CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from synthetic_episodes import write_block_dataset

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation import train as T
from lrm_reward.core.types import Modality


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "blocks"
    write_block_dataset(root, n_success=4, n_failure=2, n_frames=10)
    return root


def quick_config(base, dataset, out, **changes) -> T.TrainConfig:
    settings = dict(
        base_model=str(base),
        datasets=[{"root": str(dataset)}],
        output_dir=out,
        modalities=["completion"],
        max_steps=4,
        batch_size=2,
        learning_rate=5e-3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        save_every=2,
        device="cpu",
    )
    settings.update(changes)
    return T.TrainConfig(**settings)


def test_yaml_config_resolves_paths_against_its_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "train.yaml"
    path.write_text(
        "base_model: models/base\n"
        "datasets:\n  - data/rec\n  - {root: data/demo, labels: demo_labels.csv}\n"
        "output_dir: adapters\n"
        "samples: {eval_fraction: 0.3, seed: 5}\n"
        "grad_accum: 4\n"
    )
    cfg = T.load_train_config(path, {"batch_size": 2})
    assert cfg.datasets[0].root == tmp_path / "cfg" / "data" / "rec"
    assert cfg.datasets[1].labels == tmp_path / "cfg" / "demo_labels.csv"
    assert cfg.output_dir == tmp_path / "cfg" / "adapters"
    assert (cfg.samples.eval_fraction, cfg.samples.seed, cfg.grad_accum, cfg.batch_size) == (0.3, 5, 4, 2)
    # base_model may be a Hub id: a relative name whose folder does not exist stays as written
    assert cfg.base_model == "models/base"


def test_config_errors_name_the_setting(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"base_model": "b", "datasets": ["d"], "output_dir": "o", "learnig_rate": 1}))
    with pytest.raises(ValueError, match="learnig_rate"):
        T.load_train_config(path)
    with pytest.raises(ValueError, match="mixed_precision"):
        T.TrainConfig(base_model="b", datasets=["d"], output_dir="o", mixed_precision="bf16", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        T.TrainConfig(base_model="b", datasets=["d"], output_dir="o", batch_size=0)
    with pytest.raises(ValueError, match="datasets"):
        T.TrainConfig(base_model="b", datasets=[], output_dir="o")


def test_a_base_that_is_not_qwen3_vl_is_refused(tmp_path, small_dataset):
    base = tmp_path / "gpt"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(T.BaseModelMismatchError, match="Qwen3-VL"):
        T.train(quick_config(base, small_dataset, tmp_path / "out"), show_progress=False)


def test_adapter_shapes_are_checked_against_the_base(tiny_lrm):
    fingerprint = T.base_fingerprint(str(tiny_lrm.base))
    for folder in tiny_lrm.adapters.values():
        assert T.adapter_base_mismatch(folder, fingerprint) is None
    wider = dict(fingerprint, hidden_size=fingerprint["hidden_size"] * 2)
    assert "input size" in T.adapter_base_mismatch(tiny_lrm.adapters["completion"], wider)
    shallower = dict(fingerprint, num_hidden_layers=1)
    assert "layer 1" in T.adapter_base_mismatch(tiny_lrm.adapters["contrastive"], shallower)


def test_killed_run_resumes_from_its_last_checkpoint(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "run"
    cfg = quick_config(tiny_lrm.base, small_dataset, out)

    def kill_after_step_3(modality, step, loss):
        if step == 3:
            raise KeyboardInterrupt  # what a Ctrl-C or a kill between steps leaves behind

    with pytest.raises(KeyboardInterrupt):
        T.train(cfg, on_step=kill_after_step_3, show_progress=False)
    ckpt_root = out / T.CHECKPOINT_DIR / "completion"
    assert [step for step, _ in T.list_checkpoints(ckpt_root)] == [2]
    assert not (out / "completion").exists()
    # a checkpoint folder whose save was cut short (no state file) must be ignored
    (ckpt_root / "step-000003").mkdir()

    resumed = T.train(cfg, show_progress=False)
    assert resumed.modalities[0].resumed_from_step == 2
    assert not ckpt_root.exists()

    straight = T.train(quick_config(tiny_lrm.base, small_dataset, tmp_path / "straight"), show_progress=False)
    assert straight.modalities[0].resumed_from_step == 0
    a = load_file(str(out / "completion" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "completion" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)

    again = T.train(cfg, show_progress=False)
    assert again.modalities[0].skipped


def test_resuming_with_other_settings_is_refused(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "run"

    def kill_after_step_2(modality, step, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.train(
            quick_config(tiny_lrm.base, small_dataset, out), on_step=kill_after_step_2, show_progress=False
        )
    with pytest.raises(T.TrainingError, match="--restart"):
        T.train(quick_config(tiny_lrm.base, small_dataset, out, learning_rate=1e-3), show_progress=False)
    restarted = T.train(
        quick_config(tiny_lrm.base, small_dataset, out, learning_rate=1e-3), restart=True, show_progress=False
    )
    assert restarted.modalities[0].resumed_from_step == 0


def test_out_of_memory_suggests_smaller_batch_with_more_accumulation(
    tiny_lrm, small_dataset, tmp_path, monkeypatch
):
    from transformers import Qwen3VLForConditionalGeneration

    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Qwen3VLForConditionalGeneration, "forward", no_memory)
    cfg = quick_config(tiny_lrm.base, small_dataset, tmp_path / "oom", batch_size=4, grad_accum=2)
    with pytest.raises(T.OutOfMemoryTrainingError) as info:
        T.train(cfg, show_progress=False)
    message = str(info.value)
    assert "batch_size: 2 and grad_accum: 4" in message
    assert "same effective batch of 8" in message


def test_cli_explains_missing_labels(tiny_lrm, tmp_path, capsys):
    root = tmp_path / "nolabels"
    write_block_dataset(root, n_success=2, n_failure=1, n_frames=8, labels="none")
    code = T.main(
        [
            "--base-model",
            str(tiny_lrm.base),
            "--dataset",
            str(root),
            "--output-dir",
            str(tmp_path / "o"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "no success labels" in err and "next.success" in err and "--labels" in err


def test_cli_labels_file_makes_an_unlabelled_dataset_usable(tiny_lrm, tmp_path):
    root = tmp_path / "nolabels"
    outcomes = write_block_dataset(root, n_success=3, n_failure=2, n_frames=8, labels="none")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(k): v for k, v in outcomes.items()}))
    out = tmp_path / "adapters"
    code = T.main(
        [
            "--base-model",
            str(tiny_lrm.base),
            "--dataset",
            str(root),
            "--labels",
            str(labels),
            "--output-dir",
            str(out),
            "--modalities",
            "completion",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert code == 0
    assert (out / "completion" / "adapter_model.safetensors").is_file()
    split = json.loads((out / T.SPLIT_FILE).read_text())
    assert split["held_out"] and not set(split["held_out"]) & set(split["train"])


def test_progress_adapter_saves_the_vision_tower_like_the_released_one(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "p"
    T.train(
        quick_config(tiny_lrm.base, small_dataset, out, modalities=["progress"], max_steps=1),
        show_progress=False,
    )
    config = json.loads((out / "progress" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["visual"]
    assert set(config["target_modules"]) == set(T.DEFAULT_TARGET_MODULES)
    weights = load_file(str(out / "progress" / "adapter_model.safetensors"))
    assert any("visual" in k for k in weights) and any("lora_A" in k for k in weights)
    meta = json.loads((out / "progress" / T.METADATA_FILE).read_text())
    assert meta["modality"] == Modality.PROGRESS.value and meta["base_fingerprint"]["model_type"].startswith(
        "qwen3_vl"
    )


def test_no_successful_training_episode_is_a_label_error(tiny_lrm, tmp_path):
    root = tmp_path / "fails"
    write_block_dataset(root, n_success=0, n_failure=3, n_frames=8)
    with pytest.raises(S.LabelError, match="successful"):
        T.train(quick_config(tiny_lrm.base, root, tmp_path / "o"), show_progress=False)


def test_per_modality_settings_apply_to_that_modality_only(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "pm"
    cfg = quick_config(
        tiny_lrm.base,
        small_dataset,
        out,
        modalities=["completion", "contrastive"],
        max_steps=1,
        per_modality={"contrastive": {"max_steps": 2, "learning_rate": 1e-3}},
    )
    result = {r.modality: r for r in T.train(cfg, show_progress=False).modalities}
    assert result[Modality.COMPLETION].steps == 1 and result[Modality.CONTRASTIVE].steps == 2
    meta = json.loads((out / "contrastive" / T.METADATA_FILE).read_text())
    assert meta["config"]["learning_rate"] == 1e-3
    with pytest.raises(ValueError, match="per_modality"):
        quick_config(tiny_lrm.base, small_dataset, out, per_modality={"contrastive": {"seed": 3}})


def test_init_from_starts_an_adapter_from_one_trained_before(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "init"
    cfg = quick_config(
        tiny_lrm.base,
        small_dataset,
        out,
        modalities=["completion", "progress"],
        max_steps=1,
        learning_rate=1e-12,  # the progress adapter barely moves from where it started
        modules_to_save=["visual"],
        progress_modules_to_save=["visual", "lm_head"],
        init_from={"progress": "completion"},
        cpu_threads=1,
    )
    T.train(cfg, show_progress=False)
    source = load_file(str(out / "completion" / "adapter_model.safetensors"))
    started = load_file(str(out / "progress" / "adapter_model.safetensors"))
    completion_config = json.loads((out / "completion" / "adapter_config.json").read_text())
    assert completion_config["modules_to_save"] == ["visual"]
    shared = [k for k in source if k in started]
    assert any("lora_B" in k for k in shared) and any("visual" in k for k in shared)
    for key in shared:
        assert torch.allclose(source[key], started[key], atol=1e-6), key
    # lm_head is trained by progress only: saved with it, fresh (not from completion)
    assert any("lm_head" in k for k in started) and not any("lm_head" in k for k in source)


def test_init_from_and_cpu_threads_are_validated(tiny_lrm, small_dataset, tmp_path):
    with pytest.raises(ValueError, match="trained before"):
        quick_config(
            tiny_lrm.base,
            small_dataset,
            tmp_path,
            modalities=["progress", "completion"],
            init_from={"progress": "completion"},
        )
    with pytest.raises(ValueError, match="init_from"):
        quick_config(tiny_lrm.base, small_dataset, tmp_path, init_from={"progress": "progress"})
    with pytest.raises(ValueError, match="cpu_threads"):
        quick_config(tiny_lrm.base, small_dataset, tmp_path, cpu_threads=0)


def test_cpu_threads_are_restored_after_training(tiny_lrm, small_dataset, tmp_path):
    before = torch.get_num_threads()
    T.train(
        quick_config(tiny_lrm.base, small_dataset, tmp_path / "t", max_steps=1, cpu_threads=1),
        show_progress=False,
    )
    assert torch.get_num_threads() == before


def test_demo_recipe_file_is_a_valid_config_once_paths_are_added(tiny_lrm, small_dataset, tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "config" / "demo_reward_train.yaml"
    raw = T.read_config_file(recipe)
    assert not {"base_model", "datasets", "output_dir"} & set(raw)
    raw.update(base_model=str(tiny_lrm.base), datasets=[str(small_dataset)], output_dir=str(tmp_path))
    cfg = T._build(T.TrainConfig, raw, "recipe")
    assert cfg.modalities[0] is Modality.COMPLETION and cfg.init_from["progress"] == "completion"


def test_modules_learning_rate_moves_the_saved_modules_but_not_lora(tiny_lrm, small_dataset, tmp_path):
    out = tmp_path / "rates"
    cfg = quick_config(
        tiny_lrm.base,
        small_dataset,
        out,
        max_steps=2,
        learning_rate=1e-12,
        modules_learning_rate=1e-2,
        modules_to_save=["visual"],
        cpu_threads=1,
    )
    T.train(cfg, show_progress=False)
    adapter = load_file(str(out / "completion" / "adapter_model.safetensors"))
    base = load_file(str(tiny_lrm.base / "model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) < 1e-8 for v in lora_b)
    key = next(k for k in adapter if k.endswith("visual.patch_embed.proj.weight"))
    base_key = next(k for k in base if k.endswith("visual.patch_embed.proj.weight"))
    assert not torch.allclose(adapter[key], base[base_key], atol=1e-4)


def test_vision_warmup_trains_the_vision_tower_before_the_adapter(tiny_lrm, small_dataset, tmp_path):
    def tower_after(warmup: int) -> torch.Tensor:
        out = tmp_path / f"warm{warmup}"
        cfg = quick_config(
            tiny_lrm.base,
            small_dataset,
            out,
            max_steps=1,
            learning_rate=1e-12,
            modules_learning_rate=1e-2,
            modules_to_save=["visual"],
            vision_warmup_steps=warmup,
            cpu_threads=1,
        )
        T.train(cfg, show_progress=False)
        weights = load_file(str(out / "completion" / "adapter_model.safetensors"))
        assert not any("head" in k and "visual" not in k for k in weights)  # the probe head is not saved
        return next(v for k, v in weights.items() if k.endswith("visual.merger.linear_fc2.weight"))

    # same seed, same adapter step: only the warm-up can make the saved towers differ
    assert not torch.allclose(tower_after(0), tower_after(3), atol=1e-4)


def test_vision_warmup_needs_a_trainable_vision_tower(tiny_lrm, small_dataset, tmp_path):
    with pytest.raises(ValueError, match="vision_warmup_steps"):
        quick_config(tiny_lrm.base, small_dataset, tmp_path, vision_warmup_steps=5)
    with pytest.raises(ValueError, match="vision_warmup_steps"):
        quick_config(
            tiny_lrm.base, small_dataset, tmp_path, vision_warmup_steps=-1, modules_to_save=["visual"]
        )
    with pytest.raises(ValueError, match="modules_learning_rate"):
        quick_config(tiny_lrm.base, small_dataset, tmp_path, modules_learning_rate=0.0)
