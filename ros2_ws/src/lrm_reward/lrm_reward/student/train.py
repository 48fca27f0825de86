"""``lrm-distill``: train a small reward student on frames the teacher reward model labeled.

What it is for: the reward model is asked every k frames; in between the reward node holds a stale value
(arXiv 2603.16065 names this its limitation, and "a more distilled, lightweight reward head" the way out).
Each night the judge has already asked the teacher about the day's episodes (``lrm-judge``); this command
fits a small CNN (``model.py``) to those answers, one student per task and camera, validates it on
held-out episodes (``dataset.py`` says which) and writes it as a new version next to the adapters:

    <adapters>/student/vNNNN/{model.safetensors, config.json}     (store.py)

config.json says what it was trained on (task, camera, frame size), from what (datasets, episodes,
teacher model ids, judge settings), how (settings, final loss) and how well (held-out metrics, see
``evaluation.py``); the reward node refuses a student whose task or camera differs (``loading.py``).

    lrm-distill ~/lrm_data/rec_2026-03-02 --adapters adapters [--task "..."] [--camera front]

What it is not: no judging (run lrm-judge first; for denser labels judge with a small --every-k and a
larger --last-n), no serving (``between.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lrm_reward.student import store
from lrm_reward.student.dataset import (
    FrameReader,
    LabelError,
    SampleConfig,
    build_training_rows,
    read_held_out,
    split_episodes,
    teacher_labels,
)
from lrm_reward.student.evaluation import held_out_metrics, predict_held_out
from lrm_reward.student.loading import Student, read_config
from lrm_reward.student.model import COMPLETION, PROGRESS, StudentArch, StudentNet, to_input

log = logging.getLogger(__name__)

DISTILL_VERSION = "lrm-distill/1"


@dataclass
class DistillConfig:
    datasets: list[Path]
    adapters: Path = Path("adapters")  # the teacher's adapters folder: the student goes to <adapters>/student
    output: Path | None = None  # a student folder of its own instead of <adapters>/student
    task: str | None = None  # None: the only task of the judged episodes
    camera: str | None = None  # None: the only camera the judge looked through
    arch: StudentArch = field(default_factory=StudentArch)
    samples: SampleConfig = field(default_factory=SampleConfig)
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    augment_shift: float = 0.06  # random shift of up to this fraction of the image (camera shake)
    val_fraction: float = 0.2  # held out when the teacher's split.json does not say
    voc_frames: int = 50  # frames per held-out episode for the VOC metric
    completion_threshold: float = 0.5
    seed: int = 0
    threads: int | None = None  # torch CPU threads (None: torch's default)
    data_root: Path | None = None  # refuse datasets outside this folder

    def __post_init__(self) -> None:
        self.datasets = [Path(d).expanduser() for d in self.datasets]
        self.adapters = Path(self.adapters).expanduser()
        if self.output is not None:
            self.output = Path(self.output).expanduser()
        if not self.datasets:
            raise ValueError("give at least one judged dataset")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise ValueError("learning_rate must be > 0 and weight_decay >= 0")
        if not 0.0 <= self.warmup_fraction < 1.0 or not 0.0 <= self.augment_shift < 0.5:
            raise ValueError("warmup_fraction must be in [0, 1) and augment_shift in [0, 0.5)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.voc_frames < 2:
            raise ValueError("voc_frames must be >= 2")
        if not 0.0 < self.completion_threshold < 1.0:
            raise ValueError("completion_threshold must be in (0, 1)")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")

    @property
    def student_root(self) -> Path:
        return self.output if self.output is not None else store.student_root(self.adapters)

    def training_json(self) -> dict:
        skip = {"datasets", "adapters", "output", "task", "camera", "arch", "samples", "data_root", "threads"}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}
        out["samples"] = dataclasses.asdict(self.samples)
        return out


@dataclass
class DistillResult:
    path: Path
    config: dict
    metrics: dict
    final_loss: float
    seconds: float


def distill(cfg: DistillConfig, progress_bar: bool = True) -> DistillResult:
    """Read the teacher's labels and frames, train, validate, write a new student version."""
    from tqdm import tqdm

    started = time.monotonic()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    datasets = list(cfg.datasets)
    if cfg.data_root is not None:
        from lrm_reward.refinement.data_root import resolve_inside

        datasets = [resolve_inside(cfg.data_root, d) for d in datasets]
    labels = teacher_labels(datasets, cfg.task, cfg.camera)
    train_eps, held_eps, split_how = split_episodes(labels.episodes, cfg.val_fraction, cfg.seed, cfg.adapters)
    if not train_eps:
        raise LabelError("no episode left to train on")
    used_roots = sorted({ep.dataset for ep in labels.episodes})
    readers = {root: FrameReader(root, labels.camera, cfg.arch.image_size) for root in used_roots}
    shapes = {reader.source_shape for reader in readers.values()}
    if len(shapes) > 1:
        raise LabelError(f"camera {labels.camera!r} has different frame sizes across the datasets: {shapes}")
    source_shape = shapes.pop()
    log.info(
        "%d episodes of %r (camera %r): %d for training, %d held out (%s)",
        len(labels.episodes),
        labels.task,
        labels.camera,
        len(train_eps),
        len(held_eps),
        split_how,
    )

    with tqdm(total=len(train_eps) + len(held_eps), desc="reading frames", disable=not progress_bar) as bar:
        rows = build_training_rows(train_eps, readers, cfg.samples, progress=bar)
        held = read_held_out(held_eps, readers, cfg.voc_frames, progress=bar)

    torch.manual_seed(cfg.seed)
    net = StudentNet(cfg.arch)
    final_loss = _train(net, rows, cfg, progress_bar)

    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    metrics = held_out_metrics(
        predict_held_out(Student.from_state_dict(dict(state), {"arch": cfg.arch.to_json()}), held),
        cfg.completion_threshold,
    )
    metrics["split"] = split_how
    config = {
        "task": labels.task,
        "camera": {"name": labels.camera, "source_shape": list(source_shape)},
        "arch": cfg.arch.to_json(),
        "completion_threshold": cfg.completion_threshold,
        "teacher": {
            "model_ids": labels.model_ids,
            "labels": "judgments (progress_curve at curve_frame_indices, completion_probs)",
            "curve_every_k": sorted({ep.curve_every_k for ep in labels.episodes if ep.curve_every_k}),
        },
        "data": {
            "datasets": [str(Path(d).resolve()) for d in datasets],  # train/held-out keys index these
            "train_episodes": [ep.key for ep in train_eps],
            "held_out_episodes": [ep.key for ep in held_eps],
            "split": split_how,
            "skipped": labels.skipped,
            "rows": rows.counts,
        },
        "training": {
            **cfg.training_json(),
            "final_loss": final_loss,
            "seconds": round(time.monotonic() - started, 1),
            "distill_version": DISTILL_VERSION,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "validation": metrics,
    }
    path = store.write_version(cfg.student_root, state, config)
    return DistillResult(path, read_config(path), metrics, final_loss, time.monotonic() - started)


def _train(net: StudentNet, rows, cfg: DistillConfig, progress_bar: bool) -> float:
    from tqdm import tqdm

    rng = np.random.default_rng(cfg.seed)
    pw = rows.progress_weight.numpy().astype(np.float64)
    cw = rows.completion_weight.numpy().astype(np.float64)
    # each head gets about half of every batch, however many labels it has
    prob = (pw > 0) / max(1, int((pw > 0).sum())) + (cw > 0) / max(1, int((cw > 0).sum()))
    if prob.sum() == 0:
        raise LabelError("no labeled frame to train on")
    prob /= prob.sum()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    shift = round(cfg.augment_shift * cfg.arch.image_size)
    net.train()
    ema = math.nan
    with tqdm(range(cfg.steps), desc="distilling", disable=not progress_bar) as bar:
        for _step in bar:
            idx = torch.from_numpy(rng.choice(len(prob), size=cfg.batch_size, p=prob))
            x = _shift(to_input(rows.frames[idx]), shift, rng)
            if cfg.arch.use_initial_frame:
                # a batch holds few episodes: embed each first frame once (a third less work at batch 64)
                firsts, which = torch.unique(rows.initial[idx], return_inverse=True)
                x0 = _shift(to_input(rows.frames[firsts]), shift, rng)
                z_all = net.embed(torch.cat([x, x0]))
                z, z0 = z_all[: len(x)], z_all[len(x) :][which]
            else:
                z, z0 = net.embed(x), None
            logits = net.head_logits(z, z0)
            loss = _weighted_bce(logits[:, PROGRESS], rows.progress[idx], rows.progress_weight[idx])
            loss = loss + _weighted_bce(
                logits[:, COMPLETION], rows.completion[idx], rows.completion_weight[idx]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.detach().item()
            ema = value if math.isnan(ema) else 0.95 * ema + 0.05 * value
            bar.set_postfix(loss=f"{ema:.4f}", refresh=False)
    net.eval()
    return float(ema)


def _weighted_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Soft-target binary cross-entropy, weighted; 0 when no row of the batch has this label."""
    total = weight.sum()
    if float(total) == 0.0:
        return logits.sum() * 0.0
    per_row = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_row * weight).sum() / total


def _shift(x: torch.Tensor, pad: int, rng: np.random.Generator) -> torch.Tensor:
    """Random translation by up to `pad` pixels per sample (edges replicated)."""
    if pad <= 0:
        return x
    size = x.shape[-1]
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    offsets = rng.integers(0, 2 * pad + 1, size=(len(x), 2))
    return torch.stack([padded[i, :, oy : oy + size, ox : ox + size] for i, (oy, ox) in enumerate(offsets)])


# ---------------------------------------------------------------------------- CLI
def build_arg_parser() -> argparse.ArgumentParser:
    d = DistillConfig(datasets=[Path(".")])
    p = argparse.ArgumentParser(
        prog="lrm-distill",
        description="Distill a small reward student (CNN, one CPU core at camera rate) from the reward "
        "model's judgments of recorded episodes; writes <adapters>/student/vNNNN.",
    )
    p.add_argument("dataset", nargs="+", help="dataset folder(s) judged by lrm-judge")
    p.add_argument(
        "--adapters",
        default=str(d.adapters),
        help="the teacher's adapters folder: the student goes to <adapters>/student/vNNNN, and its "
        "split.json (lrm-train-reward) names the held-out episodes (default: %(default)s)",
    )
    p.add_argument("--output", default=None, help="a student folder instead of <adapters>/student")
    p.add_argument("--task", default=None, help="task text (default: the only task of the judged episodes)")
    p.add_argument("--camera", default=None, help="camera name (default: the one the judge looked through)")
    p.add_argument("--image-size", type=int, default=d.arch.image_size, help="student input size [px]")
    p.add_argument(
        "--widths", default=",".join(map(str, d.arch.widths)), help="channels of the stride-2 conv stages"
    )
    p.add_argument("--no-initial-frame", action="store_true", help="do not condition on the first frame")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held out without split.json")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-interpolate", action="store_true", help="train on the teacher's exact answers only")
    p.add_argument(
        "--completion-negatives-below",
        type=float,
        default=d.samples.completion_negatives_below,
        help="frames the teacher called less done than this are completion negatives (<= 0: off)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--data-root", default=None, help="refuse datasets outside this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        negatives = args.completion_negatives_below
        cfg = DistillConfig(
            datasets=[Path(d) for d in args.dataset],
            adapters=Path(args.adapters),
            output=Path(args.output) if args.output else None,
            task=args.task,
            camera=args.camera,
            arch=StudentArch(
                image_size=args.image_size,
                widths=tuple(int(w) for w in args.widths.split(",") if w.strip()),
                use_initial_frame=not args.no_initial_frame,
            ),
            samples=SampleConfig(
                interpolate=not args.no_interpolate,
                completion_negatives_below=negatives if negatives is not None and negatives > 0 else None,
            ),
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            val_fraction=args.val_fraction,
            seed=args.seed,
            threads=args.threads,
            data_root=Path(args.data_root) if args.data_root else None,
        )
    except ValueError as exc:
        print(f"lrm-distill: {exc}", file=sys.stderr)
        return 2
    try:
        result = distill(cfg, progress_bar=not args.quiet)
    except (LabelError, ValueError, FileNotFoundError, store.StudentStoreBusyError) as exc:
        print(f"lrm-distill: {exc}", file=sys.stderr)
        return 1
    print(f"student {result.config['version']} -> {result.path}")
    print(f"lrm-distill: {summary_line(result.metrics)}")
    return 0


def summary_line(m: dict) -> str:
    if not m.get("episodes"):
        return "no held-out episode: validation metrics are NaN (record more episodes)"
    return (
        f"held out {m['episodes']} episodes ({m['split']}): progress MAD {m['progress_mad']:.3f} over "
        f"{m['progress_labels']} teacher answers, completion agreement {m['completion_agreement']:.0%} over "
        f"{m['completion_labels']}, VOC {m['voc']:.3f} (teacher {m['teacher_voc']:.3f})"
    )


if __name__ == "__main__":
    sys.exit(main())
