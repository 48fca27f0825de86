"""Reading a value out of the text an LRM adapter generated (arXiv 2603.16065 answer formats).

What this is for: the generate readout. Each modality answers with a small JSON object; the rules follow
the authors' parser: the JSON object first, then a regular expression on the key, then (contrastive only)
whichever of "ImageA"/"ImageB" occurs last. Progress "NA" means 0.0 and values are clamped to [0, 1].

What it is not: no model, no scoring of probabilities (the logits readout never produces text).
Never raises: a text that yields no value comes back as ParseResult(parsed=False) with the raw text kept.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from lrm_reward.core.types import Modality

PROGRESS_KEY = "completion_progress"
CONTRASTIVE_KEY = "more_complete_image"
COMPLETION_KEY = "task_completed"

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_Q = "[\"']?"  # optional double or single quote around keys and values
_PROGRESS_RE = re.compile(rf"{_Q}{PROGRESS_KEY}{_Q}\s*:\s*{_Q}\s*((?-i:NA)\b|{_NUMBER})", re.IGNORECASE)
_CONTRASTIVE_RE = re.compile(rf"{_Q}{CONTRASTIVE_KEY}{_Q}\s*:\s*{_Q}\s*(Image\s?[AB])\b", re.IGNORECASE)
_COMPLETION_RE = re.compile(rf"{_Q}{COMPLETION_KEY}{_Q}\s*:\s*{_Q}\s*(yes|no)\b", re.IGNORECASE)
_IMAGE_LABEL_RE = re.compile(r"Image([AB])\b")  # exact tokens only: prose says "Image A" freely


@dataclass(frozen=True)
class ParseResult:
    """What a generated text says. value is None exactly when parsed is False."""

    value: float | None
    parsed: bool
    raw_text: str
    label: str | None = None  # the answer as text: "0.3", "ImageB", "yes" (None when unparsed)
    method: str | None = None  # "json", "regex" or "last_occurrence"
    error: str | None = None


def parse_answer(modality: Modality, text: str) -> ParseResult:
    """Dispatch to the parser of one modality; any surprise becomes an unparsed result."""
    raw = text if isinstance(text, str) else repr(text)
    try:
        if modality is Modality.PROGRESS:
            return parse_progress(raw)
        if modality is Modality.CONTRASTIVE:
            return parse_contrastive(raw)
        if modality is Modality.COMPLETION:
            return parse_completion(raw)
        return _unparsed(raw, f"unknown modality {modality!r}")
    except Exception as exc:  # parsing must never take the caller down
        return _unparsed(raw, f"parser error: {type(exc).__name__}: {exc}")


def parse_progress(text: str) -> ParseResult:
    """JSON completion_progress, "NA" -> 0.0, then a regex; clamp to [0, 1]."""
    for obj in reversed(_json_objects(text)):
        if PROGRESS_KEY in obj:
            value = _progress_value(obj[PROGRESS_KEY])
            if value is not None:
                return _parsed(text, value, "json")
    matches = _PROGRESS_RE.findall(text)
    for token in reversed(matches):
        value = _progress_value(token)
        if value is not None:
            return _parsed(text, value, "regex")
    return _unparsed(text, f'no "{PROGRESS_KEY}" value found')


def parse_contrastive(text: str) -> ParseResult:
    """JSON more_complete_image, then a regex, then the last ImageA/ImageB; +1 for B, -1 for A."""
    for obj in reversed(_json_objects(text)):
        label = _image_label(obj.get(CONTRASTIVE_KEY))
        if label is not None:
            return _contrastive(text, label, "json")
    matches = _CONTRASTIVE_RE.findall(text)
    if matches:
        label = _image_label(matches[-1])
        if label is not None:
            return _contrastive(text, label, "regex")
    labels = _IMAGE_LABEL_RE.findall(text)
    if labels:
        return _contrastive(text, "Image" + labels[-1], "last_occurrence")
    return _unparsed(text, "neither ImageA nor ImageB found")


def parse_completion(text: str) -> ParseResult:
    """task_completed "yes" / "no" -> 1.0 / 0.0, from JSON, then a regex."""
    for obj in reversed(_json_objects(text)):
        answer = obj.get(COMPLETION_KEY)
        if isinstance(answer, str) and answer.strip().lower() in ("yes", "no"):
            label = answer.strip().lower()
            return ParseResult(1.0 if label == "yes" else 0.0, True, text, label, "json")
    matches = _COMPLETION_RE.findall(text)
    if matches:
        label = matches[-1].lower()
        return ParseResult(1.0 if label == "yes" else 0.0, True, text, label, "regex")
    return _unparsed(text, f'no "{COMPLETION_KEY}": "yes"/"no" found')


def _json_objects(text: str) -> list[dict]:
    """Every JSON object that decodes at some '{' in the text, in order of appearance."""
    decoder = json.JSONDecoder()
    found: list[dict] = []
    index = text.find("{")
    while index != -1:
        try:
            obj, end = decoder.raw_decode(text, index)
        except (json.JSONDecodeError, RecursionError):
            index = text.find("{", index + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
            # nested objects matter too: the answer may sit inside a wrapper object
            found.extend(_nested_objects(obj))
        index = text.find("{", end)
    return found


def _nested_objects(obj: dict) -> list[dict]:
    nested: list[dict] = []
    for value in obj.values():
        if isinstance(value, dict):
            nested.append(value)
            nested.extend(_nested_objects(value))
    return nested


def _progress_value(raw: object) -> float | None:
    if isinstance(raw, bool):  # bool is an int subclass: true/false is not a progress value
        return None
    if isinstance(raw, str):
        token = raw.strip()
        if token.upper() == "NA":
            return 0.0
        try:
            value = float(token)
        except ValueError:
            return None
    elif isinstance(raw, (int, float)):
        value = float(raw)
    else:
        return None
    if not math.isfinite(value):
        return None
    return min(1.0, max(0.0, value))


def _image_label(raw: object) -> str | None:
    if not isinstance(raw, str):
        return None
    match = re.fullmatch(r"\s*Image\s?([AB])\s*", raw, re.IGNORECASE)
    return "Image" + match.group(1).upper() if match else None


def _parsed(text: str, value: float, method: str) -> ParseResult:
    # label in the answer-set spelling ("0.3") when the value is on the list, else as written
    label = f"{value:.1f}" if float(f"{value:.1f}") == value else repr(value)
    return ParseResult(value, True, text, label, method)


def _contrastive(text: str, label: str, method: str) -> ParseResult:
    return ParseResult(1.0 if label == "ImageB" else -1.0, True, text, label, method)


def _unparsed(text: str, error: str) -> ParseResult:
    return ParseResult(None, False, text, None, None, error)
