"""The demo's judge stage: lrm-judge on a round's recording, compared with the simulator's ground truth.

Apart from reward_model.py because that file is part of the reward model's cache key: a change to how the
demo judges must not retrain the reward model.
"""

from __future__ import annotations

from pathlib import Path

from lrm_demo.common import DemoError, DemoSettings

# The judge asks "done?" of the final frame only: the simulator's end-of-episode home move
# (SceneConfig.end_retreat_steps) leaves the cube in view where the episode put it, while the frames before
# it show the jaws around the cube at the moment of release, which no camera tells from still holding.
JUDGE_LAST_N = 1


def judge(s: DemoSettings, reward_model: dict, roll: dict) -> dict:
    from lrm_reward.refinement import judge as J
    from lrm_reward.refinement import judge_cli

    # one adapters folder, or several on the same base whose answers lrm-judge averages
    folders = reward_model["adapters"]
    argv = [roll["dataset"], "--model", reward_model["base"], "--device", s.device]
    for adapters in [folders] if isinstance(folders, str | Path) else folders:
        argv += ["--adapters", ",".join(f"{m}={Path(adapters) / m}" for m in ("progress", "completion"))]
    argv += ["--every-k", "5", "--success-threshold", str(s.judge_threshold), "--force"]
    argv += ["--last-n", str(JUDGE_LAST_N)]
    # runs recorded before the setting existed judged by completion alone
    progress_success = getattr(s, "judge_progress_success", None)
    if progress_success is not None:
        argv += ["--progress-success-threshold", str(progress_success)]
    code = judge_cli.main(argv)
    if code != 0:
        raise DemoError(f"lrm-judge failed (exit {code})")
    judgments = J.load_judgments(Path(roll["dataset"]))
    rows, matrix = [], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for ep in roll["episodes"]:
        j = judgments.get(ep["episode_index"])
        if j is None:
            continue
        key = ("t" if j.success == ep["success"] else "f") + ("p" if j.success else "n")
        matrix[key] += 1
        rows.append(
            {
                **ep,
                "judged_success": bool(j.success),
                "verdict": j.verdict,
                "confidence": float(j.confidence),
                "completion_prob": float(j.completion_prob),
                "final_progress": float(j.final_progress),
                "curve_frames": [int(i) for i in j.curve_frame_indices],
                "curve": [float(v) for v in j.progress_curve],
                "model_id": j.model_id,
                # VOC (GVL's value-order correlation): does progress rise with time in a success?
                "voc": _voc(j.curve_frame_indices, j.progress_curve) if ep["success"] else None,
            }
        )
    n = sum(matrix.values())
    vocs = [row["voc"] for row in rows if row["voc"] is not None]
    return {
        "rows": rows,
        "matrix": matrix,
        "accuracy": (matrix["tp"] + matrix["tn"]) / n if n else None,
        "recall_success": _ratio(matrix["tp"], matrix["tp"] + matrix["fn"]),
        "recall_failure": _ratio(matrix["tn"], matrix["tn"] + matrix["fp"]),
        "voc": sum(vocs) / len(vocs) if vocs else None,
    }


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _voc(frames: list[int], progress: list[float]) -> float | None:
    from lrm_reward.adaptation.metrics import spearman

    pairs = [(f, p) for f, p in zip(frames, progress, strict=True) if p == p]  # unparsed answers are NaN
    return spearman(*zip(*pairs, strict=True)) if len(pairs) > 2 else None
