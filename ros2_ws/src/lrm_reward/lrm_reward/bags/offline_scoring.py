"""`lrm-score`: dense rewards for every frame of a dataset (or of a bag, imported first), offline.

What it is for: the reward node scores the camera stream live, but a bag recorded without it, or a
dataset recorded before the reward model got better, has no (or old) rewards. This asks the reward
engine (core/engine.py, loaded as lrm-judge loads it) for progress against the episode's first frame on
every k-th frame of every episode (k = 1: every frame), fills the frames between by lerobot's
`interpolate_progress`, and writes:

(a) a per-frame parquet in lerobot's progress schema (index, episode_index, frame_index, progress_sparse;
    `reward_model_path` in the schema metadata) -- written by refinement/dense_weights.py's
    `write_progress_parquet`, the same writer lrm-refine uses, so lerobot's RA-BC sample weighting
    (`--sample_weighting.type=rabc --sample_weighting.progress_path=...`) and lrm-refine read it;
(b) optionally, for a bag, a copy of the bag with one lrm_interfaces/RewardSignal per dataset frame on
    the reward node's topic (default /reward_node/reward), at the receive time of the camera frame it
    scores, so PlotJuggler and rqt_bag show the rewards beside the original topics.

Frames that were scored have queried=true; the frames between carry the interpolated values with
held=true. With `completion` each scored frame is also asked for P(done) (completion_prob; NaN
otherwise, as the reward node sends "not asked").

What it is not: no judging (judge.py decides success), no ROS (rosbags writes the bag copy).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.core.types import Answer, Modality, Query

log = logging.getLogger(__name__)

PROGRESS_FILE = "lrm_progress.parquet"  # beside lerobot's own sarm_progress.parquet, never over it
REWARD_TOPIC = "/reward_node/reward"  # where reward_node publishes (~/reward)
REWARD_TYPE = "lrm_interfaces/msg/RewardSignal"
SOURCE_SCORED = "lrm-score"  # the per-episode progress source written into the parquet's metadata


@dataclass
class ScoreConfig:
    every_k: int = 1  # progress asked on every k-th frame (and the last); the rest interpolated
    completion: bool = False  # also ask P(done) on each scored frame
    camera: str | None = None  # observation.images.<camera> to score; None: the first
    max_queries_per_call: int = 16

    def __post_init__(self) -> None:
        if self.every_k < 1:
            raise ValueError("ScoreConfig.every_k must be >= 1")
        if self.max_queries_per_call < 1:
            raise ValueError("ScoreConfig.max_queries_per_call must be >= 1")


@dataclass
class EpisodeScores:
    episode_index: int
    start: int  # global index of the first frame
    task: str
    scored: np.ndarray  # frame indices (within the episode) that were asked
    progress: np.ndarray  # float32 per frame, interpolated between scored frames; NaN if none parsed
    completion: np.ndarray  # float32 per frame at the scored frames; NaN elsewhere / not asked
    unparsed: np.ndarray  # per frame: answers of that frame that did not parse
    parsed: int  # scored frames whose progress answer parsed


@dataclass
class DatasetScores:
    root: Path
    model_id: str
    camera: str
    episodes: dict[int, EpisodeScores] = field(default_factory=dict)


def score_dataset(dataset_root: Path | str, engine, cfg: ScoreConfig | None = None) -> DatasetScores:
    """Score every episode of a recorded (or imported) dataset with `engine` (core RewardEngine API)."""
    from lerobot.rewards.sarm.compute_rabc_weights import interpolate_progress

    from lrm_reward.refinement.judge import EpisodeFrames, curve_frame_indices

    cfg = cfg or ScoreConfig()
    frames = EpisodeFrames(Path(dataset_root), cfg.camera)
    out = DatasetScores(frames.root, str(getattr(engine, "model_id", "unknown")), frames.camera_key)
    for e in range(frames.num_episodes):
        n = frames.episode_length(e)
        task = frames.task(e)
        start = int(frames.ds.meta.episodes[e]["dataset_from_index"])
        asked = curve_frame_indices(n, cfg.every_k)
        initial = frames.frame(e, 0)
        images = {i: initial if i == 0 else frames.frame(e, i) for i in asked}
        queries = [Query(Modality.PROGRESS, task, [initial, images[i]]) for i in asked]
        if cfg.completion:
            queries += [Query(Modality.COMPLETION, task, [images[i]]) for i in asked]
        answers: list[Answer] = []
        for at in range(0, len(queries), cfg.max_queries_per_call):
            answers.extend(engine.score(queries[at : at + cfg.max_queries_per_call]))
        if len(answers) != len(queries):
            raise RuntimeError(f"engine returned {len(answers)} answers for {len(queries)} queries")
        progress_at = np.array([_value(a) for a in answers[: len(asked)]], dtype=np.float64)
        unparsed = np.zeros(n, dtype=np.int32)
        for j, a in enumerate(answers):
            if not np.isfinite(_value(a)):
                unparsed[asked[j % len(asked)]] += 1
        completion = np.full(n, np.nan, np.float32)
        if cfg.completion:
            completion[asked] = [_value(a) for a in answers[len(asked) :]]
        progress = interpolate_progress(np.asarray(asked), progress_at, np.arange(n))  # NaN: none parsed
        out.episodes[e] = EpisodeScores(
            e,
            start,
            task,
            np.asarray(asked),
            progress,
            completion,
            unparsed,
            int(np.isfinite(progress_at).sum()),
        )
        log.info("episode %d: %d frames, %d scored, final progress %.3f", e, n, len(asked), progress[-1])
    return out


def _value(a: Answer) -> float:
    return float(a.value) if a.parsed and a.value is not None and np.isfinite(a.value) else float("nan")


def write_progress(scores: DatasetScores, path: Path | None = None) -> Path:
    """(a): the per-frame parquet in lerobot's progress schema (default <dataset>/lrm_progress.parquet)."""
    from lrm_reward.refinement.dense_weights import (
        SOURCE_NONE,
        DatasetProgress,
        EpisodeProgress,
        write_progress_parquet,
    )

    progress = DatasetProgress(scores.root, reward_model=f"lrm-score:{scores.model_id}")
    for e, ep in scores.episodes.items():
        source = SOURCE_SCORED if ep.parsed else SOURCE_NONE
        progress.episodes[e] = EpisodeProgress(e, ep.start, ep.progress, source, ep.parsed)
    return write_progress_parquet(progress, Path(path) if path else scores.root / PROGRESS_FILE)


