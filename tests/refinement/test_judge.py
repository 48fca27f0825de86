"""Judge: per-episode verdicts from the reward engine, written next to the dataset; idempotent, resumable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from judged_data import BrightnessEngine, record

from lrm_reward.refinement.data_root import OutsideDataRootError, resolve_inside
from lrm_reward.refinement.judge import (
    DatasetNotFoundError,
    JudgeBusyError,
    JudgeConfig,
    _judge_lock,
    decide,
    judge_dataset,
    judgment_path,
    load_judgments,
    parse_adapters,
)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    record(root, "night", [("stack the cups", 220.0), ("stack the cups", 60.0), ("open the drawer", 230.0)])
    return root


@pytest.fixture
def dataset(recorded, tmp_path) -> Path:
    shutil.copytree(recorded, tmp_path / "data")
    return tmp_path / "data" / "night"


def test_decide():
    cfg = JudgeConfig(success_threshold=0.6)
    verdict, conf, comp, final, parsed = decide([0.9, 0.7], [0.1, 0.5, 0.95], cfg)
    assert verdict == "success" and comp == pytest.approx(0.8) and final == 0.95 and parsed == 1.0
    assert conf == pytest.approx(0.8)
    assert decide([0.2, 0.4], [0.1, 0.2], cfg)[0] == "failure"
    assert decide([0.9, None], [None, None], cfg)[0] == "unsure"  # 1 of 4 parsed
    strict = JudgeConfig(success_threshold=0.6, progress_threshold=0.99)
    assert decide([0.9, 0.7], [0.1, 0.95], strict)[0] == "failure"


def test_decide_lets_progress_alone_call_a_success_when_asked():
    either = JudgeConfig(success_threshold=0.6, progress_success_threshold=0.95)
    verdict, conf, comp, final, _ = decide([0.1, 0.2], [0.1, 0.5, 0.97], either)
    assert final == 0.97
    assert verdict == "success" and comp == pytest.approx(0.15) and conf == pytest.approx(0.97)
    assert decide([0.1, 0.2], [0.1, 0.5, 0.97], JudgeConfig(success_threshold=0.6))[0] == "failure"
    assert decide([0.1, 0.2], [0.1, 0.9], either)[0] == "failure"  # neither adapter says done
    assert decide([0.9, 0.7], [0.1, 0.2], either)[0] == "success"  # completion alone still does
    assert decide([0.1, None], [None, None, 0.99], either)[0] == "unsure"  # 2 of 5 parsed
    vetoed = JudgeConfig(success_threshold=0.6, progress_threshold=0.99, progress_success_threshold=0.95)
    assert decide([0.1], [0.1, 0.97], vetoed)[0] == "failure"
    assert either.thresholds()["progress_success_threshold"] == 0.95
    with pytest.raises(ValueError, match="progress_success_threshold"):
        JudgeConfig(progress_success_threshold=0.0)


def test_judges_each_episode_and_writes_judgments(dataset):
    engine = BrightnessEngine()
    res = judge_dataset(
        dataset, engine, JudgeConfig(completion_last_n=3, curve_every_k=5), progress_bar=False
    )
    assert [j.episode_index for j in res.judged] == [0, 1, 2]
    assert [j.verdict for j in res.judged] == ["success", "failure", "success"]
    stored = json.loads(judgment_path(dataset, 0).read_text())
    n = stored["num_frames"]
    assert n == 40 // 2  # 20 Hz camera, 10 fps dataset, 2 s
    assert stored["curve_frame_indices"] == [0, 5, 10, 15, n - 1]
    assert stored["completion_frame_indices"] == [n - 3, n - 2, n - 1]
    assert stored["model_id"] == "brightness-test-engine"
    assert stored["thresholds"]["curve_every_k"] == 5
    assert stored["task"] == "stack the cups" and stored["recorded_outcome"] == "unknown"
    curve = stored["progress_curve"]
    assert curve == sorted(curve) and curve[-1] == pytest.approx(1.0, abs=0.05)  # 220/200 clipped
    assert stored["completion_prob"] > 0.9 and stored["confidence"] > 0.9
    assert load_judgments(dataset)[1].success is False
    assert engine.queries == 3 * (5 + 3)


def test_judging_is_idempotent_and_resumable(dataset):
    judge_dataset(dataset, BrightnessEngine(), progress_bar=False)
    again = BrightnessEngine()
    res = judge_dataset(dataset, again, progress_bar=False)
    assert res.judged == [] and res.skipped == [0, 1, 2] and again.queries == 0
    judgment_path(dataset, 1).unlink()  # as if the run was killed before episode 1
    resumed = judge_dataset(dataset, BrightnessEngine(), progress_bar=False)
    assert [j.episode_index for j in resumed.judged] == [1]
    forced = judge_dataset(dataset, BrightnessEngine(), episodes=[2], force=True, progress_bar=False)
    assert [j.episode_index for j in forced.judged] == [2]


def test_unparsed_answers_give_unsure(dataset):
    res = judge_dataset(dataset, BrightnessEngine(parse=False), episodes=[0], progress_bar=False)
    j = res.judged[0]
    assert j.verdict == "unsure" and not j.success and j.confidence == 0.0
    assert j.errors == ["no JSON in output"]


def test_bad_requests_are_refused(dataset, tmp_path):
    data_root = dataset.parent
    with pytest.raises(OutsideDataRootError):
        judge_dataset(tmp_path / "elsewhere", BrightnessEngine(), data_root=data_root)
    with pytest.raises(OutsideDataRootError):
        judge_dataset("../../etc", BrightnessEngine(), data_root=data_root)
    (data_root / "escape").symlink_to(tmp_path)
    with pytest.raises(OutsideDataRootError):
        judge_dataset("escape", BrightnessEngine(), data_root=data_root)
    with pytest.raises(DatasetNotFoundError):
        judge_dataset("missing", BrightnessEngine(), data_root=data_root)
    with pytest.raises(IndexError, match=r"episodes 0\.\.2"):
        judge_dataset("night", BrightnessEngine(), episodes=[7], data_root=data_root, progress_bar=False)
    assert resolve_inside(data_root, "night") == dataset.resolve()
    with _judge_lock(dataset), pytest.raises(JudgeBusyError):
        judge_dataset(dataset, BrightnessEngine(), progress_bar=False)


def test_parse_adapters(tmp_path):
    assert parse_adapters("progress=/a, completion=/b") == {"progress": "/a", "completion": "/b"}
    (tmp_path / "progress").mkdir()
    (tmp_path / "completion").mkdir()
    assert parse_adapters(str(tmp_path)) == {
        "progress": str(tmp_path / "progress"),
        "completion": str(tmp_path / "completion"),
    }
    with pytest.raises(ValueError, match="unknown adapter"):
        parse_adapters("reward=/x")


def test_tiny_reward_model_judges_through_the_cli(dataset, tiny_lrm, capsys):
    """End to end with a real (tiny) Qwen3-VL + LRM adapters: lrm-judge writes a judgment per episode."""
    from lrm_reward.refinement.judge_cli import main

    adapters = ",".join(f"{name}={path}" for name, path in tiny_lrm.adapters.items() if name != "contrastive")
    argv = [str(dataset), "--model", str(tiny_lrm.base), "--adapters", adapters, "--every-k", "10", "--quiet"]
    from lrm_reward.core.engine import EngineConfig

    chosen = {name: str(path) for name, path in tiny_lrm.adapters.items() if name != "contrastive"}
    model_id = EngineConfig(base_model=str(tiny_lrm.base), adapters=chosen).describe()
    assert main([*argv, "--episodes", "0,1"]) == 0
    judgments = load_judgments(dataset)
    assert sorted(judgments) == [0, 1]
    for j in judgments.values():
        assert j.verdict in ("success", "failure", "unsure")
        assert j.success == (j.verdict == "success")
        assert j.model_id == model_id
        assert j.curve_frame_indices == [0, 10, 19]
        assert len(j.progress_curve) == 3 and len(j.completion_probs) == 3
        parsed = [p for p in j.completion_probs if p == p]
        assert all(0.0 <= p <= 1.0 for p in parsed)
        assert 0.0 <= j.confidence <= 1.0
    out = capsys.readouterr().out
    assert "judged 2" in out
    assert "no operator labels to check the judge against" in out  # recorded without outcome labels
    # idempotent from the CLI too
    assert main(argv) == 0
    assert "judged 1" in capsys.readouterr().out  # only episode 2 was left
    assert main([*argv, "--data-root", str(dataset.parent.parent / "nowhere")]) == 1


def test_cli_averages_a_second_adapter_set_on_the_same_base(dataset, tiny_lrm, tmp_path, capsys):
    """--adapters given twice: one base, each modality's answers averaged over the two sets."""
    from lrm_reward.core import tiny_model
    from lrm_reward.core.types import Modality
    from lrm_reward.refinement.judge_cli import main

    second = {
        m.value: tiny_model.save_random_adapter(tiny_lrm.base, tmp_path / m.value, m, seed=700 + i, b_std=0.1)
        for i, m in enumerate((Modality.PROGRESS, Modality.COMPLETION))
    }
    first_spec = ",".join(f"{m}={tiny_lrm.adapters[m]}" for m in ("progress", "completion"))
    second_spec = ",".join(f"{m}={path}" for m, path in second.items())
    argv = [str(dataset), "--model", str(tiny_lrm.base), "--every-k", "10", "--episodes", "0", "--force"]
    argv += ["--quiet", "--last-n", "2"]

    def judged(*specs: str):
        assert main([*argv, *(a for s in specs for a in ("--adapters", s))]) == 0
        return load_judgments(dataset)[0]

    one, two, both = judged(first_spec), judged(second_spec), judged(first_spec, second_spec)
    assert "completion#2=" in both.model_id and "progress#2=" in both.model_id
    assert max(abs(a - b) for a, b in zip(one.progress_curve, two.progress_curve, strict=True)) > 0.01
    for name in ("progress_curve", "completion_probs"):
        mean = [(a + b) / 2 for a, b in zip(getattr(one, name), getattr(two, name), strict=True)]
        assert getattr(both, name) == pytest.approx(mean, abs=1e-4)
    capsys.readouterr()
    # the node judges with its one loaded model: a second set is refused before anything is asked
    two_sets = ["--adapters", first_spec, "--adapters", second_spec]
    assert main([str(dataset), "--via-node", "/reward_node", *two_sets]) == 2
    assert "(--model) only" in capsys.readouterr().err
    # sets of different modalities would leave one modality unaveraged: refused by name
    assert main([*argv, "--adapters", first_spec, "--adapters", f"completion={second['completion']}"]) == 2
    assert "set 2 has ['completion'], set 1 has ['completion', 'progress']" in capsys.readouterr().err
