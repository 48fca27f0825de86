"""The refinement report: an HTML page with PNG plots and a text summary, one per refinement run.

Written to <store>/<policy>/reports/<version>/ (index.html, summary.txt, rewards.png, nights.png,
loss.png), outside the checksummed version folder so versions stay immutable. Plots: progress curves of
kept (full weight), progress-weighted and rejected episodes, kept/rejected counts per night (from the
store history), training loss, and for each judged dataset with operator labels the judge-vs-operator
plot of lrm-judge (calibration.py). The summary says which selection was used (filter / weighting /
both), how many episodes and frames, how the frame weights are applied and how they are distributed.

What it is not: no judging or training; matplotlib (Agg backend) only, imported lazily.
"""

from __future__ import annotations

import datetime as _dt
import html
import itertools
import math
import shutil
from pathlib import Path

from lrm_reward.refinement.policy_store import PolicyStore, PolicyVersion


def write_report(store: PolicyStore, version: PolicyVersion, selection, losses: list[float]) -> Path:
    """Write the report of one run; returns the path of index.html."""
    out = store.dir / "reports" / version.version
    out.mkdir(parents=True, exist_ok=True)
    history = store.history()
    _plot_rewards(out / "rewards.png", selection.kept, selection.rejected)
    if selection_weighting(selection).get("weights"):
        _plot_weights(out / "weights.png", selection_weighting(selection))
    _plot_nights(out / "nights.png", history)
    _plot_loss(out / "loss.png", losses)
    agreement = _operator_agreement(out, selection)
    summary = summary_text(version, selection, losses, history, agreement)
    (out / "summary.txt").write_text(summary)
    (out / "index.html").write_text(_html(version, selection, summary, [png for _, png in agreement]))
    return out / "index.html"


def _operator_agreement(out: Path, selection) -> list[tuple[str, str]]:
    """(summary line, plot file name in `out`) per judged dataset that lrm-judge compared with labels."""
    from lrm_reward.refinement.calibration import calibration_paths, load_calibration

    found = []
    judged = sorted({r["dataset"] for r in selection.kept + selection.rejected if r["source"] == "judged"})
    for dataset in judged:
        cal = load_calibration(dataset)
        if not cal or "summary" not in cal:
            continue
        _, plot = calibration_paths(dataset)
        name = f"calibration_{Path(dataset).name}.png" if plot.exists() else ""
        if name:
            shutil.copyfile(plot, out / name)
        found.append((f"judge vs operator, {Path(dataset).name}: {cal['summary']}", name))
    return found


