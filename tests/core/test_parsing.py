"""Parsing recorded (and malformed) model outputs for the three modalities; nothing may raise."""

import pytest

from lrm_reward.core.parsing import parse_answer
from lrm_reward.core.types import Modality

P, C, K = Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION


@pytest.mark.parametrize(
    "text, value, method",
    [
        ('{ "completion_progress": 0.7 }', 0.7, "json"),
        ('{"completion_progress": 1.0}', 1.0, "json"),
        ('```json\n{ "completion_progress": 0.3 }\n```', 0.3, "json"),
        ('{ "completion_progress": "0.4" }', 0.4, "json"),
        ('{ "completion_progress": "NA" }', 0.0, "json"),
        ('{ "completion_progress": 1.7 }', 1.0, "json"),  # clamped
        ('{ "completion_progress": -0.2 }', 0.0, "json"),  # clamped
        ('{ "completion_progress": 0.65 }', 0.65, "json"),  # off the list: kept, not snapped
        ('Looks halfway. { "completion_progress": 0.5, }', 0.5, "regex"),  # trailing comma: not JSON
        ('"completion_progress": NA', 0.0, "regex"),
        ("{'completion_progress': 0.9}", 0.9, "regex"),  # python-style quotes
        ('{ "completion_progress": 0.2 } then { "completion_progress": 0.8 }', 0.8, "json"),  # last wins
        ('{"answer": {"completion_progress": 0.6}}', 0.6, "json"),  # nested
    ],
)
def test_progress_outputs(text, value, method):
    result = parse_answer(P, text)
    assert result.parsed and result.value == pytest.approx(value)
    assert result.method == method
    assert result.raw_text == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The robot has moved the carrot.",
        '{ "completion_progress": }',
        '{ "completion_progress": true }',
        '{ "completion_progress": "almost" }',
        '{ "progress": 0.5 }',
        '{ "completion_progress": NaN }',
        "{{{{{{{{{{{{",
    ],
)
def test_progress_unparsed(text):
    result = parse_answer(P, text)
    assert not result.parsed and result.value is None
    assert result.error
    assert result.raw_text == text


@pytest.mark.parametrize(
    "text, value, method",
    [
        ('{ "more_complete_image": "ImageB" }', 1.0, "json"),
        ('{"more_complete_image": "ImageA"}', -1.0, "json"),
        (
            "Step 1: In Image A the gripper is open. Step 2: In ImageB the carrot is on the plate.\n"
            '{ "more_complete_image": "ImageB" }',
            1.0,
            "json",
        ),
        ('"more_complete_image": "Image A"', -1.0, "regex"),  # spaced label in the key's value
        ("more_complete_image: ImageB, because", 1.0, "regex"),
        ("ImageB looks closer at first, but on reflection ImageA is further along.", -1.0, "last_occurrence"),
        ('{ "more_complete_image": "selected_value" } ImageB', 1.0, "last_occurrence"),
    ],
)
def test_contrastive_outputs(text, value, method):
    result = parse_answer(C, text)
    assert result.parsed and result.value == value
    assert result.method == method
    assert result.label in ("ImageA", "ImageB")


@pytest.mark.parametrize(
    "text", ["", "Image A and Image B look the same.", '{ "more_complete_image": "both" }']
)
def test_contrastive_unparsed(text):
    result = parse_answer(C, text)
    assert not result.parsed and result.value is None and result.error


@pytest.mark.parametrize(
    "text, value",
    [
        ('{ "task_completed": "yes" }', 1.0),
        ('{ "task_completed": "no" }', 0.0),
        ('{"task_completed": "Yes"}', 1.0),
        ('"task_completed": "no" }', 0.0),  # truncated JSON: regex
        ('{ "task_completed": "yes" or "no" }', 1.0),  # echoed template: regex reads the first word
    ],
)
def test_completion_outputs(text, value):
    result = parse_answer(K, text)
    assert result.parsed and result.value == value


@pytest.mark.parametrize("text", ["", "yes", '{ "task_completed": "maybe" }', '{ "task_completed": true }'])
def test_completion_unparsed(text):
    result = parse_answer(K, text)
    assert not result.parsed and result.value is None and result.error


@pytest.mark.parametrize("modality", [P, C, K])
@pytest.mark.parametrize("text", [None, 42, "\x00\xff" * 50, "{" * 5000 + "}" * 5000, '{"a": ' * 3000])
def test_never_raises_on_garbage(modality, text):
    result = parse_answer(modality, text)
    assert result.parsed in (True, False)
    assert isinstance(result.raw_text, str)
