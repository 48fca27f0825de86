"""The annotated image: the frame stays intact above a panel whose drawing follows the reward."""

import numpy as np
import pytest

from lrm_reward.core.annotation import BAR_FILL, MARGIN, RewardOverlay, annotate_frame


def frame(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)


def bar_fill_fraction(out: np.ndarray, frame_h: int) -> float:
    row = out[frame_h + MARGIN + 2]  # a row inside the progress bar
    filled = np.flatnonzero(np.all(row == np.array(BAR_FILL, dtype=np.uint8), axis=1))
    if filled.size == 0:
        return 0.0
    # The label is drawn over the bar's left end, so measure where the fill stops.
    return float(filled[-1] - MARGIN) / (row.shape[0] - 2 * MARGIN)


def test_small_frames_are_upscaled_and_kept_whole():
    img = frame()
    out = annotate_frame(img, RewardOverlay(task="stack"), min_width=320)
    factor = 320 // 64
    assert out.shape[1] == 64 * factor
    assert np.array_equal(out[: 48 * factor : factor, ::factor], img)


def test_progress_bar_follows_progress():
    img = frame(480, 640)
    fractions = [
        bar_fill_fraction(annotate_frame(img, RewardOverlay(task="t", progress=p)), 480) for p in (0.2, 0.7)
    ]
    assert fractions[0] == pytest.approx(0.2, abs=0.02)
    assert fractions[1] == pytest.approx(0.7, abs=0.02)
    assert bar_fill_fraction(annotate_frame(img, RewardOverlay(task="t")), 480) == 0.0  # NaN: not asked


def test_reasoning_adds_lines_and_completion_changes_pixels():
    img = frame(480, 640)
    plain = annotate_frame(img, RewardOverlay(task="t", progress=0.5))
    reasoned = annotate_frame(img, RewardOverlay(task="t", progress=0.5, reasoning="B is closer. " * 40))
    done = annotate_frame(img, RewardOverlay(task="t", progress=0.5, completed=True))
    assert reasoned.shape[0] > plain.shape[0]
    assert done.shape == plain.shape
    assert not np.array_equal(done, plain)


def test_non_ascii_and_huge_task_do_not_break_drawing():
    out = annotate_frame(frame(), RewardOverlay(task="pick the 🦒 " * 2000, reasoning="ü" * 5000))
    assert out.dtype == np.uint8 and out.ndim == 3


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32)]
)
def test_bad_frames_are_rejected_clearly(bad):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        annotate_frame(bad, RewardOverlay(task="t"))