# ------------------------------------------------------------------------------------------ bag copy
def write_bag_with_rewards(
    source_bag: Path, destination: Path, scores: DatasetScores, topic: str = REWARD_TOPIC
) -> int:
    """(b): copy `source_bag` to `destination` (same storage) with one RewardSignal per dataset frame added
    on `topic`. The dataset must have been imported from this bag (its sidecars' provenance says which
    topic and time window each episode came from). Returns the number of RewardSignals written."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    from lrm_reward.bags.bag_source import BagError, BagSource, default_typestore

    store = default_typestore()
    RewardSignal = store.types[REWARD_TYPE]
    Time = store.types["builtin_interfaces/msg/Time"]
    Header = store.types["std_msgs/msg/Header"]
    source_bag, destination = Path(source_bag), Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} exists already")
    camera = scores.camera.removeprefix("observation.images.")
    rewards: list[tuple[int, bytes]] = []  # (bag time ns, serialized RewardSignal)
    with BagSource(source_bag) as src:
        for e, ep in sorted(scores.episodes.items()):
            side = _sidecar(scores.root, e)
            prov = side.get("provenance") or {}
            if Path(prov.get("bag", "")).resolve() != source_bag.resolve():
                raise ValueError(f"episode {e} of {scores.root} was not imported from {source_bag}")
            cam_topic = prov["topics"][scores.camera]
            stamps, times = _camera_times(src, cam_topic, prov["window_ns"], prov.get("stamps", "header"))
            t0, fps = float(side["dataset_t0_s"]), int(side["fps"])
            scored = set(int(i) for i in ep.scored)
            last_scored = 0
            for k in range(len(ep.progress)):
                frame_t = t0 + k / fps
                pick = int(np.searchsorted(stamps, frame_t + 1e-6, side="right")) - 1
                if pick < 0:
                    raise BagError(source_bag, f"no camera message at or before frame {k}", cam_topic)
                if k in scored:
                    last_scored = k
                progress, completion = float(ep.progress[k]), float(ep.completion[k])
                msg = RewardSignal(
                    header=Header(stamp=_time(Time, frame_t), frame_id=camera),
                    scored_stamp=_time(Time, t0 + last_scored / fps),
                    stream=camera,
                    task=ep.task,
                    episode_id=e,
                    frame_index=k,
                    progress=progress,
                    contrastive=float("nan"),
                    completion_prob=completion,
                    completed=bool(np.isfinite(completion) and completion >= 0.5),
                    reward=progress,
                    held=k not in scored,
                    queried=k in scored,
                    student=False,
                    unparsed=int(ep.unparsed[k]),
                    model_id=scores.model_id,
                    query_latency=float("nan"),
                )
                rewards.append((int(times[pick]), bytes(store.serialize_cdr(msg, REWARD_TYPE))))
        rewards.sort(key=lambda r: r[0])
        if topic in src.topics:
            raise ValueError(f"{source_bag} has a {topic} topic already: choose another --reward-topic")
        plugin = {"mcap": StoragePlugin.MCAP, "sqlite3": StoragePlugin.SQLITE3}.get(
            src.storage, StoragePlugin.MCAP
        )
        tmp = destination.with_name(f".{destination.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        reader = src._reader
        try:
            with Writer(tmp, version=9, storage_plugin=plugin) as writer:
                out_conns = {}
                for conn in reader.connections:
                    key = (conn.topic, conn.msgtype)
                    if key not in out_conns:
                        out_conns[key] = writer.add_connection(
                            conn.topic,
                            conn.msgtype,
                            msgdef=conn.msgdef.data,
                            rihs01=conn.digest,
                            offered_qos_profiles=getattr(conn.ext, "offered_qos_profiles", ()),
                        )
                reward_conn = writer.add_connection(topic, REWARD_TYPE, typestore=store)
                pending = iter(rewards)
                nxt = next(pending, None)
                for conn, time_ns, raw in reader.messages():
                    while nxt is not None and nxt[0] <= time_ns:
                        writer.write(reward_conn, *nxt)
                        nxt = next(pending, None)
                    writer.write(out_conns[(conn.topic, conn.msgtype)], time_ns, raw)
                while nxt is not None:
                    writer.write(reward_conn, *nxt)
                    nxt = next(pending, None)
            tmp.rename(destination)  # the copy appears whole or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return len(rewards)


def _camera_times(src, topic: str, window: list[int], stamps: str) -> tuple[np.ndarray, np.ndarray]:
    """(stamp s, receive time ns) of a camera topic in an episode window, ordered by stamp."""
    pairs = []
    for _, _, time_ns, msg in src.messages([topic], int(window[0]), int(window[1])):
        header = getattr(msg, "header", None)
        stamp = time_ns * 1e-9
        if stamps == "header" and header is not None and (header.stamp.sec or header.stamp.nanosec):
            stamp = header.stamp.sec + header.stamp.nanosec * 1e-9
        pairs.append((stamp, time_ns))
    pairs.sort()
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=np.int64)


def _time(Time, seconds: float):
    sec = int(np.floor(seconds))
    return Time(sec=sec, nanosec=min(round((seconds - sec) * 1e9), 999_999_999))


def _sidecar(root: Path, episode: int) -> dict:
    path = Path(root) / "recording" / f"episode_{episode:06d}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"episode {episode}: no readable recording sidecar ({path}: {exc})") from None


# ------------------------------------------------------------------------------------------ CLI
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-score",
        description="Dense per-frame rewards for a dataset, or for a bag (imported first), with the reward "
        "model: a parquet in lerobot's progress schema, and optionally a copy of the bag with RewardSignals.",
    )
    p.add_argument("input", type=Path, help="a dataset folder, or a rosbag2 bag (folder, .mcap or .db3)")
    p.add_argument("--model", required=True, help="base model folder or Hub id (Qwen3-VL)")
    p.add_argument("--adapters", default=None, help="'progress=DIR,completion=DIR' or a folder of adapters")
    p.add_argument("--processor", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument(
        "--every-k", type=int, default=1, help="ask every k-th frame, interpolate between (1: all)"
    )
    p.add_argument("--completion", action="store_true", help="also ask P(done) on each scored frame")
    p.add_argument("--camera", default=None, help="camera name (default: the first)")
    p.add_argument("--output", type=Path, default=None, help=f"parquet (default: <dataset>/{PROGRESS_FILE})")
    p.add_argument(
        "--bag-out", type=Path, default=None, help="bag input: write a copy with RewardSignals here"
    )
    p.add_argument("--reward-topic", default=REWARD_TOPIC, help="topic of the RewardSignals in --bag-out")
    p.add_argument("--dataset-out", type=Path, default=None, help="bag input: keep the imported dataset here")
    p.add_argument("--mapping", type=Path, default=None, help="bag input: lrm-import-bag's mapping YAML")
    p.add_argument("--task", default=None, help="bag input: the task (see lrm-import-bag)")
    p.add_argument("--fps", type=int, default=None, help="bag input: dataset frame rate")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lrm_reward.bags.importer import ImportConfig, import_bags
    from lrm_reward.bags.mapping import MappingError, load_mapping
    from lrm_reward.refinement.judge import parse_adapters

    is_dataset = (args.input / "meta" / "info.json").exists()
    if not is_dataset and not args.input.exists():
        print(f"lrm-score: {args.input} does not exist", file=sys.stderr)
        return 2
    if args.bag_out is not None and is_dataset:
        print(
            "lrm-score: --bag-out needs a bag as input (the dataset's own bag is not known)", file=sys.stderr
        )
        return 2
    try:
        cfg = ScoreConfig(every_k=args.every_k, completion=args.completion, camera=args.camera)
        adapters = parse_adapters(args.adapters)
    except ValueError as exc:
        print(f"lrm-score: {exc}", file=sys.stderr)
        return 2
    scratch = None
    dataset = args.input
    if not is_dataset:
        try:
            spec = load_mapping(args.mapping)
        except MappingError as exc:
            print(f"lrm-score: {exc}", file=sys.stderr)
            return 2
        overrides = {k: v for k, v in (("task", args.task), ("fps", args.fps)) if v is not None}
        if overrides:
            from dataclasses import replace

            spec = replace(spec, **overrides)
        if args.dataset_out is None:
            scratch = Path(tempfile.mkdtemp(prefix="lrm-score-"))
            dataset = scratch / "imported"
        else:
            dataset = args.dataset_out
        report = import_bags([args.input], ImportConfig(dataset, spec))
        if report.dataset is None:
            print(f"lrm-score: {report.message}", file=sys.stderr)
            return 1
        print(report.message)
    from lrm_reward.core.engine import EngineConfig, make_engine
    from lrm_reward.core.loading import ModelLoadError

    try:
        engine = make_engine(
            EngineConfig(
                base_model=args.model, adapters=adapters, device=args.device, dtype=args.dtype,
                processor=args.processor,
            )
        )  # fmt: skip
    except (ModelLoadError, ValueError) as exc:
        print(f"lrm-score: cannot load the reward model: {exc}", file=sys.stderr)
        return 1
    try:
        scores = score_dataset(dataset, engine, cfg)
        output = args.output
        if output is None and scratch is not None:
            output = args.input.with_name(args.input.name + ".progress.parquet")
        path = write_progress(scores, output)
        frames = sum(len(e.progress) for e in scores.episodes.values())
        print(f"{frames} frames of {len(scores.episodes)} episode(s) scored: {path}")
        if args.bag_out is not None:
            count = write_bag_with_rewards(args.input, args.bag_out, scores, args.reward_topic)
            print(f"{args.bag_out}: copy of {args.input} with {count} RewardSignals on {args.reward_topic}")
    finally:
        engine.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
