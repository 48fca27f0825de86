"""From recorded episodes to evaluated adapters in two commands, on the tiny model and the CPU.

The synthetic scene (a block dragging a dark cloth onto a green target) gets darker as the task
progresses; the untrained tiny model was taught that brighter frames mean more progress, so it judges
this scene backwards. A short LoRA training on the scene must beat it by a clear margin on held-out
episodes, and the adapters must load through the engine's normal path.

Sized so the bars hold with room on any x86-64 CPU: 24 steps with one progress frame per label cleared
them by a hair and failed on another CPU (contrastive 0.5 on an AVX-512 EPYC). With 96 steps, two frames
per progress label and 80 contrastive steps, runs over tiny bases built with other seeds (standing in for
other CPUs' floating-point paths), 2 dataset seeds, 2 training seeds and torch threads 1 and 2 gave worst
values VOC 0.53, completion accuracy 1.0, contrastive accuracy 0.94 (bars 0.2, 0.75, 0.65).
"""

import json

import numpy as np
import pytest
from synthetic_episodes import write_block_dataset

from lrm_reward.adaptation import evaluate as E
from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation import train as T
from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.types import Modality, Query

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tiny_lrm, tmp_path_factory):
    work = tmp_path_factory.mktemp("adapt")
    write_block_dataset(work / "episodes", n_success=12, n_failure=5, n_frames=16, seed=1)
    config = work / "train.yaml"
    config.write_text(
        f"base_model: {tiny_lrm.base}\n"
        "datasets: [episodes]\n"
        "output_dir: adapters\n"
        "samples: {eval_fraction: 0.25, seed: 0, contrastive_per_episode: 6, contrastive_min_gap: 0.4,\n"
        "          progress_per_label: 2, voc_frames: 8}\n"
        "max_steps: 96\nbatch_size: 8\nlearning_rate: 0.005\nlora_r: 16\nlora_alpha: 32\nlora_dropout: 0.0\n"
        "per_modality: {contrastive: {max_steps: 80, learning_rate: 0.01}}\n"
        "device: cpu\nseed: 0\n"
    )
    assert T.main(["--config", str(config), "--quiet"]) == 0
    report = work / "report"
    code = E.main(
        [
            "--base-model",
            str(tiny_lrm.base),
            "--split-from",
            str(work / "adapters"),
            "--adapters",
            f"trained={work / 'adapters'}",
            "--adapters",
            "untrained=none",
            "--output-dir",
            str(report),
        ]
    )
    assert code == 0
    return work, json.loads((report / "metrics.json").read_text())


def test_adapters_are_written_in_the_layout_the_engine_loads(trained):
    work, _ = trained
    for modality in ("progress", "contrastive", "completion"):
        folder = work / "adapters" / modality
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert json.loads((work / "adapters" / "progress" / "adapter_config.json").read_text())[
        "modules_to_save"
    ] == ["visual"]


def test_trained_adapters_beat_the_untrained_model_on_held_out_episodes(trained):
    _, metrics = trained
    assert metrics["evaluation"]["successful"] >= 2 and metrics["evaluation"]["failed"] >= 1
    new, old = metrics["results"]["trained"], metrics["results"]["untrained"]
    assert new["unparsed"] == 0
    assert new["voc"] > 0.2 and new["voc"] >= old["voc"] + 0.5
    assert (
        new["completion_accuracy"] >= 0.75 and new["completion_accuracy"] >= old["completion_accuracy"] + 0.2
    )
    assert (
        new["contrastive_accuracy"] >= 0.65
        and new["contrastive_accuracy"] >= old["contrastive_accuracy"] + 0.2
    )
    assert new["completion_ece"] < old["completion_ece"]


def test_report_has_a_plot_per_metric(trained):
    work, _metrics = trained
    report = work / "report"
    html = (report / "report.html").read_text()
    for metric in E.METRIC_TITLES:
        assert (report / f"{metric}.png").stat().st_size > 1000
        assert f'src="{metric}.png"' in html
    assert (report / "completion_reliability.png").is_file()
    assert "trained" in html and "untrained" in html


def test_engine_serves_the_trained_adapters(trained, tiny_lrm):
    work, _ = trained
    split = json.loads((work / "adapters" / T.SPLIT_FILE).read_text())
    episode_set = S.load_episodes([S.DatasetSpec(work / "episodes")], S.SampleConfig())
    held = [ep for ep in episode_set.episodes if str(ep.key) in split["held_out"] and ep.success]
    adapters = {m: str(work / "adapters" / m) for m in T.ADAPTER_LAYOUT}
    with make_engine(EngineConfig(base_model=str(tiny_lrm.base), adapters=adapters)) as engine:
        assert sorted(engine.adapter_names) == sorted(T.ADAPTER_LAYOUT)
        queries = []
        for ep in held:
            first, last = episode_set.store.frame(ep, 0), episode_set.store.frame(ep, ep.length - 1)
            queries += [
                Query(Modality.COMPLETION, ep.task, [first]),
                Query(Modality.COMPLETION, ep.task, [last]),
                Query(Modality.PROGRESS, ep.task, [first, first]),
                Query(Modality.PROGRESS, ep.task, [first, last]),
                Query(Modality.CONTRASTIVE, ep.task, [first, last]),
            ]
        answers = engine.score(queries)
    assert all(a.parsed for a in answers)
    values = np.array([a.value for a in answers]).reshape(len(held), 5)
    # the finished frame looks more finished than the first, to every adapter
    assert (values[:, 1] > values[:, 0]).all()
    assert (values[:, 3] > values[:, 2]).all()
    assert (values[:, 4] > 0).all()  # B (the end) is closer to done
