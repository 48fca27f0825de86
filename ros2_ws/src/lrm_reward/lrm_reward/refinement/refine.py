"""Fine-tune the current policy on judged episodes and store the result as a new policy version.

What it is for: the nightly step after judging (arXiv 2603.16065, real-robot self-improvement: the
episodes the reward model judges successful are added to the imitation data and the policy is
refined). Steps: take the store lock; select episodes (judged successes of the given datasets, minus
partial ones and ones the operator labelled failure, plus every episode of optional demonstration
datasets); with `selection` "weighting" or "both", also the other episodes, each frame weighted by the
progress the reward model saw (RA-BC, dense_weights.py: by weighted sampling for policies such as ACT
whose forward has no per-sample loss, by lerobot's per-sample loss weighting otherwise); open them as
filtered LeRobotDataset views (`episodes=[...]`, no copying); continue training
the current version (any lerobot policy type; from scratch only on request); write the new version
through PolicyStore (staging folder, checksums, atomic rename) and promote it to `current` only after
a clean finish; append to the store history; write the report.

What it is not: no judging (judge.py), no recording, no hub, no wandb.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lrm_reward.refinement import dense_weights
from lrm_reward.refinement.judge import load_judgments
from lrm_reward.refinement.policy_store import (
    CorruptCheckpointError,
    PolicyStore,
    PolicyVersion,
    load_policy,
)
from lrm_reward.refinement.selection import Selection, select_episodes

log = logging.getLogger(__name__)

REFINE_VERSION = "lrm-refine/1"
OBSERVATION_PREFIX = "observation."


LR_CONSTANT = "constant"
LR_COSINE = "cosine"
LR_SCHEDULES = (LR_CONSTANT, LR_COSINE)
WARMUP_FRACTION = 0.05


class NothingToTrainError(RuntimeError):
    """No episode passed the selection."""


@dataclass
class RefineConfig:
    store_root: Path
    policy_name: str
    datasets: list[Path] = field(default_factory=list)  # judged recordings: their successes are used
    demos: list[Path] = field(default_factory=list)  # demonstrations: every episode is used
    steps: int = 2000
    batch_size: int = 8
    lr: float | None = None  # None: the policy config's optimizer_lr
    # constant: lr for every step; cosine: a linear warmup, then cosine decay to zero by the last step
    # (lerobot's CosineDecayWithWarmupSchedulerConfig), so the version ends where small steps settled it
    # rather than wherever the last full-size step threw it.
    lr_schedule: str = LR_CONSTANT
    warmup_steps: int | None = None  # cosine: None = 5 % of the steps
    weight_decay: float | None = None
    grad_clip_norm: float = 10.0
    num_workers: int = 0
    device: str = "cpu"
    seed: int = 0
    min_confidence: float = 0.0  # judged successes below this confidence are left out (or weighted)
    # filter: judged successes only; weighting: every episode, each frame weighted by progress (RA-BC);
    # both: judged successes at full weight, the other episodes weighted. "filter" is also the lrm-refine
    # command's default: the one selection whose gain held over seeds (docs/refinement.md).
    selection: str = dense_weights.SELECTION_FILTER
    min_frame_weight: float = 0.05  # floor under a weighted frame: failures weigh little, not nothing
    include_partial: bool = False  # use episodes the recorder marked partial
    respect_operator_labels: bool = True  # an operator "failure" label overrides a judged success
    from_scratch: bool = False  # no current version yet: build a new policy of policy_type
    policy_type: str = "act"
    policy_overrides: dict = field(default_factory=dict)  # config fields for a from-scratch policy
    # The observation features the policy reads (e.g. observation.state + observation.environment_state
    # for a fast state-only policy while the images stay in the data for the judge). None: every
    # observation feature of the data for a from-scratch policy, the parent's inputs otherwise; a
    # refinement always keeps the parent's inputs (a different set here is refused).
    policy_inputs: tuple[str, ...] | None = None
    # Fetch every selected frame once and train from memory (frame access through LeRobotDataset costs
    # tens of ms, more than a small policy's training step). For small runs: the cached frames hold only
    # the features the policy reads (no images for a state-only policy), but all of them, in RAM.
    cache_frames: bool = False
    promote: bool = True
    report: bool = True
    progress_bar: bool = True
    log_every: int = 10

    def __post_init__(self) -> None:
        self.store_root = Path(self.store_root)
        self.datasets = [Path(p) for p in self.datasets]
        self.demos = [Path(p) for p in self.demos]
        if self.steps < 1:
            raise ValueError("RefineConfig.steps must be >= 1")
        if self.batch_size < 1:
            raise ValueError("RefineConfig.batch_size must be >= 1")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ValueError("RefineConfig.min_confidence must be in [0, 1]")
        if self.selection not in dense_weights.SELECTIONS:
            raise ValueError(f"RefineConfig.selection must be one of {dense_weights.SELECTIONS}")
        if not 0.0 < self.min_frame_weight <= 1.0:
            raise ValueError("RefineConfig.min_frame_weight must be in (0, 1]")
        if not self.datasets and not self.demos:
            raise ValueError("RefineConfig: give at least one judged dataset or demonstration dataset")
        if self.lr is not None and self.lr <= 0:
            raise ValueError("RefineConfig.lr must be > 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"RefineConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise ValueError("RefineConfig.warmup_steps must be >= 0 and below steps")
        if self.policy_inputs is not None:
            if isinstance(self.policy_inputs, str):
                raise ValueError(
                    "RefineConfig.policy_inputs must be a sequence of feature names, not a string"
                )
            self.policy_inputs = tuple(str(k) for k in self.policy_inputs)
            bad = [k for k in self.policy_inputs if not k.startswith(OBSERVATION_PREFIX)]
            if not self.policy_inputs or bad or len(set(self.policy_inputs)) != len(self.policy_inputs):
                raise ValueError(
                    "RefineConfig.policy_inputs must be distinct observation feature names "
                    f"(observation.state, observation.images.<camera>, ...), got {self.policy_inputs}"
                )


@dataclass
class RefineResult:
    version: PolicyVersion
    promoted: bool
    parent: str | None
    selection: Selection
    losses: list[float]
    report: Path | None


def refine(cfg: RefineConfig, on_step=None) -> RefineResult:
    """Run one refinement. Raises StoreBusyError, CorruptCheckpointError, NothingToTrainError, ValueError.

    on_step(step, loss) is called after every optimizer step (progress reporting, tests).
    """
    store = PolicyStore(cfg.store_root, cfg.policy_name)
    with store:
        cleaned = store.clean_staging()
        if cleaned:
            log.warning("removed unfinished runs from %s: %s", store.dir / ".staging", cleaned)
        parent = store.current()
        if parent is None and not cfg.from_scratch:
            raise CorruptCheckpointError(
                f"policy store {store.dir} has no current version: pass --from-scratch to start one"
            )
        selection = select_episodes(cfg)
        if selection.num_episodes == 0:
            raise NothingToTrainError(
                f"no episode selected ({len(selection.rejected)} rejected: "
                f"{sorted({r['reason'] for r in selection.rejected})})"
            )
        started = time.time()
        import torch

        torch.manual_seed(cfg.seed)  # before a from-scratch policy draws its initial weights
        policy, pre, post, policy_cfg = _load_or_build(cfg, parent, selection)
        datasets = _open_datasets(selection, policy_cfg)
        weights = dense_weights.training_weights(selection, datasets, policy, cfg.min_frame_weight)
        losses = _train(cfg, policy, pre, datasets, on_step, weights)
        staging = store.new_staging_dir()
        policy.save_pretrained(staging)
        pre.save_pretrained(staging)
        post.save_pretrained(staging)
        metadata = {
            "schema": "lrm.policy_version/1",
            "created_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "refine_version": REFINE_VERSION,
            "parent": parent.ref if parent else None,
            "policy_type": policy_cfg.type,
            "policy_inputs": list(policy_cfg.input_features),
            "datasets": {k: sorted(v) for k, v in selection.episodes.items()},
            "num_episodes": selection.num_episodes,
            "num_frames": sum(len(d) for d in datasets),
            "selection": {
                "mode": selection.mode,
                "kept": [_brief(r) for r in selection.kept],
                "rejected": [_brief(r) for r in selection.rejected],
                "weighting": selection.weighting,
            },
            "judge_thresholds": _judge_thresholds(cfg.datasets),
            "training": _training_config(cfg),
            "losses": losses,
            "final_loss": losses[-1] if losses else None,
            "duration_s": time.time() - started,
        }
        version = store.commit(staging, metadata)
        if cfg.promote:
            store.promote(version)
        report_path = None
        history = {
            "run_at": metadata["created_at"],
            "version": version.version,
            "parent": metadata["parent"],
            "promoted": cfg.promote,
            "kept": sum(1 for r in selection.kept if r["source"] == "judged" and r["weight"] == "full"),
            "rejected": len(selection.rejected),
            "demos": sum(1 for r in selection.kept if r["source"] == "demo"),
            "selection": selection.mode,
            "weighted": sum(1 for r in selection.kept if r.get("weight") == dense_weights.WEIGHT_PROGRESS),
            "final_loss": metadata["final_loss"],
            "datasets": [str(p) for p in cfg.datasets],
        }
        store.append_history(history)
        if cfg.report:
            try:
                from lrm_reward.refinement.report import write_report

                report_path = write_report(store, version, selection, losses)
            except Exception as exc:  # a report failure must not undo a good version
                log.error("report failed: %s", exc)
        return RefineResult(version, cfg.promote, metadata["parent"], selection, losses, report_path)


def import_checkpoint(
    store_root: Path, policy_name: str, checkpoint: Path, promote: bool = True
) -> PolicyVersion:
    """Add a policy trained elsewhere (a lerobot `pretrained_model` folder) as the store's next version.

    The copy is loaded with lerobot before it is committed; a folder lerobot cannot load is refused.
    """
    import shutil

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise CorruptCheckpointError(
            f"{checkpoint} is not a lerobot pretrained_model folder (no config.json)"
        )
    store = PolicyStore(store_root, policy_name)
    with store:
        store.clean_staging()
        staging = store.new_staging_dir()
        shutil.copytree(checkpoint, staging, dirs_exist_ok=True)
        probe = PolicyVersion(policy_name, "import", staging)
        try:
            from lerobot.configs.policies import PreTrainedConfig
            from lerobot.policies.factory import get_policy_class

            cfg = PreTrainedConfig.from_pretrained(staging)
            get_policy_class(cfg.type).from_pretrained(staging, config=cfg)
        except Exception as exc:
            raise CorruptCheckpointError(f"{checkpoint}: lerobot cannot load it: {exc}") from exc
        metadata = {
            "schema": "lrm.policy_version/1",
            "created_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "refine_version": REFINE_VERSION,
            "parent": None,
            "imported_from": str(checkpoint.resolve()),
            "policy_type": cfg.type,
            "datasets": {},
            "losses": [],
        }
        version = store.commit(probe.path, metadata)
        if promote:
            store.promote(version)
        store.append_history(
            {
                "run_at": metadata["created_at"],
                "version": version.version,
                "parent": None,
                "promoted": promote,
                "kept": 0,
                "rejected": 0,
                "demos": 0,
                "final_loss": None,
                "imported_from": metadata["imported_from"],
            }
        )
        return version


def _load_or_build(cfg: RefineConfig, parent: PolicyVersion | None, selection: Selection):
    if parent is not None and not cfg.from_scratch:
        policy, pre, post, policy_cfg = load_policy(parent, cfg.device)
        if cfg.policy_inputs is not None and set(cfg.policy_inputs) != set(policy_cfg.input_features):
            raise ValueError(
                f"{parent.ref} reads {sorted(policy_cfg.input_features)}; a refinement keeps the inputs of "
                f"the version it continues, not {sorted(cfg.policy_inputs)} (leave the inputs out, or start "
                "a new policy from scratch)"
            )
        return policy, pre, post, policy_cfg
    from lerobot.datasets.compute_stats import aggregate_stats
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.policies.factory import get_policy_class, make_policy_config, make_pre_post_processors
    from lerobot.utils.constants import ACTION
    from lerobot.utils.feature_utils import dataset_to_policy_features

    metas = [LeRobotDatasetMetadata(f"lrm/{Path(root).name}", root=root) for root in selection.episodes]
    features = dataset_to_policy_features(metas[0].features)
    inputs = {k: f for k, f in features.items() if k != ACTION}
    if cfg.policy_inputs is not None:
        missing = [k for k in cfg.policy_inputs if k not in inputs]
        if missing:
            raise ValueError(
                f"policy inputs {missing} are not features of {next(iter(selection.episodes))} "
                f"(it has {sorted(inputs)})"
            )
        inputs = {k: inputs[k] for k in cfg.policy_inputs}
    overrides = {"device": cfg.device, "push_to_hub": False, **cfg.policy_overrides}
    if cfg.policy_type == "act":
        overrides.setdefault("pretrained_backbone_weights", None)  # the default downloads ImageNet weights
    if "normalization_mapping" in overrides:
        overrides["normalization_mapping"] = _normalization_mapping(
            cfg.policy_type, overrides["normalization_mapping"]
        )
    policy_cfg = make_policy_config(
        cfg.policy_type,
        input_features=inputs,
        output_features={k: f for k, f in features.items() if k == ACTION},
        **overrides,
    )
    stats = aggregate_stats([m.stats for m in metas])
    policy = get_policy_class(policy_cfg.type)(policy_cfg)
    pre, post = make_pre_post_processors(policy_cfg, dataset_stats=stats)
    return policy, pre, post, policy_cfg


def _normalization_mapping(policy_type: str, changes: dict) -> dict:
    """The policy type's default normalization per feature kind, with ``changes`` applied.

    ``changes`` maps a feature kind (STATE, ENV, VISUAL, ACTION) to a mode name or NormalizationMode, so a
    JSON --policy-config can, e.g., normalize observation.environment_state (ACT leaves ENV raw).
    """
    from lerobot.configs.types import FeatureType, NormalizationMode
    from lerobot.policies.factory import make_policy_config

    mapping = dict(make_policy_config(policy_type, device="cpu").normalization_mapping)
    for kind, mode in dict(changes).items():
        if str(kind) not in FeatureType.__members__:
            raise ValueError(
                f"normalization_mapping: unknown feature kind {kind!r} ({list(FeatureType.__members__)})"
            )
        try:
            mapping[str(kind)] = mode if isinstance(mode, NormalizationMode) else NormalizationMode(str(mode))
        except ValueError:
            raise ValueError(
                f"normalization_mapping[{kind!r}]: unknown mode {mode!r} "
                f"({[m.value for m in NormalizationMode]})"
            ) from None
    return mapping


def _open_datasets(selection: Selection, policy_cfg):
    from lerobot.datasets.dataset_metadata import LeRobotDatasetMetadata
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = []
    for root, episodes in selection.episodes.items():
        repo_id = f"lrm/{Path(root).name}"
        meta = LeRobotDatasetMetadata(repo_id, root=root)
        for key, feature in {**policy_cfg.input_features, **policy_cfg.output_features}.items():
            have = meta.features.get(key)
            if have is None:
                raise ValueError(f"dataset {root} has no feature {key!r}, which the policy needs")
            shape = tuple(have["shape"])
            if have["dtype"] in ("image", "video"):
                shape = (shape[2], shape[0], shape[1])
            if shape != tuple(feature.shape):
                raise ValueError(
                    f"dataset {root}: {key} has shape {shape}, the policy expects {feature.shape}"
                )
        delta = resolve_delta_timestamps(policy_cfg, meta)
        out.append(
            LeRobotDataset(
                repo_id, root=root, episodes=sorted(episodes), delta_timestamps=delta, video_backend="pyav"
            )
        )
    return out


def _train(cfg: RefineConfig, policy, pre, datasets, on_step, weights=None) -> list[float]:
    import torch

    torch.manual_seed(cfg.seed)
    data = torch.utils.data.ConcatDataset(datasets)
    if cfg.cache_frames:
        data = _cached_frames(data, policy.config, cfg.progress_bar)
    loader, weighter = dense_weights.training_loader(
        data, weights, policy, min(cfg.batch_size, len(data)), cfg.num_workers, cfg.seed
    )
    policy.to(cfg.device)
    policy.train()
    pcfg = policy.config
    lr = cfg.lr if cfg.lr is not None else getattr(pcfg, "optimizer_lr", 1e-4)
    wd = cfg.weight_decay if cfg.weight_decay is not None else getattr(pcfg, "optimizer_weight_decay", 0.0)
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=lr, weight_decay=wd)
    scheduler = _lr_scheduler(cfg, optimizer, lr)
    losses: list[float] = []
    bar = None
    if cfg.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="refining", unit="step")
    step = 0
    while step < cfg.steps:
        for batch in loader:
            loss = dense_weights.batch_loss(policy, pre, batch, weighter)
            value = loss.detach().item()
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}")
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(value)
            step += 1
            if bar is not None:
                bar.update(1)
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if on_step is not None:
                on_step(step, losses[-1])
            if step >= cfg.steps:
                break
    if bar is not None:
        bar.close()
    policy.eval()
    return losses


def _lr_scheduler(cfg: RefineConfig, optimizer, lr: float):
    """None for a constant lr; lerobot's warmup + cosine decay (to zero at cfg.steps) for "cosine"."""
    if cfg.lr_schedule == LR_CONSTANT:
        return None
    from lerobot.optim.schedulers import CosineDecayWithWarmupSchedulerConfig

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(WARMUP_FRACTION * cfg.steps)
    schedule = CosineDecayWithWarmupSchedulerConfig(
        num_warmup_steps=warmup, num_decay_steps=cfg.steps, peak_lr=lr, decay_lr=0.0
    )
    return schedule.build(optimizer, cfg.steps)


