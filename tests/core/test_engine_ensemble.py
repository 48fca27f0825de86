"""Several adapters per modality on one base ('completion#2'): the engine averages their answers."""

import numpy as np
import pytest

from lrm_reward.core import tiny_model
from lrm_reward.core.engine import EngineConfig, average_answers, make_engine
from lrm_reward.core.engine_config import ensemble_names
from lrm_reward.core.types import Answer, Modality, Query

P, K = Modality.PROGRESS, Modality.COMPLETION
TASK = "put the cube on the target"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def second_set(tiny_lrm, tmp_path_factory) -> dict[str, str]:
    """Another progress + completion adapter for the same tiny base (other random LoRA weights, moved further
    from the base than the default so that the two sets disagree by more than the tolerance below)."""
    root = tmp_path_factory.mktemp("second_set")
    return {
        m.value: str(
            tiny_model.save_random_adapter(tiny_lrm.base, root / m.value, m, seed=900 + i, b_std=0.1)
        )
        for i, m in enumerate((P, K))
    }


def _queries() -> list[Query]:
    rng = np.random.default_rng(3)
    frame = tiny_model.synthetic_frame
    out = []
    for level in (0.0, 0.3, 0.6, 1.0):
        out.append(Query(P, TASK, [frame(0.0, rng, (64, 64)), frame(level, rng, (64, 64))]))
        out.append(Query(K, TASK, [frame(level, rng, (64, 64))]))
    return out


def _answers(base: str, adapters: dict[str, str], fast_path: bool) -> list[Answer]:
    with make_engine(EngineConfig(base, adapters, fast_path=fast_path)) as engine:
        return engine.score(_queries())


@pytest.mark.parametrize("fast_path", [True, False])
def test_averaged_adapters_answer_the_mean_of_each_alone(tiny_lrm, second_set, fast_path):
    base = str(tiny_lrm.base)
    first = {m.value: str(tiny_lrm.adapters[m.value]) for m in (P, K)}
    one = _answers(base, first, fast_path)
    two = _answers(base, second_set, fast_path)
    both = _answers(base, ensemble_names([first, second_set]), fast_path)
    assert all(a.parsed for a in one + two + both)
    # the second set answers differently, so the mean is not either one's answer
    assert max(abs(a.value - b.value) for a, b in zip(one, two, strict=True)) > 0.01
    for a, b, mean in zip(one, two, both, strict=True):
        assert mean.modality is a.modality
        assert mean.value == pytest.approx((a.value + b.value) / 2, abs=1e-4)
        for key, p in mean.probabilities.items():
            assert p == pytest.approx((a.probabilities[key] + b.probabilities[key]) / 2, abs=1e-4)


def test_engine_names_the_averaged_adapters(tiny_lrm, second_set):
    first = {K.value: str(tiny_lrm.adapters[K.value])}
    adapters = ensemble_names([first, {K.value: second_set[K.value]}])
    assert adapters == {"completion": first["completion"], "completion#2": second_set["completion"]}
    with make_engine(EngineConfig(str(tiny_lrm.base), adapters)) as engine:
        assert engine.adapter_names == ["completion", "completion#2"]
        assert "completion#2=" in engine.model_id
        progress = engine.score([_queries()[0]])[0]
    assert not progress.parsed and "no 'progress' adapter" in progress.error


def test_a_failed_member_makes_the_average_unparsed():
    good = Answer(K, 0.8, True, 0.8, {"yes": 0.8, "no": 0.2})
    other = Answer(K, 0.4, True, 0.6, {"yes": 0.4, "no": 0.6})
    mean = average_answers([good, other])
    assert mean.parsed and mean.value == pytest.approx(0.6) and mean.error is None
    assert mean.probabilities == pytest.approx({"yes": 0.6, "no": 0.4})
    assert mean.confidence == pytest.approx(0.6)
    # one member's answer alone is not the ensemble's: no value, and the member's error says why
    bad = Answer(K, None, False, error="CUDA out of memory at batch size 1")
    partial = average_answers([good, other, bad])
    assert not partial.parsed and partial.value is None
    assert partial.error.startswith("1 of 3 averaged adapters failed") and "out of memory" in partial.error
    assert average_answers([good]) is good


@pytest.mark.parametrize(
    "adapters, message",
    [
        ({"completion#2": "b"}, "'completion', which is not given"),
        ({"completion": "a", "completion#1": "b"}, "not a modality"),
        ({"completion": "a", "completion#x": "b"}, "not a modality"),
        ({"reward": "a", "reward#2": "b"}, "not a modality"),
        ({"completion": "a", "completion#2\n": "b"}, "not a modality"),
    ],
)
def test_bad_ensemble_names_are_refused(adapters, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig("some/model", adapters)


def test_vllm_backend_refuses_averaging():
    with pytest.raises(ValueError, match="in-process only"):
        EngineConfig(
            "some/model",
            {"completion": "a", "completion#2": "b"},
            backend="vllm",
            server_url="http://127.0.0.1:8000",
        )
