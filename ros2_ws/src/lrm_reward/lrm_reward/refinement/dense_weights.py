"""Per-frame training weights from the reward model's dense progress: reward-aligned behaviour cloning.

What it is for: refinement that uses how much progress each stretch of an episode made, not only the
judge's yes/no. The recipe is RA-BC (reward-aligned behaviour cloning, SARM, arXiv 2509.25358, as
lerobot 0.6.1 ships it in `lerobot.rewards.sarm.rabc.RABCWeights`): a frame's weight follows the progress
made over the next `chunk_size` frames (delta > kappa: 1; 0 <= delta <= kappa: a soft weight from the
dataset's delta statistics; progress going backwards: 0).

Three steps, each on lerobot's own code where lerobot has it:
1. `read_progress(dataset)`: per-frame progress of every episode. Source, per episode: the reward node's
   live values the recorder stored as `reward.progress` (interval-hold: most frames repeat the last
   answer; NaN before the first one and where the node sent "not asked"); for an episode without any,
   the judge's progress curve (every k frames, judgments/); neither: no progress (NaN). Gaps are filled
   by lerobot's `interpolate_progress` (linear between known values, the first/last value held at the
   ends).
2. `write_progress_parquet(progress)`: the progress in the exact schema of lerobot's
   `compute_rabc_weights` scripts (columns index, episode_index, frame_index, progress_sparse; sorted by
   index; `reward_model_path` in the schema metadata) at `<dataset>/sarm_progress.parquet`, the file
   lerobot's rabc weighting looks for in a dataset root. So stock
   `lerobot-train --dataset.root=<dataset> --sample_weighting.type=rabc ...` (a policy whose forward
   takes `reduction="none"`: smolvla, pi0, pi05, ...) trains on our recordings with our progress.
   Episodes without progress are NaN there, which stock RA-BC weighs with its `fallback_weight` (1.0).
3. `rabc_frame_weights(parquet, chunk_size)`: the RA-BC weight of every frame, computed by lerobot's
   `RABCWeights` from that very file.

Written here by hand (lerobot has no equivalent): reading the recorded `reward.progress` and the
judgments into the parquet; the floor `min_weight` under the RA-BC weight, so that a failure's frames are
kept at a low weight instead of being dropped (RA-BC alone gives 0 to regressions); combining the weights
with the judge's verdicts (`selection_frame_weights`; the selection modes are in selection.py); the batch
weighting for lrm-refine's own training loop (`training_loader`: a WeightedRandomSampler for policies
without a per-sample loss; otherwise `FrameWeighter`, a lerobot `SampleWeighter`, and `batch_loss`,
which repeats the lines of `lerobot_train.update_policy` that apply it: lerobot's function also wants an
Accelerator and a metrics tracker).

What it is not: no training loop (refine.py), no judging (judge.py), no reward model.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROGRESS_FILE = "sarm_progress.parquet"  # what lerobot's rabc weighting reads from a dataset root
PROGRESS_COLUMN = "progress_sparse"  # --sample_weighting.head_mode=sparse, lerobot's default
RECORDED_PROGRESS_KEY = "reward.progress"  # written by the recorder from the reward node's RewardSignal
FRAME_WEIGHT_KEY = "lrm.frame_weight"  # the weight of a training sample, added to the batch

SOURCE_RECORDED, SOURCE_JUDGE, SOURCE_NONE = "recorded", "judge", "none"

SELECTION_FILTER, SELECTION_WEIGHTING, SELECTION_BOTH = "filter", "weighting", "both"
SELECTIONS = (SELECTION_FILTER, SELECTION_WEIGHTING, SELECTION_BOTH)

# What a kept episode contributes: every frame at weight 1, or each frame at its progress weight.
WEIGHT_FULL, WEIGHT_PROGRESS = "full", "progress"


class NoProgressError(ValueError):
    """A dataset to be weighted by progress has no progress value at all."""


@dataclass
class EpisodeProgress:
    episode_index: int
    start: int  # global index of the episode's first frame (dataset_from_index)
    values: np.ndarray  # float32 per frame, filled; all NaN when source is "none"
    source: str  # SOURCE_RECORDED | SOURCE_JUDGE | SOURCE_NONE
    known: int  # frames (recorded) or curve points (judge) with a finite value before filling

    @property
    def has_progress(self) -> bool:
        return self.source != SOURCE_NONE


@dataclass
class DatasetProgress:
    root: Path
    episodes: dict[int, EpisodeProgress] = field(default_factory=dict)
    reward_model: str = "none"  # what produced the values: the reward node, the judge's model

    @property
    def has_progress(self) -> bool:
        return any(e.has_progress for e in self.episodes.values())

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.episodes.values():
            out[e.source] = out.get(e.source, 0) + 1
        return out


def read_progress(dataset_root: Path | str, judgments: dict | None = None) -> DatasetProgress:
    """Per-frame progress of every episode of a recorded dataset (no video is decoded).

    judgments: episode index -> Judgment (lrm-judge's output); None reads them from the dataset.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.rewards.sarm.compute_rabc_weights import interpolate_progress

    from lrm_reward.refinement.judge import load_judgments

    root = Path(dataset_root)
    if not (root / "meta" / "info.json").exists():
        raise FileNotFoundError(f"no LeRobotDataset at {root} (meta/info.json missing)")
    if judgments is None:
        judgments = load_judgments(root)
    ds = LeRobotDataset(f"lrm/{root.name}", root=root, video_backend="pyav")
    columns = ["index", "episode_index"]
    recorded = RECORDED_PROGRESS_KEY in ds.meta.features
    if recorded:
        columns.append(RECORDED_PROGRESS_KEY)
    table = ds.hf_dataset.select_columns(columns).with_format("numpy")[:]
    index = np.asarray(table["index"], dtype=np.int64)
    episode = np.asarray(table["episode_index"], dtype=np.int64)
    live = (
        np.asarray(table[RECORDED_PROGRESS_KEY], dtype=np.float32).reshape(len(index), -1)[:, 0]
        if recorded
        else np.full(len(index), np.nan, np.float32)
    )
    out = DatasetProgress(root)
    models = {str(j.model_id) for j in judgments.values()}
    for e in range(ds.meta.total_episodes):
        meta = ds.meta.episodes[e]
        start, end = int(meta["dataset_from_index"]), int(meta["dataset_to_index"])
        frames = np.arange(start, end)
        rows = np.nonzero(episode == e)[0]
        values = np.full(len(frames), np.nan, np.float32)
        values[index[rows] - start] = live[rows]
        finite = np.isfinite(values)
        if finite.any():
            filled = interpolate_progress(frames, values, frames)
            out.episodes[e] = EpisodeProgress(e, start, filled, SOURCE_RECORDED, int(finite.sum()))
            continue
        j = judgments.get(e)
        curve = np.asarray(j.progress_curve if j else [], dtype=np.float64)
        if curve.size and np.isfinite(curve).any():
            at = start + np.asarray(j.curve_frame_indices, dtype=np.int64)
            filled = interpolate_progress(at, curve, frames)
            out.episodes[e] = EpisodeProgress(e, start, filled, SOURCE_JUDGE, int(np.isfinite(curve).sum()))
            continue
        out.episodes[e] = EpisodeProgress(e, start, np.full(len(frames), np.nan, np.float32), SOURCE_NONE, 0)
    sources = out.sources()
    labels = ["lrm reward node (reward.progress)"] if sources.get(SOURCE_RECORDED) else []
    if sources.get(SOURCE_JUDGE):
        labels.append(f"lrm-judge ({', '.join(sorted(models))})")
    out.reward_model = " + ".join(labels) or "none"
    return out


def no_progress_message(root: Path) -> str:
    return (
        f"dataset {root} has no progress value at all: no `{RECORDED_PROGRESS_KEY}` was recorded (was the "
        f"reward node running and its `reward` topic remapped to the refinement node?) and no judgment "
        f"has a progress curve. Run `lrm-judge {root}` first, or refine with `--selection filter`"
    )


def write_progress_parquet(progress: DatasetProgress, path: Path | None = None) -> Path:
    """Write the progress in lerobot's RA-BC schema; returns the path (default: <dataset>/PROGRESS_FILE).

    Raises NoProgressError when no episode has progress (a file of NaN would make stock RA-BC weigh
    every frame 1.0 without saying so).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not progress.has_progress:
        raise NoProgressError(no_progress_message(progress.root))
    path = Path(path) if path is not None else progress.root / PROGRESS_FILE
    eps = [progress.episodes[e] for e in sorted(progress.episodes)]
    lengths = [len(e.values) for e in eps]
    table = pa.table(
        {
            "index": np.concatenate([e.start + np.arange(n) for e, n in zip(eps, lengths, strict=True)]),
            "episode_index": np.repeat([e.episode_index for e in eps], lengths).astype(np.int64),
            "frame_index": np.concatenate([np.arange(n, dtype=np.int64) for n in lengths]),
            PROGRESS_COLUMN: np.concatenate([e.values for e in eps]).astype(np.float32),
        }
    )
    table = table.sort_by("index").replace_schema_metadata(
        {
            b"reward_model_path": progress.reward_model.encode(),
            b"lrm_progress_sources": json.dumps(
                {str(e.episode_index): e.source for e in eps}, sort_keys=True
            ).encode(),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a reader (a running lerobot-train) never sees half a file
    return path


def rabc_frame_weights(
    parquet: Path, chunk_size: int, kappa: float = 0.01, epsilon: float = 1e-6
) -> dict[int, float]:
    """Global frame index -> RA-BC weight in [0, 1], by lerobot's RABCWeights on the parquet.

    Frames without progress (NaN) are left out of the result.
    """
    import pandas as pd
    import torch
    from lerobot.rewards.sarm.rabc import RABCWeights

    rabc = RABCWeights(
        progress_path=parquet,
        chunk_size=chunk_size,
        head_mode="sparse",
        kappa=kappa,
        epsilon=epsilon,
        fallback_weight=0.0,
        device=torch.device("cpu"),
    )
    known = pd.read_parquet(parquet, columns=["index", PROGRESS_COLUMN]).dropna()
    index = known["index"].to_numpy(np.int64)
    if index.size == 0:
        return {}
    normalized, stats = rabc.compute_batch_weights({"index": torch.from_numpy(index)})
    # compute_batch_weights scales the weights to sum to the batch size; its mean_weight is the raw mean,
    # so raw = normalized * (mean * n + epsilon) / n, up to float32 rounding (hence 6 decimals).
    n = len(index)
    raw = normalized.numpy().astype(np.float64) * (float(stats["mean_weight"]) * n + epsilon) / n
    raw = np.clip(np.round(raw, 6), 0.0, 1.0)
    return dict(zip(index.tolist(), raw.tolist(), strict=True))


def weight_summary(weights: np.ndarray, min_weight: float) -> dict:
    """Distribution of per-frame weights, for the metadata and the report."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return {"frames": 0}
    q = np.quantile(w, [0.1, 0.5, 0.9])
    return {
        "frames": int(w.size),
        "min": float(w.min()),
        "p10": float(q[0]),
        "median": float(q[1]),
        "mean": float(w.mean()),
        "p90": float(q[2]),
        "max": float(w.max()),
        "at_floor": float(np.mean(w <= min_weight + 1e-9)),
        "at_full": float(np.mean(w >= 1.0 - 1e-9)),
        "effective_frames": float(w.sum() ** 2 / max(float((w**2).sum()), 1e-12)),  # Kish's n_eff
    }


def selection_frame_weights(
    selection, datasets: list, chunk_size: int, min_weight: float, kappa: float = 0.01
) -> tuple[np.ndarray, dict]:
    """The training weight of every position of ConcatDataset(datasets), and a summary for the report.

    selection: selection.Selection (its kept rows say "weight": full | progress; its `progress` holds the
    judged datasets read by read_progress); datasets: the opened LeRobotDatasets, in selection.episodes
    order. Writes each weighted dataset's sarm_progress.parquet (the weights are computed from it).
    """
    rabc: dict[str, dict[int, float]] = {}
    files: dict[str, str] = {}
    for root, progress in selection.progress.items():
        if not progress.has_progress:
            continue
        try:
            path = write_progress_parquet(progress)
        except OSError as exc:  # a read-only dataset still trains; only stock lerobot-train misses the file
            import tempfile

            log.warning("cannot write the progress file of %s (%s); weights from a temporary copy", root, exc)
            with tempfile.TemporaryDirectory(prefix="lrm_progress_") as tmp:
                path = write_progress_parquet(progress, Path(tmp) / PROGRESS_FILE)
                rabc[root] = rabc_frame_weights(path, chunk_size, kappa)
            continue
        files[root] = str(path)
        rabc[root] = rabc_frame_weights(path, chunk_size, kappa)
    how: dict[tuple[str, int], str] = {}
    for r in selection.kept:  # a frame used as a demonstration or a success counts at full weight
        key = (r["dataset"], r["episode_index"])
        if how.get(key) != WEIGHT_FULL:
            how[key] = r.get("weight", WEIGHT_FULL)
    parts, kinds = [], []
    for root, ds in zip(selection.episodes, datasets, strict=True):
        cols = ds.hf_dataset.select_columns(["index", "episode_index"]).with_format("numpy")[:]
        lookup = rabc.get(root, {})
        rows = zip(
            np.asarray(cols["index"]).tolist(), np.asarray(cols["episode_index"]).tolist(), strict=True
        )
        for i, e in rows:
            kind = how.get((root, int(e)), WEIGHT_FULL)
            kinds.append(kind)
            parts.append(1.0 if kind == WEIGHT_FULL else max(lookup.get(int(i), 0.0), min_weight))
    weights = np.asarray(parts, dtype=np.float64)
    progress_frames = weights[np.asarray(kinds) == WEIGHT_PROGRESS] if kinds else weights
    counts, edges = np.histogram(weights, bins=20, range=(0.0, 1.0))
    info = {
        "chunk_size": int(chunk_size),
        "kappa": kappa,
        "min_frame_weight": min_weight,
        "progress_files": files,
        "progress_sources": {root: p.sources() for root, p in selection.progress.items()},
        "episodes": {k: sum(1 for v in how.values() if v == k) for k in (WEIGHT_FULL, WEIGHT_PROGRESS)},
        "frames": {k: int(sum(1 for v in kinds if v == k)) for k in (WEIGHT_FULL, WEIGHT_PROGRESS)},
        "weights": weight_summary(weights, min_weight),
        "progress_weights": weight_summary(progress_frames, min_weight),
        "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
    }
    return weights, info


def training_weights(selection, datasets: list, policy, min_weight: float) -> np.ndarray | None:
    """lrm-refine's per-frame weights (None: uniform, as the filter trains); sets selection.weighting."""
    if selection.mode in (None, SELECTION_FILTER):
        selection.weighting = {"mechanism": "uniform (judged-success filter)"}
        return None
    pcfg = policy.config
    # RA-BC looks chunk_size frames ahead; lerobot refuses a policy without one, we use its action steps
    chunk = getattr(pcfg, "chunk_size", None) or getattr(pcfg, "n_action_steps", None) or 1
    weights, info = selection_frame_weights(selection, datasets, int(chunk), min_weight)
    if bool((weights >= 1.0).all()):
        info["mechanism"] = "uniform (every selected frame at full weight)"
        weights = None
    elif supports_per_sample_loss(policy):
        info["mechanism"] = "per-sample loss (lerobot sample weighting)"
    else:
        info["mechanism"] = "weighted sampling (the policy's forward has no per-sample loss)"
    selection.weighting = info
    log.info("selection %s: %s, weights %s", selection.mode, info["mechanism"], info["weights"])
    return weights


def training_loader(data, weights: np.ndarray | None, policy, batch_size: int, num_workers: int, seed: int):
    """(DataLoader, weighter or None): uniform shuffling when weights is None; otherwise the frames'
    weights as lerobot applies them (per-sample loss, the weighter is then given) where the policy's
    forward allows it, else frames drawn in proportion to their weight (with replacement)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sampler, weighter = None, None
    if weights is not None and supports_per_sample_loss(policy):
        data, weighter = WeightedFrames(data, weights), make_frame_weighter()
    elif weights is not None:
        w = torch.as_tensor(weights, dtype=torch.double)
        sampler = torch.utils.data.WeightedRandomSampler(w, len(data), replacement=True, generator=generator)
    loader = torch.utils.data.DataLoader(
        data,
        batch_size=batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        generator=generator,
    )
    return loader, weighter


def supports_per_sample_loss(policy) -> bool:
    """Whether the policy's forward takes `reduction="none"`, which lerobot's sample weighting needs."""
    import inspect

    try:
        return "reduction" in inspect.signature(policy.forward).parameters
    except (TypeError, ValueError):
        return False


def _frame_weighter_class():
    import torch
    from lerobot.utils.sample_weighting import SampleWeighter

    class FrameWeighter(SampleWeighter):
        """Batch weights from FRAME_WEIGHT_KEY, scaled to sum to the batch size as RABCWeights does."""

        def __init__(self, epsilon: float = 1e-6) -> None:
            self.epsilon = epsilon

        def compute_batch_weights(self, batch: dict) -> tuple[torch.Tensor, dict]:
            w = torch.as_tensor(batch[FRAME_WEIGHT_KEY], dtype=torch.float32).flatten()
            stats = {"mean_weight": float(w.mean())}
            return w * len(w) / (w.sum() + self.epsilon), stats

        def get_stats(self) -> dict:
            return {"type": "lrm-frame-weights"}

    return FrameWeighter


def make_frame_weighter():
    return _frame_weighter_class()()


def batch_loss(policy, pre, batch: dict, weighter=None):
    """The training loss of a raw batch: policy.forward(pre(batch)), or with a weighter the loss of
    lerobot_train.update_policy with a sample weighter (per-sample loss, weighted mean). The weights are
    read before `pre`, whose pipeline keeps only the keys it knows."""
    if weighter is None:
        return policy.forward(pre(batch))[0]
    weights, _ = weighter.compute_batch_weights(batch)
    per_sample, _ = policy.forward(pre(batch), reduction="none")
    weights = weights.to(per_sample.device)
    return (per_sample * weights).sum() / (weights.sum() + 1e-6)


class WeightedFrames:
    """A map-style dataset that adds each frame's weight under FRAME_WEIGHT_KEY (per-sample loss path)."""

    def __init__(self, data, weights: np.ndarray) -> None:
        if len(data) != len(weights):
            raise ValueError(f"{len(weights)} weights for {len(data)} frames")
        self.data, self.weights = data, np.asarray(weights, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], FRAME_WEIGHT_KEY: float(self.weights[i])}


# ---------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    """Write <dataset>/sarm_progress.parquet for stock `lerobot-train --sample_weighting.type=rabc`."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m lrm_reward.refinement.dense_weights",
        description="Write a recorded dataset's progress in lerobot's RA-BC schema (sarm_progress.parquet).",
    )
    p.add_argument("datasets", nargs="+", help="recorded dataset folders")
    p.add_argument("--chunk-size", type=int, default=None, help="also print the RA-BC weights for this chunk")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    status = 0
    for root in args.datasets:
        try:
            progress = read_progress(root)
            path = write_progress_parquet(progress)
        except (FileNotFoundError, NoProgressError) as exc:
            print(f"dense_weights: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"{path}: episodes by progress source {progress.sources()}")
        if args.chunk_size:
            w = np.array(list(rabc_frame_weights(path, args.chunk_size).values()))
            print(f"  RA-BC weights (chunk {args.chunk_size}): {weight_summary(w, 0.0)}")
        print(f"  lerobot-train --dataset.root={root} --sample_weighting.type=rabc ...")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