def _cached_frames(data, policy_cfg, progress_bar: bool) -> list[dict]:
    """Every frame of ``data`` once, without the camera features the policy does not read."""
    unused = None
    frames = []
    items = range(len(data))
    if progress_bar:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="caching frames", unit="frame")
    for i in items:
        item = data[i]
        if unused is None:
            unused = {
                k for k in item if k.startswith("observation.images.") and k not in policy_cfg.input_features
            }
        frames.append({k: v for k, v in item.items() if k not in unused})
    return frames


def _judge_thresholds(datasets: list[Path]) -> dict:
    out = {}
    for root in datasets:
        seen = {json.dumps(j.thresholds, sort_keys=True) for j in load_judgments(root).values()}
        out[str(root)] = [json.loads(s) for s in sorted(seen)]
    return out


def _training_config(cfg: RefineConfig) -> dict:
    d = asdict(cfg)
    for key in ("store_root",):
        d[key] = str(d[key])
    d["datasets"] = [str(p) for p in cfg.datasets]
    d["policy_overrides"] = json.loads(json.dumps(cfg.policy_overrides, default=str))  # enums as text
    d["policy_inputs"] = list(cfg.policy_inputs) if cfg.policy_inputs is not None else None
    d["demos"] = [str(p) for p in cfg.demos]
    return d


def _brief(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("curve", "curve_frames")}
