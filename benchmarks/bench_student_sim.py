"""Between reward-model queries in the simulator: hold vs the distilled student, against ground truth.

Takes a finished `make demo` run (its out folder: two rounds of ACT rollouts in the SO-101 simulator,
recorded through ROS and judged by the demo's reward model, with the simulator's success for each). Distills
a student (lrm-distill's code, default architecture) from round 1's judgments, then on round 2's episodes
(layouts the same, policy refined; the student never saw these episodes) builds the reward curve a reward
node would publish with the reward model queried every k frames (the judge's curve: every `--every-k`
frames, the demo's interval) and, in between,
- hold: the last answer repeated (the paper's interval-hold);
- student: the student's own value on each frame (``anchor="raw"``, the node's default).
Ground truth: in a successful episode progress should rise with time, so VOC (Spearman of the curve with
the frame index over every frame; GVL's value-order correlation) on the episodes the simulator says
succeeded; also, on every episode, how far the student is from the teacher on the queried frames and
whether the student's completion at the last frame agrees with the simulator.
Prints one table. Not a test: nothing is asserted.

    . scripts/env.sh && python benchmarks/bench_student_sim.py out/demo [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")


def spearman(values) -> float:
    from lrm_reward.adaptation.metrics import spearman as _spearman

    return float(_spearman(list(range(len(values))), list(values)))


def held_curve(num_frames: int, answers: dict[int, float]) -> np.ndarray:
    """The latest answer at or before each frame (NaN before the first)."""
    curve = np.full(num_frames, np.nan)
    last = np.nan
    for i in range(num_frames):
        if i in answers:
            last = answers[i]
        curve[i] = last
    return curve


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("demo", type=Path, help="a finished make demo output folder (state.json, two rounds)")
    p.add_argument("--steps", type=int, default=1500, help="student training steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    from lrm_reward.student.dataset import FrameReader, teacher_labels
    from lrm_reward.student.loading import load_student
    from lrm_reward.student.model import COMPLETION, PROGRESS
    from lrm_reward.student.train import DistillConfig, distill

    torch.set_num_threads(args.threads)
    state = json.loads((args.demo / "state.json").read_text())
    done = state["done"]
    missing = [s for s in ("rollout1", "judge1", "rollout2", "judge2") if s not in done]
    if missing:
        print(
            f"{args.demo}: stages {missing} not finished: run make demo (two rounds) first", file=sys.stderr
        )
        return 1
    train_ds, eval_ds = Path(done["rollout1"]["dataset"]), Path(done["rollout2"]["dataset"])
    truth = {row["episode_index"]: bool(row["success"]) for row in done["rollout2"]["episodes"]}

    with tempfile.TemporaryDirectory(prefix="bench_student_sim_") as tmp:
        started = time.monotonic()
        cfg = DistillConfig(
            datasets=[train_ds], output=Path(tmp) / "student", steps=args.steps, threads=args.threads
        )
        result = distill(cfg, progress_bar=True)
        train_s = time.monotonic() - started
        labels = teacher_labels([eval_ds])
        student = load_student(result.path, labels.task, labels.camera)
        reader = FrameReader(eval_ds, labels.camera, student.arch.image_size)
        rows = {"hold": [], "student": [], "queried only": []}
        mad, final_agree, n_frames = [], [], 0
        infer_s = 0.0
        for ep in labels.episodes:
            n = ep.num_frames
            frames = reader.read(ep.episode_index, list(range(n)))
            t0 = time.perf_counter()
            first = frames[:1] if student.arch.use_initial_frame else None
            values = np.concatenate(
                [student.predict_resized(frames[s : s + 128], first) for s in range(0, n, 128)]
            )
            infer_s += time.perf_counter() - t0
            n_frames += n
            answers = {i: v for i, v in ep.progress.items() if np.isfinite(v)}
            hold = held_curve(n, answers)
            mixed = values[:, PROGRESS].astype(float).copy()
            for i, v in answers.items():
                mixed[i] = v  # queried frames carry the reward model's own answer
            mad += [abs(values[i, PROGRESS] - v) for i, v in answers.items()]
            success = truth.get(ep.episode_index, ep.success)
            final_agree.append(float((values[-1, COMPLETION] >= student.completion_threshold) == success))
            if success:
                keep = ~np.isnan(hold)
                rows["hold"].append(spearman(hold[keep]))
                rows["student"].append(spearman(mixed[keep]))
                order = sorted(answers)
                rows["queried only"].append(spearman([answers[i] for i in order]))
    voc = {k: float(np.nanmean(v)) if v else float("nan") for k, v in rows.items()}
    print(
        f"\nBetween queries in the SO-101 simulator: {args.demo} (student from round 1's judged episodes, "
        f"{args.steps} steps, {train_s:.0f} s; evaluated on round 2: {len(labels.episodes)} episodes, "
        f"{sum(truth.values())} successes by the simulator)\n{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(f"{'curve between queries':<34} {'VOC (successes)':>16}")
    print("-" * 51)
    print(f"{'reward model queried frames only':<34} {voc['queried only']:>16.3f}")
    print(f"{'hold (interval-hold)':<34} {voc['hold']:>16.3f}")
    print(f"{'student (raw)':<34} {voc['student']:>16.3f}")
    print(
        f"\nstudent vs reward model on the queried frames: mean |progress difference| {np.mean(mad):.3f} "
        f"over {len(mad)} answers; student's completion at the last frame agrees with the simulator on "
        f"{np.mean(final_agree):.0%} of {len(final_agree)} episodes; student "
        f"{infer_s / max(n_frames, 1) * 1e3:.2f} ms/frame (batched)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
