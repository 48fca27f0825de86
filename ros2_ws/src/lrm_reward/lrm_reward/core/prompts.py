"""The LRM prompt templates, answer prefixes and closed answer sets (arXiv 2603.16065).

What this is for: reproducing, character for character, the user messages the three released LoRA
adapters (progress / contrastive / completion) were trained on, and turning a filled template into the
chat-message structure the Qwen3-VL processor expects (text parts with image parts at each ``<image>``).
It also names the JSON answer prefixes and the allowed answer values that the logits readout scores.

What it is not: no tokenization, no model, no parsing of answers (see ``parsing.py``). Pure Python.

Placeholders: ``{task}`` (the task text) and ``<image>`` (where an image goes). The templates contain
literal JSON braces, so they are filled with ``str.replace``, never ``str.format``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lrm_reward.core.types import Modality

TASK_PLACEHOLDER = "{task}"
IMAGE_PLACEHOLDER = "<image>"

# --- progress: images [initial, current] -------------------------------------------------------------
PROGRESS_PROMPT = """Task: Estimate the completion progress.
The task is: {task}
You are given:
- Initial observation: <image>
- Current observation: <image>

Question: Based on the task description, estimate the completion progress as a value between 0.0 and 1.0.
Select one value from the following list:
[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

Definitions:
- 0.0: Task has just started.
- 0.1 - 0.9: Intermediate progress steps (assess how close to completion).
- 1.0: Task is Finished.
Output your answer in the following JSON format:
{ "completion_progress": selected_value }"""

# Same, without an initial frame: the "- Initial observation" line is left out.
PROGRESS_PROMPT_NO_INITIAL = """Task: Estimate the completion progress.
The task is: {task}
You are given:
- Current observation: <image>

Question: Based on the task description, estimate the completion progress as a value between 0.0 and 1.0.
Select one value from the following list:
[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

Definitions:
- 0.0: Task has just started.
- 0.1 - 0.9: Intermediate progress steps (assess how close to completion).
- 1.0: Task is Finished.
Output your answer in the following JSON format:
{ "completion_progress": selected_value }"""

# Goal-image variant: images [goal, current]. Reconstructed from the interface notes (the goal line comes
# first, the question compares with the goal, and 0.1-0.9 means visual distance to the goal); the engine
# does not use it by default.
PROGRESS_PROMPT_GOAL = """Task: Estimate the completion progress.
The task is: {task}
You are given:
- Goal Standard: <image>
- Current observation: <image>

Question: Compare the Current Observation with the Goal Standard and estimate the completion progress as a value between 0.0 and 1.0.
Select one value from the following list:
[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

Definitions:
- 0.0: Task has just started.
- 0.1 - 0.9: Intermediate progress steps (assess visual distance to Goal).
- 1.0: Task is Finished.
Output your answer in the following JSON format:
{ "completion_progress": selected_value }"""  # noqa: E501

# --- contrastive: images [A = frame of the previous query, B = current frame] -------------------------
# Both lines say "Later observation" in the released code; it is what was trained, so it stays.
CONTRASTIVE_PROMPT = """Task: Compare the completion progress.

The task is: {task}.

You are given:
- Later observation (Image A): <image>
- Later observation (Image B): <image>

Question: Which of Image A or Image B is closer to completing the task?
Select one value from the following list:
["ImageA", "ImageB"]

Please provide a step-by-step visual analysis first, and then output your answer in the following JSON format:
{ "more_complete_image": "selected_value" }"""

# --- completion: images [current] -------------------------------------------------------------------
COMPLETION_PROMPT = """Task: Whether the task has been completed.

The task is: {task}

You are given:
- Current observation: <image>

Has the task been completed?
Output your answer in the following JSON format:
{ "task_completed": "yes" or "no" }"""

# --- answers ------------------------------------------------------------------------------------------
# The fixed start of each JSON answer. The logits readout feeds prompt + prefix and scores what follows;
# the generate readout without chain-of-thought starts the contrastive answer with it.
PROGRESS_ANSWER_PREFIX = '{ "completion_progress": '
CONTRASTIVE_ANSWER_PREFIX = '{ "more_complete_image": "'
COMPLETION_ANSWER_PREFIX = '{ "task_completed": "'

# Closed answer sets, as text, with the numeric value each one stands for.
PROGRESS_ANSWERS: dict[str, float] = {f"{i / 10:.1f}": i / 10 for i in range(11)}
CONTRASTIVE_ANSWERS: dict[str, float] = {"ImageA": -1.0, "ImageB": 1.0}
COMPLETION_ANSWERS: dict[str, float] = {"yes": 1.0, "no": 0.0}

# Tokens the chat template would interpret; a task containing them could forge turns or image slots.
_SPECIAL_TOKEN_RE = re.compile(r"<\|[A-Za-z_]+\|>")


@dataclass(frozen=True)
class PromptSpec:
    """One modality's template plus what its answer looks like."""

    modality: Modality
    answer_prefix: str
    answers: dict[str, float]
    strip_segments: bool  # completion strips each text segment around images; the others keep them as is


PROMPT_SPECS: dict[Modality, PromptSpec] = {
    Modality.PROGRESS: PromptSpec(Modality.PROGRESS, PROGRESS_ANSWER_PREFIX, PROGRESS_ANSWERS, False),
    Modality.CONTRASTIVE: PromptSpec(
        Modality.CONTRASTIVE, CONTRASTIVE_ANSWER_PREFIX, CONTRASTIVE_ANSWERS, False
    ),
    Modality.COMPLETION: PromptSpec(Modality.COMPLETION, COMPLETION_ANSWER_PREFIX, COMPLETION_ANSWERS, True),
}


class PromptError(ValueError):
    """A template or task text that cannot make a valid prompt."""


def check_template(template: str, n_images: int) -> None:
    """Raise PromptError unless template has exactly one {task} and n_images <image> placeholders."""
    if template.count(TASK_PLACEHOLDER) != 1:
        raise PromptError(f"template must contain {TASK_PLACEHOLDER!r} exactly once")
    found = template.count(IMAGE_PLACEHOLDER)
    if found != n_images:
        raise PromptError(f"template has {found} {IMAGE_PLACEHOLDER!r} placeholders, expected {n_images}")


def check_task(task: str, max_chars: int = 2000) -> str:
    """Return the task text stripped, or raise PromptError when it cannot go into a prompt."""
    if not isinstance(task, str):
        raise PromptError(f"task must be a string, got {type(task).__name__}")
    text = task.strip()
    if not text:
        raise PromptError("task text is empty")
    if len(text) > max_chars:
        raise PromptError(f"task text is {len(text)} characters, more than the limit of {max_chars}")
    if IMAGE_PLACEHOLDER in text:
        raise PromptError(f"task text must not contain {IMAGE_PLACEHOLDER!r}")
    if _SPECIAL_TOKEN_RE.search(text):
        raise PromptError("task text must not contain chat special tokens like <|im_end|>")
    return text


def template_for(modality: Modality, n_images: int) -> str:
    """The template for a modality given how many images the query carries."""
    if modality is Modality.PROGRESS:
        if n_images == 2:
            return PROGRESS_PROMPT
        if n_images == 1:
            return PROGRESS_PROMPT_NO_INITIAL
        raise PromptError(f"progress takes 1 image (current) or 2 (initial, current), got {n_images}")
    if modality is Modality.CONTRASTIVE:
        if n_images != 2:
            raise PromptError(f"contrastive takes 2 images (A = previous query, B = current), got {n_images}")
        return CONTRASTIVE_PROMPT
    if modality is Modality.COMPLETION:
        if n_images != 1:
            raise PromptError(f"completion takes 1 image (current), got {n_images}")
        return COMPLETION_PROMPT
    raise PromptError(f"unknown modality {modality!r}")


def fill_template(template: str, task: str) -> str:
    """Put the task text into a template (no str.format: the templates hold literal JSON braces)."""
    if template.count(TASK_PLACEHOLDER) != 1:
        raise PromptError(f"template must contain {TASK_PLACEHOLDER!r} exactly once")
    return template.replace(TASK_PLACEHOLDER, task)


def split_at_images(text: str, strip_segments: bool) -> list[dict]:
    """The content parts of one user message: text split at <image>, an image part between segments.

    Blank segments are dropped; strip_segments (completion) strips each kept segment.
    """
    segments = text.split(IMAGE_PLACEHOLDER)
    parts: list[dict] = []
    for index, segment in enumerate(segments):
        if segment.strip():
            parts.append({"type": "text", "text": segment.strip() if strip_segments else segment})
        if index < len(segments) - 1:
            parts.append({"type": "image"})
    return parts


def build_messages(modality: Modality, task: str, n_images: int, max_task_chars: int = 2000) -> list[dict]:
    """The chat messages (one user turn) for a query; raises PromptError on a bad task or image count."""
    spec = PROMPT_SPECS[modality]
    template = template_for(modality, n_images)
    text = fill_template(template, check_task(task, max_task_chars))
    return [{"role": "user", "content": split_at_images(text, spec.strip_segments)}]


def _check_all_templates() -> None:
    for template, n in (
        (PROGRESS_PROMPT, 2),
        (PROGRESS_PROMPT_NO_INITIAL, 1),
        (PROGRESS_PROMPT_GOAL, 2),
        (CONTRASTIVE_PROMPT, 2),
        (COMPLETION_PROMPT, 1),
    ):
        check_template(template, n)


_check_all_templates()
