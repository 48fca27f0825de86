"""Draws the reward on a camera frame for a human watching in rviz2 / rqt_image_view.

The frame is kept whole (scaled up when it is too small to read) and a panel is added below it: a
progress bar, the completion state, the fused reward, query latency, the task, and, when
chain-of-thought is on, the end of the model's last reasoning. Pure numpy + OpenCV; not a GUI and not
part of the reward itself.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import cv2
import numpy as np

FONT = cv2.FONT_HERSHEY_SIMPLEX
FONT_SCALE = 0.45
LINE_HEIGHT = 18  # pixels per text line at FONT_SCALE
MARGIN = 6
BAR_HEIGHT = 16
REASONING_LINES = 3  # the end of the reasoning is the part that holds the answer

# RGB colours (the frame is RGB, OpenCV does not care about channel order)
PANEL = (24, 24, 24)
TEXT = (235, 235, 235)
DIM = (150, 150, 150)
BAR_EMPTY = (70, 70, 70)
BAR_FILL = (66, 135, 245)
DONE = (60, 200, 90)
NOT_DONE = (230, 160, 40)


@dataclass
class RewardOverlay:
    """What the panel shows; NaN means "not asked" and is drawn as n/a."""

    task: str
    progress: float = float("nan")
    completion_prob: float = float("nan")
    completed: bool = False
    reward: float = float("nan")
    held: bool = False
    latency_s: float = 0.0
    episode_id: int = 0
    frame_index: int = 0
    reasoning: str = ""


def _ascii(text: str) -> str:
    # Hershey fonts only have ASCII glyphs; anything else would render as '?' boxes or nothing.
    return "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text.replace("\n", " "))


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _chars_per_line(width: int) -> int:
    # Hershey glyphs are proportional: size the line by an ordinary sentence's mean glyph width.
    sample = "put the red block on the green target, ImageB 0.5"
    (sample_w, _), _ = cv2.getTextSize(sample, FONT, FONT_SCALE, 1)
    return max(8, int((width - 2 * MARGIN) * len(sample) / max(sample_w, 1)))


def _fit(text: str, width: int) -> str:
    limit = _chars_per_line(width)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def annotate_frame(rgb: np.ndarray, overlay: RewardOverlay, min_width: int = 480) -> np.ndarray:
    """Return a new HxWx3 uint8 image: the frame (upscaled to min_width if narrower) above a text panel."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"annotate_frame wants a non-empty HxWx3 uint8 image, got {rgb.shape} {rgb.dtype}")
    frame = rgb
    if frame.shape[1] < min_width:
        factor = math.ceil(min_width / frame.shape[1])
        frame = cv2.resize(frame, None, fx=factor, fy=factor, interpolation=cv2.INTER_NEAREST)
    width = frame.shape[1]

    reasoning_lines: list[str] = []
    if overlay.reasoning.strip():
        wrapped = textwrap.wrap(_ascii(overlay.reasoning.strip()), _chars_per_line(width))
        reasoning_lines = wrapped[-REASONING_LINES:]
    text_lines = 3 + len(reasoning_lines)
    panel_h = MARGIN + BAR_HEIGHT + MARGIN + text_lines * LINE_HEIGHT + MARGIN
    panel = np.full((panel_h, width, 3), PANEL, dtype=np.uint8)

    # Progress bar with its value written inside.
    x0, y0, x1, y1 = MARGIN, MARGIN, width - MARGIN, MARGIN + BAR_HEIGHT
    cv2.rectangle(panel, (x0, y0), (x1, y1), BAR_EMPTY, thickness=-1)
    progress = overlay.progress
    if not math.isnan(progress):
        fill = x0 + round((x1 - x0) * min(max(progress, 0.0), 1.0))
        if fill > x0:
            cv2.rectangle(panel, (x0, y0), (fill, y1), BAR_FILL, thickness=-1)
    cv2.putText(panel, f"progress {_fmt(progress)}", (x0 + 4, y1 - 4), FONT, FONT_SCALE, TEXT, 1, cv2.LINE_AA)

    # Status lines: completion state and reward; held/scored, latency, episode and frame.
    y = y1 + MARGIN + LINE_HEIGHT - 4
    state = "DONE" if overlay.completed else "not done"
    cv2.putText(
        panel, state, (MARGIN, y), FONT, FONT_SCALE, DONE if overlay.completed else NOT_DONE, 1, cv2.LINE_AA
    )
    (state_w, _), _ = cv2.getTextSize(state, FONT, FONT_SCALE, 1)
    status = f"  p(done) {_fmt(overlay.completion_prob)}   reward {_fmt(overlay.reward)}"
    cv2.putText(
        panel, _fit(status, width - state_w), (MARGIN + state_w, y), FONT, FONT_SCALE, TEXT, 1, cv2.LINE_AA
    )
    y += LINE_HEIGHT
    timing = (
        f"{'held' if overlay.held else 'scored'}   model {overlay.latency_s * 1000:.0f} ms   "
        f"episode {overlay.episode_id}  frame {overlay.frame_index}"
    )
    cv2.putText(panel, _fit(timing, width), (MARGIN, y), FONT, FONT_SCALE, DIM, 1, cv2.LINE_AA)

    y += LINE_HEIGHT
    cv2.putText(
        panel,
        _fit(f"task: {_ascii(overlay.task)}", width),
        (MARGIN, y),
        FONT,
        FONT_SCALE,
        TEXT,
        1,
        cv2.LINE_AA,
    )
    for line in reasoning_lines:
        y += LINE_HEIGHT
        cv2.putText(panel, line, (MARGIN, y), FONT, FONT_SCALE, DIM, 1, cv2.LINE_AA)

    return np.ascontiguousarray(np.concatenate([frame, panel], axis=0))