def summary_text(
    version: PolicyVersion,
    selection,
    losses: list[float],
    history: list[dict],
    agreement: list[tuple[str, str]] = (),
) -> str:
    weighted = [r for r in selection.kept if r.get("weight") == "progress"]
    judged_kept = [r for r in selection.kept if r["source"] == "judged" and r not in weighted]
    demos = [r for r in selection.kept if r["source"] == "demo"]
    reasons: dict[str, int] = {}
    for r in selection.rejected:
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    mode = getattr(selection, "mode", None)
    lines = [f"policy {version.ref}"]
    if mode:
        lines.append(f"selection: {mode} ({SELECTION_WORDS.get(mode, mode)})")
    lines += [
        f"episodes used: {selection.num_episodes} ({len(judged_kept)} judged successes, "
        + (f"{len(weighted)} weighted by progress, " if mode not in (None, "filter") else "")
        + f"{len(demos)} demonstrations)",
        f"episodes rejected: {len(selection.rejected)}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})" if reasons else ""),
    ]
    lines += _weighting_lines(selection_weighting(selection))
    if losses:
        lines.append(f"training: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if len(history) > 1:
        lines.append(
            f"runs so far: {len(history)}; successes kept per run: {[h.get('kept', 0) for h in history]}"
            + (
                f"; weighted by progress per run: {[h.get('weighted', 0) for h in history]}"
                if any(h.get("weighted") for h in history)
                else ""
            )
        )
    lines += [line for line, _ in agreement]
    return "\n".join(lines) + "\n"


SELECTION_WORDS = {
    "filter": "judged successes only, every frame at weight 1",
    "weighting": "every episode, each frame weighted by the progress it made (RA-BC)",
    "both": "judged successes at weight 1, the other episodes weighted by progress (RA-BC)",
}


def selection_weighting(selection) -> dict:
    return getattr(selection, "weighting", None) or {}


def _weighting_lines(info: dict) -> list[str]:
    if not info:
        return []
    lines = [f"frame weights applied by: {info.get('mechanism', '?')}"]
    frames, w = info.get("frames"), info.get("weights")
    if frames and w and w.get("frames"):
        lines.append(
            f"frames: {w['frames']} ({frames.get('full', 0)} at full weight, {frames.get('progress', 0)} "
            f"weighted by progress over the next {info.get('chunk_size')} frames, "
            f"floor {info.get('min_frame_weight')})"
        )
        lines.append(
            f"weights: min {w['min']:.2f}, p10 {w['p10']:.2f}, median {w['median']:.2f}, "
            f"mean {w['mean']:.2f}, p90 {w['p90']:.2f}, max {w['max']:.2f}; {w['at_floor']:.0%} at the "
            f"floor, {w['at_full']:.0%} at 1; effective frames {w['effective_frames']:.0f} of {w['frames']}"
        )
        p = info.get("progress_weights") or {}
        if p.get("frames"):
            lines.append(
                f"weighted frames alone: mean {p['mean']:.2f}, median {p['median']:.2f}, "
                f"{p['at_floor']:.0%} at the floor, {p['at_full']:.0%} at 1"
            )
    for root, sources in sorted((info.get("progress_sources") or {}).items()):
        lines.append(
            f"progress of {Path(root).name} from: {', '.join(f'{k} {v}' for k, v in sorted(sources.items()))}"
        )
    for path in sorted((info.get("progress_files") or {}).values()):
        lines.append(f"RA-BC progress for lerobot-train: {path}")
    return lines


def _plot_weights(path: Path, info: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    hist = info.get("histogram") or {}
    if hist.get("counts"):
        edges = hist["edges"]
        ax.bar(edges[:-1], hist["counts"], width=[b - a for a, b in itertools.pairwise(edges)], align="edge")
    ax.set_xlabel("frame weight")
    ax.set_ylabel("frames")
    ax.set_title(f"frame weights ({info.get('mechanism', '')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_rewards(path: Path, kept: list[dict], rejected: list[dict]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    weighted = [r for r in kept if r.get("weight") == "progress"]
    full = [r for r in kept if r.get("weight") != "progress"]
    groups = (
        (rejected, "tab:red", "rejected"),
        (weighted, "tab:orange", "weighted"),
        (full, "tab:green", "kept"),
    )
    for rows, color, label in groups:
        first = True
        for r in rows:
            curve, frames = r.get("curve"), r.get("curve_frames")
            if not curve or not frames:
                continue
            last = max(frames[-1], 1)
            xs = [f / last for f in frames]
            ys = [float("nan") if c is None else c for c in curve]
            ax.plot(xs, ys, color=color, alpha=0.6, label=label if first else None)
            first = False
    ax.set_xlabel("episode time (fraction)")
    ax.set_ylabel("progress")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("reward curves: kept, weighted by progress, rejected")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_nights(path: Path, history: list[dict]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    labels = [str(h.get("run_at", "?"))[:16].replace("T", " ") for h in history]
    xs = list(range(len(history)))
    kept = [h.get("kept", 0) for h in history]
    weighted = [h.get("weighted", 0) for h in history]
    rejected = [h.get("rejected", 0) for h in history]
    ax.bar(xs, kept, color="tab:green", label="kept (judged successes)")
    if any(weighted):
        ax.bar(xs, weighted, bottom=kept, color="tab:orange", label="weighted by progress")
    below = [k + w for k, w in zip(kept, weighted, strict=True)]
    ax.bar(xs, rejected, bottom=below, color="tab:red", alpha=0.6, label="rejected")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("episodes")
    ax.set_title("episodes per refinement run")
    if history:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_loss(path: Path, losses: list[float]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    finite = [(i + 1, v) for i, v in enumerate(losses) if math.isfinite(v)]
    if finite:
        ax.plot([i for i, _ in finite], [v for _, v in finite], color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("fine-tuning loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _html(version: PolicyVersion, selection, summary: str, agreement_plots: list[str]) -> str:
    rows = []
    for r in sorted(selection.kept + selection.rejected, key=lambda r: (r["dataset"], r["episode_index"])):
        status = "kept" if r in selection.kept else f"rejected: {r.get('reason', '')}"
        if r.get("weight") == "progress":
            status = f"weighted by progress ({r.get('weighted_because') or 'judged success'})"
        conf = r.get("confidence")
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    Path(r["dataset"]).name,
                    r["episode_index"],
                    r.get("task", ""),
                    r["source"],
                    r.get("verdict", ""),
                    "" if conf is None else f"{conf:.2f}",
                    status,
                )
            )
            + "</tr>"
        )
    generated = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>lrm refinement {html.escape(version.ref)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>Refinement report: {html.escape(version.ref)}</h1>
<pre>{html.escape(summary)}</pre>
<img src="rewards.png" alt="reward curves"> <img src="nights.png" alt="episodes per run">
<img src="loss.png" alt="loss curve">
{'<img src="weights.png" alt="frame weights">' if selection_weighting(selection).get("weights") else ""}
{"".join(f'<img src="{html.escape(p)}" alt="judge vs operator labels">' for p in agreement_plots if p)}
<h2>Episodes</h2>
<table><tr><th>dataset</th><th>episode</th><th>task</th><th>source</th><th>verdict</th><th>confidence</th>
<th>status</th></tr>
{"".join(rows)}
</table>
<p>generated {generated}</p>
</body></html>
"""
