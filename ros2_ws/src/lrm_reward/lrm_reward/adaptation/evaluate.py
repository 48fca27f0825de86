"""``lrm-eval-reward``: held-out metrics of reward adapters, several adapter sets side by side.

What this is for: answering "does this adapter set judge MY episodes well?" for the released adapters, the
ones ``lrm-train-reward`` made, or none (the bare base model), on held-out episodes:

- VOC (value-order correlation, the GVL metric): Spearman correlation of predicted progress with frame time
  within each held-out successful episode, averaged over episodes; also the mean absolute progress error;
- completion accuracy and F1 (P(yes) > 0.5) and calibration (ECE of P(yes), plus a reliability diagram);
- contrastive accuracy (which of two frames of a successful episode is closer to done).

Answers come from the engine's logits readout (``RewardEngine.score``), the same path the nodes serve; with
``--backend vllm --server URL`` a running vLLM server answers (it must serve the adapter set evaluated,
docs/vllm.md), with the same numbers as the local engine.
Writes ``metrics.json``, one PNG per metric (matplotlib, Agg) and ``report.html`` into the output folder.

What it is not: no training; it does not pick a winner for you (the report shows all numbers).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.adaptation import metrics as M
from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation import train as T
from lrm_reward.core.backend_arguments import add_backend_arguments, backend_settings
from lrm_reward.core.types import Answer, Modality, Query

log = logging.getLogger(__name__)

NO_ADAPTERS = "none"
METRIC_TITLES = {
    "voc": "Value-order correlation (progress vs. time, higher is better)",
    "progress_mae": "Progress mean absolute error (lower is better)",
    "completion_accuracy": "Completion accuracy (higher is better)",
    "completion_f1": "Completion F1 (higher is better)",
    "completion_ece": "Completion calibration error, ECE of P(yes) (lower is better)",
    "contrastive_accuracy": "Contrastive accuracy (higher is better)",
}


@dataclass
class EvalConfig:
    """What to evaluate on what. With split_from, datasets and the held-out episodes come from training."""

    base_model: str
    adapter_sets: dict[str, str]  # name -> folder holding progress/ contrastive/ completion/, or "none"
    output_dir: Path
    datasets: list[S.DatasetSpec] = field(default_factory=list)
    split_from: Path | None = None  # an lrm-train-reward output folder (its split.json)
    episodes: str = "held_out"  # "held_out" (split by the samples seed) | "all" (data never trained on)
    samples: S.SampleConfig = field(default_factory=S.SampleConfig)
    modalities: tuple[Modality, ...] = (Modality.PROGRESS, Modality.CONTRASTIVE, Modality.COMPLETION)
    device: str = "cpu"
    dtype: str = "auto"
    max_batch_size: int = 8
    calibration_bins: int = 10
    local_files_only: bool = True
    # engine backend: "local" loads each adapter set here; "vllm" asks server_url (core/vllm_client.py)
    backend: str = "local"
    server_url: str | None = None
    allow_remote: bool = False
    request_timeout_s: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError("base_model is required")
        if not isinstance(self.adapter_sets, dict) or not self.adapter_sets:
            raise ValueError(
                "adapter_sets: give at least one name -> folder (or 'none' for the bare base model)"
            )
        self.adapter_sets = {str(k): str(v) for k, v in self.adapter_sets.items()}
        self.output_dir = Path(self.output_dir).expanduser()
        if self.split_from is not None:
            self.split_from = Path(self.split_from).expanduser()
        if isinstance(self.samples, dict):
            self.samples = T._build(S.SampleConfig, self.samples, "samples")
        self.datasets = [
            d if isinstance(d, S.DatasetSpec) else T._dataset_spec(d, None) for d in self.datasets
        ]
        if not self.datasets and self.split_from is None:
            raise ValueError("give datasets, or split_from (a training output folder)")
        if self.episodes not in ("held_out", "all"):
            raise ValueError(f"episodes must be 'held_out' or 'all', got {self.episodes!r}")
        self.modalities = tuple(Modality(m) for m in self.modalities)
        if self.max_batch_size < 1 or self.calibration_bins < 1:
            raise ValueError("max_batch_size and calibration_bins must be >= 1")


@dataclass
class EvalItems:
    """The held-out questions, built once and asked of every adapter set."""

    voc_queries: list[Query]
    voc_index: list[tuple[int, float]]  # per VOC query: (episode number, normalized time)
    completion: list[tuple[Query, bool]]
    contrastive: list[tuple[Query, bool]]  # True = ImageB is the more complete
    episodes: dict


def evaluation_episodes(cfg: EvalConfig) -> tuple[S.EpisodeSet, list[S.Episode]]:
    """The episodes to evaluate on: held out at training time (split_from), by seed, or all."""
    specs = list(cfg.datasets)
    held_keys = None
    if cfg.split_from is not None:
        split_path = cfg.split_from / T.SPLIT_FILE
        if not split_path.is_file():
            raise FileNotFoundError(
                f"{split_path} not found: split_from must be an lrm-train-reward output folder"
            )
        split = json.loads(split_path.read_text())
        if not specs:
            specs = [
                T._dataset_spec({k: v for k, v in d.items() if v is not None}, None)
                for d in split["datasets"]
            ]
            cfg.samples = T._build(S.SampleConfig, split["samples"], "split.json samples")
        held_keys = set(split["held_out"])
    episode_set = S.load_episodes(specs, cfg.samples)
    if cfg.episodes == "all":
        chosen = list(episode_set.episodes)
    elif held_keys is not None:
        chosen = [ep for ep in episode_set.episodes if str(ep.key) in held_keys]
    else:
        chosen = S.split_episodes(episode_set.episodes, cfg.samples.eval_fraction, cfg.samples.seed)[1]
    if not chosen:
        raise S.LabelError("no held-out episode to evaluate on (raise eval_fraction, or use episodes: all)")
    return episode_set, chosen


def build_items(cfg: EvalConfig, episode_set: S.EpisodeSet, chosen: list[S.Episode]) -> EvalItems:
    store = episode_set.store
    by_key = episode_set.by_key()
    voc_queries, voc_index = [], []
    successes = [ep for ep in chosen if ep.success]
    for number, ep in enumerate(successes):
        initial = store.frame(ep, 0)
        for t in S.voc_frames(ep, cfg.samples.voc_frames):
            images = [initial, store.frame(ep, t)] if cfg.samples.use_initial_frame else [store.frame(ep, t)]
            voc_queries.append(Query(Modality.PROGRESS, ep.task, images))
            voc_index.append((number, t / (ep.length - 1)))
    seed = cfg.samples.seed + 7919  # not the training draw: other frames of the held-out episodes
    completion = [
        (S.to_query(s, by_key, store), s.label == "yes")
        for s in S.build_samples(chosen, Modality.COMPLETION, cfg.samples, seed, balance="downsample")
    ]
    contrastive = [
        (S.to_query(s, by_key, store), s.label == "ImageB")
        for s in S.build_samples(chosen, Modality.CONTRASTIVE, cfg.samples, seed)
    ]
    summary = {
        "episodes": len(chosen),
        "successful": len(successes),
        "failed": len(chosen) - len(successes),
        "voc_queries": len(voc_queries),
        "completion_samples": len(completion),
        "contrastive_samples": len(contrastive),
    }
    return EvalItems(voc_queries, voc_index, completion, contrastive, summary)


def adapter_folders(name: str, spec: str) -> dict[str, str] | None:
    """modality -> adapter folder for one set; None for the bare base model."""
    if spec.strip().lower() == NO_ADAPTERS:
        return None
    folder = Path(spec).expanduser()
    if (folder / "adapter_config.json").is_file():
        raise ValueError(
            f"adapter set {name!r}: {folder} is a single adapter; give the folder that holds progress/, "
            "contrastive/ and completion/"
        )
    found = {m: str(folder / m) for m in T.ADAPTER_LAYOUT if (folder / m / "adapter_config.json").is_file()}
    if not found:
        raise ValueError(
            f"adapter set {name!r}: no adapters in {folder} (expected {', '.join(T.ADAPTER_LAYOUT)} "
            "subfolders with adapter_config.json; download the released ones with huggingface-cli first)"
        )
    return found


def evaluate(cfg: EvalConfig, engine_factory=None) -> dict:
    """Metrics for every adapter set; writes metrics.json, plots and report.html. Returns the metrics."""
    from lrm_reward.core.engine import EngineConfig, make_engine

    engine_factory = engine_factory or make_engine
    fingerprint = T.base_fingerprint(cfg.base_model, cfg.local_files_only)
    sets = {name: adapter_folders(name, spec) for name, spec in cfg.adapter_sets.items()}
    problems = [
        problem
        for folders in sets.values()
        for folder in (folders or {}).values()
        if (problem := T.adapter_base_mismatch(Path(folder), fingerprint))
    ]
    if problems:
        raise T.BaseModelMismatchError("adapters do not match the base model:\n  " + "\n  ".join(problems))
    episode_set, chosen = evaluation_episodes(cfg)
    items = build_items(cfg, episode_set, chosen)

    results: dict[str, dict] = {}
    for name, folders in sets.items():
        log.info("evaluating %s", name)
        server = {"backend": cfg.backend, "server_url": cfg.server_url, "allow_remote": cfg.allow_remote}
        server["server_required"] = True  # no server: stop with the reason, not score everything as failed
        if cfg.request_timeout_s is not None:
            server["request_timeout_s"] = cfg.request_timeout_s
        engine = engine_factory(
            EngineConfig(
                base_model=cfg.base_model,
                adapters=folders,
                device=cfg.device,
                dtype=cfg.dtype,
                max_batch_size=cfg.max_batch_size,
                local_files_only=cfg.local_files_only,
                **server,
            )
        )
        try:
            results[name] = score_set(engine, folders, cfg, items)
            results[name]["model_id"] = engine.model_id
        finally:
            engine.close()
    report = {
        "base_model": cfg.base_model,
        "adapter_sets": cfg.adapter_sets,
        "evaluation": items.episodes,
        "results": results,
    }
    write_report(cfg.output_dir, report, cfg.calibration_bins)
    return report


def score_set(engine, folders: dict[str, str] | None, cfg: EvalConfig, items: EvalItems) -> dict:
    def has(modality: Modality) -> bool:
        return modality in cfg.modalities and (folders is None or modality.value in folders)

    out: dict = {"unparsed": 0}
    if has(Modality.PROGRESS) and items.voc_queries:
        answers = engine.score(items.voc_queries)
        out["unparsed"] += _unparsed(answers)
        per_episode: dict[int, list[tuple[float, float]]] = {}
        for (number, time), answer in zip(items.voc_index, answers, strict=True):
            if answer.value is not None:
                per_episode.setdefault(number, []).append((float(answer.value), time))
        series = [
            (np.array([p for p, _ in v]), np.array([t for _, t in v]))
            for v in per_episode.values()
            if len(v) >= 2
        ]
        out["voc"] = M.value_order_correlation(series)
        out["voc_per_episode"] = [M.spearman(p, t) for p, t in series]
        errors = [abs(p - t) for v in per_episode.values() for p, t in v]
        out["progress_mae"] = float(np.mean(errors)) if errors else float("nan")
        out["progress_curves"] = [{"time": t.tolist(), "predicted": p.tolist()} for p, t in series]
    if has(Modality.COMPLETION) and items.completion:
        answers = engine.score([q for q, _ in items.completion])
        out["unparsed"] += _unparsed(answers)
        # an unreadable answer counts as the uninformed guess 0.5 (and as "no")
        probs = np.array([a.value if a.value is not None else 0.5 for a in answers], dtype=float)
        labels = np.array([y for _, y in items.completion])
        out["completion_accuracy"] = M.accuracy(probs > 0.5, labels)
        out["completion_f1"] = M.f1_score(probs > 0.5, labels)
        out["completion_ece"] = M.expected_calibration_error(
            np.clip(probs, 0, 1), labels, cfg.calibration_bins
        )
        out["completion_probabilities"] = probs.tolist()
        out["completion_labels"] = labels.astype(bool).tolist()
    if has(Modality.CONTRASTIVE) and items.contrastive:
        answers = engine.score([q for q, _ in items.contrastive])
        out["unparsed"] += _unparsed(answers)
        values = np.array([a.value if a.value is not None else 0.0 for a in answers], dtype=float)
        labels = np.array([y for _, y in items.contrastive])
        # value 0 (undecided or unreadable) is never right
        correct = np.where(labels, values > 0, values < 0)
        out["contrastive_accuracy"] = float(correct.mean())
    return out


def _unparsed(answers: list[Answer]) -> int:
    return sum(1 for a in answers if not a.parsed or a.value is None)


# --- report -------------------------------------------------------------------------------------------


def write_report(output_dir: Path, report: dict, calibration_bins: int = 10) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(_finite(report), indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: the report has no plots (pip install matplotlib)")
        (output_dir / "report.html").write_text(_html(report, []))
        return
    results = report["results"]
    names = list(results)
    plots: list[tuple[str, str]] = []
    for metric, title in METRIC_TITLES.items():
        values = [results[n].get(metric) for n in names]
        if all(v is None for v in values):
            continue
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.2))
        heights = [v if v is not None and math.isfinite(v) else 0.0 for v in values]
        bars = ax.bar(
            names,
            heights,
            color=["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3"][: len(names)] or None,
        )
        for bar, v in zip(bars, values, strict=True):
            label = "n/a" if v is None or not math.isfinite(v) else f"{v:.2f}"
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom"
            )
        ax.set_title(title, fontsize=9)
        if metric == "voc":
            ax.set_ylim(-1, 1.1)
            ax.axhline(0, color="black", linewidth=0.6)
        else:
            ax.set_ylim(0, 1.1)
        fig.tight_layout()
        fig.savefig(output_dir / f"{metric}.png", dpi=90)
        plt.close(fig)
        plots.append((metric, title))

    if any("completion_probabilities" in results[n] for n in names):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfectly calibrated")
        for n in names:
            if "completion_probabilities" in results[n]:
                conf, freq, _ = M.reliability_curve(
                    results[n]["completion_probabilities"], results[n]["completion_labels"], calibration_bins
                )
                ax.plot(conf, freq, "o-", label=n)
        ax.set_xlabel("predicted P(yes)")
        ax.set_ylabel("observed share of yes")
        ax.set_title("Completion reliability", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(output_dir / "completion_reliability.png", dpi=90)
        plt.close(fig)
        plots.append(("completion_reliability", "Completion reliability diagram"))

    if any(results[n].get("progress_curves") for n in names):
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, n in zip(axes[0], names, strict=True):
            for curve in results[n].get("progress_curves", []):
                ax.plot(curve["time"], curve["predicted"], alpha=0.7)
            ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
            ax.set_title(n, fontsize=9)
            ax.set_xlabel("normalized time")
            ax.set_ylim(-0.05, 1.05)
        axes[0][0].set_ylabel("predicted progress")
        fig.tight_layout()
        fig.savefig(output_dir / "progress_curves.png", dpi=90)
        plt.close(fig)
        plots.append(("progress_curves", "Predicted progress over held-out successful episodes"))

    (output_dir / "report.html").write_text(_html(report, plots))


def _html(report: dict, plots: list[tuple[str, str]]) -> str:
    results = report["results"]
    names = list(results)
    rows = []
    for metric in (*METRIC_TITLES, "unparsed"):
        if all(metric not in results[n] for n in names):
            continue
        cells = "".join(f"<td>{_fmt(results[n].get(metric))}</td>" for n in names)
        rows.append(f"<tr><th>{html.escape(metric)}</th>{cells}</tr>")
    header = "".join(
        f"<th>{html.escape(n)}<br><small>{html.escape(str(report['adapter_sets'][n]))}</small></th>"
        for n in names
    )
    images = "".join(
        f'<figure><img src="{m}.png" alt="{html.escape(t)}">'
        f"<figcaption>{html.escape(t)}</figcaption></figure>"
        for m, t in plots
    )
    evaluation = html.escape(json.dumps(report["evaluation"]))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Reward adapter evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
figure{{display:inline-block;margin:1em}}</style>
</head><body>
<h1>Reward adapter evaluation</h1>
<p>Base model: <code>{html.escape(report["base_model"])}</code></p>
<p>Held-out data: <code>{evaluation}</code></p>
<table><tr><th>metric</th>{header}</tr>{"".join(rows)}</table>
{images}
</body></html>
"""


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"
    return html.escape(str(value))


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrm-eval-reward",
        description="Evaluate reward adapter sets (released, trained, none) on held-out episodes.",
    )
    parser.add_argument("--config", type=Path, help="YAML or JSON evaluation config")
    parser.add_argument("--base-model", help="folder of the Qwen3-VL checkpoint the adapters sit on")
    parser.add_argument(
        "--adapters",
        action="append",
        metavar="NAME=FOLDER",
        help="an adapter set (folder with progress/ contrastive/ completion/), or NAME=none; repeatable",
    )
    parser.add_argument(
        "--split-from", type=Path, help="lrm-train-reward output folder: its held-out episodes"
    )
    parser.add_argument("--dataset", action="append", help="LeRobotDataset folder (repeatable)")
    parser.add_argument("--labels", type=Path, help="JSON/CSV episode->success file (for a single --dataset)")
    parser.add_argument("--all-episodes", action="store_true", help="evaluate on every episode (unseen data)")
    parser.add_argument("--output-dir", type=Path, help="where metrics.json, the plots and report.html go")
    parser.add_argument("--device")
    parser.add_argument("--max-batch-size", type=int)
    add_backend_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    raw: dict = T.read_config_file(args.config) if args.config else {}
    base = args.config.resolve().parent if args.config else None
    if args.base_model:
        raw["base_model"] = args.base_model
    if args.adapters:
        sets = {}
        for item in args.adapters:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--adapters wants NAME=FOLDER (or NAME=none), got {item!r}")
            sets[name] = folder
        raw["adapter_sets"] = sets
    if args.split_from:
        raw["split_from"] = str(args.split_from)
    if args.dataset:
        if args.labels and len(args.dataset) != 1:
            raise ValueError("--labels goes with exactly one --dataset")
        raw["datasets"] = [
            {"root": d, "labels": str(args.labels) if args.labels else None} for d in args.dataset
        ]
    if args.all_episodes:
        raw["episodes"] = "all"
    if args.output_dir:
        raw["output_dir"] = str(args.output_dir)
    if args.device:
        raw["device"] = args.device
    if args.max_batch_size:
        raw["max_batch_size"] = args.max_batch_size
    server = backend_settings(args)
    server.pop("server_required", None)  # evaluate() always requires the server
    raw.update(server)
    if "adapter_sets" not in raw and raw.get("split_from"):
        raw["adapter_sets"] = {"trained": raw["split_from"], "base": NO_ADAPTERS}
    if base is not None:
        if isinstance(raw.get("base_model"), str):
            raw["base_model"] = T._resolve(raw["base_model"], base, only_if_exists=True)
        for key in ("split_from", "output_dir"):
            if isinstance(raw.get(key), str):
                raw[key] = T._resolve(raw[key], base)
        if isinstance(raw.get("adapter_sets"), dict):
            raw["adapter_sets"] = {
                k: v if str(v).lower() == NO_ADAPTERS else T._resolve(str(v), base)
                for k, v in raw["adapter_sets"].items()
            }
    raw["datasets"] = [T._dataset_spec(d, base) for d in raw.get("datasets", [])]
    missing = [k for k in ("base_model", "adapter_sets", "output_dir") if k not in raw]
    if missing:
        raise ValueError(
            f"missing settings: {missing} (use --base-model, --adapters/--split-from, --output-dir)"
        )
    return T._build(EvalConfig, raw, "evaluation config")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        report = evaluate(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lrm-eval-reward: {exc}", file=sys.stderr)
        return 2
    except T.BaseModelMismatchError as exc:
        print(f"lrm-eval-reward: base model mismatch: {exc}", file=sys.stderr)
        return 3
    except RuntimeError as exc:  # e.g. the engine's ModelLoadError
        print(f"lrm-eval-reward: {exc}", file=sys.stderr)
        return 1
    names = list(report["results"])
    print(f"{'metric':<22}" + "".join(f"{n:>14}" for n in names))
    for metric in METRIC_TITLES:
        if any(metric in report["results"][n] for n in names):
            print(f"{metric:<22}" + "".join(f"{_fmt(report['results'][n].get(metric)):>14}" for n in names))
    print(f"report: {cfg.output_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
