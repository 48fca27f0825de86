"""The distilled reward student, measured: student vs teacher on held-out episodes, hold vs student between
queries against the ground truth, and the student's latency per frame on one CPU thread. Prints markdown.

What runs: the synthetic block-pushing episodes of tests/adaptation (a red block slides toward a green
target; successes reach it, failures stop short or wander) are written as a LeRobotDataset and judged by
a stand-in teacher (``BlockTeacher``: it reads the block's position off the image and answers with
Gaussian noise, as an imperfect reward model would; the 8B needs a GPU and weights this build box does
not have). ``lrm-distill``'s ``distill()`` trains the student on that judgment and validates it on the
held-out episodes. Then, on the held-out episodes, the reward curve a node would publish with the teacher
asked every ``--interval`` frames is compared with the ground-truth progress (the block's x, stored as
observation.state): ``hold`` repeats the last answer, ``student`` fills the gaps with the student (raw, or
offset to continue from the last answer). Latency: an untrained student of the same architecture at 96 and
224 px, ``Student.predict_one`` and ``StudentBetween.frame`` (what the reward node would add per frame),
from a frame at the input size and from a 640x480 camera frame (resize included).

Not a test: nothing is asserted; goals (issue 20) are <= 2 ms at 96 px and <= 5 ms at 224 px per frame.

    python benchmarks/bench_student.py [--train-threads 1] [--steps 800] [--work /tmp/bench_student] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ros2_ws" / "src" / "lrm_reward"))
sys.path.insert(0, str(ROOT / "tests" / "adaptation"))
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402
from synthetic_episodes import TARGET_X, TASK, write_block_dataset  # noqa: E402

from lrm_reward.adaptation.metrics import spearman  # noqa: E402
from lrm_reward.core.types import Answer, Modality  # noqa: E402


class BlockTeacher:
    """A stand-in reward model: progress = the red block's distance travelled toward the target, read off
    the image, plus N(0, noise) per answer; completion = P(block on the target), also noisy."""

    model_id = "block-teacher (stand-in, noise 0.05)"

    def __init__(self, noise: float = 0.05, seed: int = 0) -> None:
        self.noise = noise
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def true_progress(image: np.ndarray) -> float:
        red = (image[..., 0] > 150) & (image[..., 1] < 110) & (image[..., 2] < 110)
        if not red.any():
            return 0.0
        cols = np.nonzero(red.any(axis=0))[0]
        x = float(cols.min())  # left edge of the block
        return float(np.clip((x - 2) / (TARGET_X - 2), 0.0, 1.0))

    def answer(self, modality: Modality, image: np.ndarray) -> float:
        p = self.true_progress(image)
        if modality is Modality.PROGRESS:
            return float(np.clip(p + self.rng.normal(0.0, self.noise), 0.0, 1.0))
        logit = (p - 0.9) / 0.03 + self.rng.normal(0.0, 1.0)
        return float(1.0 / (1.0 + np.exp(-logit)))

    def score(self, queries):
        return [Answer(q.modality, self.answer(q.modality, q.images[-1]), parsed=True) for q in queries]

    def close(self) -> None:
        pass


def held_out_curves(dataset: Path, student, held_keys: list[str], interval: int, teacher: BlockTeacher):
    """Per held-out episode: ground truth and the curves a node would publish (teacher every `interval`)."""
    from lrm_reward.refinement.judge import EpisodeFrames
    from lrm_reward.student.between import BetweenConfig, StudentBetween

    frames = EpisodeFrames(dataset)
    out = []
    for key in held_keys:
        episode = int(key.split(":")[1])
        n = frames.episode_length(episode)
        start = int(frames.ds.meta.episodes[episode]["dataset_from_index"])
        states = frames.ds.hf_dataset.select(range(start, start + n))["observation.state"]
        truth = np.array([float(np.asarray(s).reshape(-1)[0]) for s in states])
        images = [frames.frame(episode, i) for i in range(n)]
        every = np.array([teacher.answer(Modality.PROGRESS, im) for im in images])
        curves = {"teacher every frame": every, "hold": np.empty(n)}
        for mode in ("raw", "offset"):
            between = StudentBetween(student, BetweenConfig(anchor=mode))
            between.set_initial(images[0])
            curve = np.empty(n)
            for i, image in enumerate(images):
                value = between.frame(image, key=i)
                if i % interval == 0:  # a queried frame: the teacher's answer is published, and anchors
                    between.anchor(i, every[i], None)
                    curve[i] = every[i]
                else:
                    curve[i] = value.progress
            curves[f"student ({mode}) between queries"] = curve
        for i in range(n):
            curves["hold"][i] = every[(i // interval) * interval]
        out.append((truth, curves))
    return out


def latency_rows(sizes: list[int], repeats: int) -> list[tuple]:
    import torch

    from lrm_reward.student.between import StudentBetween
    from lrm_reward.student.loading import Student
    from lrm_reward.student.model import StudentArch, StudentNet

    rows = []
    rng = np.random.default_rng(0)
    camera = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    for size in sizes:
        torch.manual_seed(0)
        arch = StudentArch(image_size=size)
        student = Student(StudentNet(arch).eval(), {"arch": arch.to_json(), "version": "bench"})
        params = sum(p.numel() for p in student.net.parameters())
        square = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        z0 = student.embed(square)
        between = StudentBetween(student)
        between.set_initial(camera)
        calls = (
            (f"predict_one, {size}x{size} frame", student.predict_one, (square, z0)),
            ("predict_one, 640x480 frame (resize incl.)", student.predict_one, (camera, z0)),
            ("StudentBetween.frame, 640x480 (node side)", between.frame, (camera,)),
        )
        for label, call, call_args in calls:
            for _ in range(30):
                call(*call_args)
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                call(*call_args)
                times.append(time.perf_counter() - t)
            ms = np.array(times) * 1e3
            rows.append((size, label, params, np.median(ms), np.percentile(ms, 95), np.mean(ms)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_student"))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--image-size", type=int, default=96, help="the distilled student's input size")
    parser.add_argument("--successes", type=int, default=20)
    parser.add_argument("--failures", type=int, default=10)
    parser.add_argument("--frames", type=int, default=40, help="frames per episode")
    parser.add_argument("--judge-every-k", type=int, default=4, help="the night's judge: progress every k")
    parser.add_argument("--interval", type=int, default=10, help="the node's teacher query interval")
    parser.add_argument("--repeats", type=int, default=500, help="timed calls per latency row")
    parser.add_argument("--train-threads", type=int, default=None, help="torch threads while training")
    parser.add_argument("--quick", action="store_true", help="a small run (smoke check, numbers meaningless)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.successes, args.failures, args.frames, args.repeats = 30, 4, 2, 12, 20

    import torch

    from lrm_reward.refinement.judge import JudgeConfig, judge_dataset
    from lrm_reward.student.loading import load_student
    from lrm_reward.student.model import StudentArch
    from lrm_reward.student.train import DistillConfig, distill

    shutil.rmtree(args.work, ignore_errors=True)
    dataset = args.work / "blocks"
    started = time.perf_counter()
    write_block_dataset(dataset, args.successes, args.failures, args.frames, labels="sidecar", seed=1)
    judge_cfg = JudgeConfig(curve_every_k=args.judge_every_k, completion_last_n=args.judge_every_k)
    judge_dataset(dataset, BlockTeacher(seed=1), judge_cfg, progress_bar=False)
    prepared = time.perf_counter() - started
    if args.train_threads:
        torch.set_num_threads(args.train_threads)
    cfg = DistillConfig(
        datasets=[dataset],
        adapters=args.work / "adapters",
        arch=StudentArch(image_size=args.image_size),
        steps=args.steps,
        val_fraction=0.25,
        seed=0,
    )
    result = distill(cfg, progress_bar=False)
    m = result.metrics

    torch.set_num_threads(1)
    student = load_student(result.path, TASK)
    curves = held_out_curves(
        dataset, student, result.config["data"]["held_out_episodes"], args.interval, BlockTeacher(seed=2)
    )
    lat = latency_rows([96, 224], args.repeats)

    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    print("# Distilled reward student (benchmarks/bench_student.py)\n")
    print(
        f"machine: {cpu}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f}; python {platform.python_version()}, torch {torch.__version__}; latency on "
        f"torch.set_num_threads(1)\n"
    )
    print(
        f"data: {args.successes + args.failures} synthetic block episodes x {args.frames} frames (64x64), "
        f"judged by {BlockTeacher.model_id} with progress every {args.judge_every_k} frames and completion "
        f"on the last {args.judge_every_k}; student {result.config['version']} at {args.image_size} px, "
        f"{args.steps} steps, {result.seconds:.0f} s to distill (data {prepared:.0f} s); held out: "
        f"{m['episodes']} episodes ({m['successful_episodes']} successful), {m['split']}\n"
    )
    print("## Student vs teacher on held-out episodes\n")
    print("| metric | value |\n|---|---|")
    print(f"| progress VOC of the student (successful episodes, every frame) | {m['voc']:.3f} |")
    print(f"| progress VOC of the teacher (its judged curve, same episodes) | {m['teacher_voc']:.3f} |")
    print(
        f"| progress mean abs. difference to the teacher ({m['progress_labels']} answers) | "
        f"{m['progress_mad']:.3f} |"
    )
    print(
        f"| completion agreement with the teacher ({m['completion_labels']} answers, threshold "
        f"{m['completion_threshold']}) | {m['completion_agreement']:.1%} |"
    )
    print(f"| completion mean abs. difference to the teacher | {m['completion_mad']:.3f} |")

    print(f"\n## Reward curve vs ground-truth progress, teacher asked every {args.interval} frames\n")
    print(
        "Spearman of the published progress with the block's true progress per held-out episode "
        "(constant-truth episodes skipped), averaged; MAE against the truth.\n"
    )
    print("| curve | VOC vs ground truth | MAE vs ground truth |\n|---|---|---|")
    names = list(curves[0][1]) if curves else []
    for name in names:
        vocs = [spearman(c[name], truth) for truth, c in curves if np.ptp(truth) > 0]
        mae = [float(np.mean(np.abs(c[name] - truth))) for truth, c in curves]
        print(f"| {name} | {np.mean(vocs):.3f} | {np.mean(mae):.3f} |")

    print("\n## Latency per frame, 1 CPU thread\n")
    print(
        "| input px | call | parameters | median ms | p95 ms | mean ms | goal |\n"
        "|---|---|---|---|---|---|---|"
    )
    goals = {96: 2.0, 224: 5.0}
    for size, label, params, median, p95, mean in lat:
        verdict = "met" if median <= goals[size] else "MISSED"
        print(
            f"| {size} | {label} | {params:,} | {median:.2f} | {p95:.2f} | {mean:.2f} | "
            f"<= {goals[size]:g} ms: {verdict} |"
        )


if __name__ == "__main__":
    main()
