"""A bag goes the whole way: bag -> lrm-import-bag -> judge -> refine (and lrm-train-reward's samples),
nothing converted by hand between."""

from __future__ import annotations

import sys
from pathlib import Path

from bag_factory import MARKER_TOPIC, BagSpec, EpisodeSpec, write_bag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "refinement"))
from judged_data import BrightnessEngine  # the refinement tests' stand-in reward model

from lrm_reward.adaptation.samples import DatasetSpec, SampleConfig, build_samples, load_episodes
from lrm_reward.bags.importer import EXIT_OK, ImportConfig, import_bags
from lrm_reward.bags.mapping import MappingSpec
from lrm_reward.core.types import Modality
from lrm_reward.refinement.judge import judge_dataset
from lrm_reward.refinement.refine import RefineConfig, refine

TINY_ACT = {
    "dim_model": 32,
    "n_heads": 2,
    "dim_feedforward": 32,
    "n_encoder_layers": 1,
    "n_decoder_layers": 1,
    "n_vae_encoder_layers": 1,
    "latent_dim": 8,
    "chunk_size": 5,
    "n_action_steps": 5,
}


def test_bag_to_import_to_judge_to_refine(tmp_path):
    episodes = [
        EpisodeSpec(task="stack the cups", final_level=230),
        EpisodeSpec(task="stack the cups", final_level=60, success=False),
        EpisodeSpec(task="stack the cups", final_level=220),
    ]
    bag = write_bag(tmp_path / "night_bag", BagSpec(storage="mcap", episodes=episodes, marker="result"))
    mapping = MappingSpec(
        fps=10, cameras={"front": "/camera/image"}, split="marker", marker=MARKER_TOPIC, marker_at="end"
    )
    report = import_bags([bag], ImportConfig(tmp_path / "data" / "night", mapping, image_writer_threads=0))
    assert report.exit_code() == EXIT_OK, report.message

    judged = judge_dataset(report.dataset, BrightnessEngine(), progress_bar=False)
    assert [j.verdict for j in judged.judged] == ["success", "failure", "success"]
    assert [j.recorded_outcome for j in judged.judged] == ["success", "failure", "success"]  # from the marker

    result = refine(
        RefineConfig(
            store_root=tmp_path / "policies",
            policy_name="act_pick",
            datasets=[report.dataset],
            from_scratch=True,
            policy_overrides=TINY_ACT,
            steps=2,
            batch_size=4,
            progress_bar=False,
            report=False,
        )
    )
    assert result.version.version == "v0001" and result.promoted
    assert sorted(r["episode_index"] for r in result.selection.kept) == [0, 2]

    # lrm-train-reward's training samples: success labels from the sidecars the import wrote
    episodes = load_episodes([DatasetSpec(report.dataset)], SampleConfig())
    assert [(e.success, e.label_from, e.length) for e in episodes.episodes] == [
        (True, "sidecar", 20),
        (False, "sidecar", 20),
        (True, "sidecar", 20),
    ]
    assert build_samples(episodes.episodes, Modality.COMPLETION, SampleConfig(), seed=0)
