"""Run a LeRobot policy from the policy store: observation in, safe action out, new versions between episodes.

What it is for: the one code path that policy_node (a real robot over ROS) and sim_robot_node's policy
controller use. A PolicyRunner
- loads what a path names: `<store>/<name>` or `<store>/<name>/current` (follows promotions), one
  version `<store>/<name>/vNNNN` (pinned), or any lerobot `pretrained_model` folder (pinned); store
  versions are checked against their checksums first (policy_store.load_policy);
- refuses, by name, a policy that reads a feature the robot's topics do not provide (FeatureTopics:
  the recorder's own definition) or whose shapes / action size do not fit;
- switches to a newly promoted `current` only in start_episode(), never during an episode; a new version
  that fails to load leaves the running one in place (the failure is reported and counted);
- turns an observation (feature key -> numpy array) into an action, refusing stale, missing or
  non-finite inputs (stop, or hold the last action: SafetyConfig.on_stale) and guarding the output
  (ActionGuard: limits, maximum change per step, NaN).

Time comes from an injectable clock (seconds, monotonic); an observation carries the time each feature
was received on that clock. One thread at a time (the node's control loop, or the sim's worker).

What it is not: ROS (no rclpy here), training (refinement.refine), the store's writer (policy_store).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.policy.action_guard import ActionGuard, SafetyConfig
from lrm_reward.refinement.feature_topics import ACTION_KEY, IMAGE_KEY_PREFIX
from lrm_reward.refinement.policy_store import (
    CURRENT,
    METADATA_FILE,
    VERSION_RE,
    CorruptCheckpointError,
    PolicyStore,
    PolicyVersion,
    load_policy,
)

log = logging.getLogger(__name__)

# StepResult.status values
OK, HELD, STALE, MISSING, BAD_OBSERVATION, NON_FINITE, ERROR, IDLE = (
    "ok",
    "held",
    "stale",
    "missing",
    "bad_observation",
    "non_finite_action",
    "error",
    "idle",
)


class PolicyLoadError(RuntimeError):
    """The policy cannot run here: not found, corrupt, not loadable, or its features do not fit."""


class FeatureMismatchError(PolicyLoadError):
    """The policy reads a feature the robot does not provide, or a shape differs."""


class EpisodeRunningError(RuntimeError):
    """start_episode() while an episode runs (versions switch only between episodes)."""


@dataclass
class PolicySource:
    """What a path names: a store entry that follows `current`, a pinned store version, or a folder."""

    path: Path
    store: PolicyStore | None = None
    follows_current: bool = False
    pinned: PolicyVersion | None = None

    @classmethod
    def from_path(cls, path: Path | str) -> PolicySource:
        p = Path(path).expanduser()
        if not str(path):
            raise PolicyLoadError("no policy path given")
        if p.name == CURRENT and (p.is_symlink() or p.exists()):
            return cls(p, PolicyStore(p.parent.parent, p.parent.name), follows_current=True)
        if (p / CURRENT).is_symlink() or (p / CURRENT).exists():
            return cls(p, PolicyStore(p.parent, p.name), follows_current=True)
        if VERSION_RE.match(p.name) and (p / METADATA_FILE).exists():
            store = PolicyStore(p.parent.parent, p.parent.name)
            return cls(p, store, pinned=PolicyVersion(p.parent.name, p.name, p))
        if (p / "config.json").is_file():
            return cls(p)
        raise PolicyLoadError(
            f"{p} is not a LeRobot policy checkpoint (no config.json) nor a policy store entry "
            f"(<store>/<name> with a `{CURRENT}` link, or a version folder)"
        )

    def target(self) -> tuple[str, Path, PolicyVersion | None]:
        """(version tag, folder, store version) of what this source names now."""
        if self.follows_current:
            assert self.store is not None
            try:
                version = self.store.current()
            except CorruptCheckpointError as exc:
                raise PolicyLoadError(str(exc)) from exc
            if version is None:
                raise PolicyLoadError(f"policy store {self.store.dir} has no `{CURRENT}` version yet")
            return version.ref, version.path, version
        if self.pinned is not None:
            return self.pinned.ref, self.pinned.path, self.pinned
        resolved = self.path.resolve()
        return str(resolved), resolved, None


@dataclass
class LoadedPolicy:
    """A policy in memory with its processors; `act` runs one batch-1 observation."""

    version: str
    path: Path
    policy: object
    pre: Callable
    post: Callable
    input_features: dict[str, tuple[int, ...]]
    action_dim: int

    def act(self, batch: dict) -> np.ndarray:
        import torch

        with torch.inference_mode():
            action = self.post(self.policy.select_action(self.pre(batch)))
        return np.asarray(action.reshape(-1).cpu().numpy(), dtype=np.float64)


def load_lerobot_policy(version: str, path: Path, store_version: PolicyVersion | None, device: str):
    """Load with lerobot (checksums first for a store version). PolicyLoadError with the reason."""
    try:
        if store_version is not None:
            policy, pre, post, cfg = load_policy(store_version, device)
        else:
            from lerobot.configs.policies import PreTrainedConfig
            from lerobot.policies.factory import get_policy_class, make_pre_post_processors

            cfg = PreTrainedConfig.from_pretrained(path)
            cfg.device = device
            policy = get_policy_class(cfg.type).from_pretrained(path, config=cfg)
            pre, post = make_pre_post_processors(
                cfg,
                pretrained_path=str(path),
                preprocessor_overrides={"device_processor": {"device": device}},
            )
    except PolicyLoadError:
        raise
    except Exception as exc:  # corrupt files, unknown policy type, bad config: the checkpoint cannot run
        raise PolicyLoadError(f"policy {version}: cannot be loaded: {type(exc).__name__}: {exc}") from exc
    policy.eval()
    action = cfg.output_features.get(ACTION_KEY)
    if action is None or len(action.shape) != 1:
        raise FeatureMismatchError(f"policy {version}: no 1-D `{ACTION_KEY}` output")
    inputs = {key: tuple(int(s) for s in feature.shape) for key, feature in cfg.input_features.items()}
    if not any(k.startswith(IMAGE_KEY_PREFIX) for k in inputs) and str(device).startswith("cpu"):
        import torch

        # A state-only policy is tiny: more OpenMP threads only spin against the camera, the recorder and
        # the reward model on the same cores.
        torch.set_num_threads(1)
    return LoadedPolicy(version, path, policy, pre, post, inputs, int(action.shape[0]))


def check_features(
    loaded: LoadedPolicy, provides: Mapping[str, tuple[int, ...] | None], action_dim: int | None
) -> None:
    """FeatureMismatchError when the policy reads what is not provided, or a known shape differs."""
    missing = [k for k in loaded.input_features if k not in provides]
    if missing:
        raise FeatureMismatchError(
            f"policy {loaded.version} reads {', '.join(missing)}, which no configured topic provides "
            f"(configured: {', '.join(provides) or 'nothing'})"
        )
    for key, shape in loaded.input_features.items():
        want = provides[key]
        if want is not None and tuple(want) != shape:
            raise FeatureMismatchError(
                f"policy {loaded.version}: {key} has shape {shape}, "
                f"the configured topics provide {tuple(want)}"
            )
    if action_dim is not None and loaded.action_dim != action_dim:
        raise FeatureMismatchError(
            f"policy {loaded.version}: action shape ({loaded.action_dim},), "
            f"the robot takes {action_dim} values"
        )


@dataclass
class StepResult:
    status: str  # OK, HELD, STALE, MISSING, BAD_OBSERVATION, NON_FINITE, ERROR, IDLE
    action: np.ndarray | None = None  # what to send (OK, HELD); None: send nothing
    version: str = ""
    clamped_limit: bool = False
    clamped_delta: bool = False
    message: str = ""


@dataclass
class EpisodeStart:
    version: str  # the version that acts in this episode
    switched_from: str | None = None  # the version of the previous episode, when it changed
    switch_error: str = ""  # a promoted version that could not be loaded (the previous one runs on)


@dataclass
class RunnerConfig:
    path: Path | str
    provides: dict[str, tuple[int, ...] | None]  # feature key -> shape (None: any), FeatureTopics
    action_dim: int | None = None  # None: whatever the policy outputs
    task: str = ""  # given to language-conditioned policies as "task"
    device: str = "cpu"
    safety: SafetyConfig = field(default_factory=SafetyConfig)


class PolicyRunner:
    """See the module docstring. `loader(version, path, store_version, device)` is for tests."""

    def __init__(self, cfg: RunnerConfig, clock: Callable[[], float] = time.monotonic, loader=None) -> None:
        self.cfg = cfg
        self.source = PolicySource.from_path(cfg.path)
        self._clock = clock
        self._loader = loader or load_lerobot_policy
        self.loaded: LoadedPolicy | None = None
        self.guard: ActionGuard | None = None
        self.in_episode = False
        self.counters: dict[str, int] = {}
        self.last_error = ""
        self._lock = threading.Lock()  # start/stop against step, and a node's diagnostics

    @property
    def version(self) -> str:
        return self.loaded.version if self.loaded else ""

    def load(self) -> str:
        """Load what the source names now (configure). PolicyLoadError when it cannot run here."""
        loaded = self._load_target()
        with self._lock:
            self._install(loaded)
        return loaded.version

    def _load_target(self) -> LoadedPolicy:
        version, path, store_version = self.source.target()
        loaded = self._loader(version, path, store_version, self.cfg.device)
        check_features(loaded, self.cfg.provides, self.cfg.action_dim)
        ActionGuard(self.cfg.safety, loaded.action_dim)  # per-dimension limits must fit its action
        return loaded

    def _install(self, loaded: LoadedPolicy) -> None:
        self.loaded = loaded
        self.guard = ActionGuard(self.cfg.safety, loaded.action_dim, counters=self.counters)

    def pending_version(self) -> str | None:
        """A promoted version that will act from the next episode on (None: none, or pinned source)."""
        if not self.source.follows_current:
            return None
        try:
            version, _, _ = self.source.target()
        except PolicyLoadError:
            return None
        return version if version != self.version else None

    def start_episode(self) -> EpisodeStart:
        """Between episodes: switch to a newly promoted version, reset the policy, start guarding."""
        with self._lock:
            if self.in_episode:
                raise EpisodeRunningError(f"an episode with {self.version} is running: stop it first")
        previous = self.version
        switch_error = ""
        if self.loaded is None or self.pending_version() is not None:
            try:
                loaded = self._load_target()
            except PolicyLoadError as exc:
                if self.loaded is None:
                    raise
                switch_error = str(exc)
                self._count("switch_failures")
                log.error(f"keeping {previous}: the promoted version cannot run: {exc}")
            else:
                with self._lock:
                    self._install(loaded)
        with self._lock:
            assert self.loaded is not None and self.guard is not None
            self.loaded.policy.reset()
            self.guard.reset()
            self.in_episode = True
        switched = previous if previous and previous != self.version else None
        if switched:
            log.info(f"switched policy {switched} -> {self.version} between episodes")
        return EpisodeStart(self.version, switched, switch_error)

    def stop_episode(self) -> None:
        with self._lock:
            self.in_episode = False

    def step(self, observation: Mapping[str, np.ndarray], received_s: Mapping[str, float] | None = None):
        """One control step. `received_s`: feature -> clock time it was received (None: all fresh)."""
        with self._lock:
            if not self.in_episode or self.loaded is None or self.guard is None:
                return StepResult(IDLE, version=self.version)
            loaded, guard = self.loaded, self.guard
            now = self._clock()
            limit = self.cfg.safety.max_observation_age_s
            for key in loaded.input_features:
                if key not in observation:
                    return self._refuse(MISSING, f"no {key} received yet")
                if received_s is not None and limit > 0 and now - received_s[key] > limit:
                    age = now - received_s[key]
                    return self._refuse(STALE, f"{key} is {age:.2f} s old (max_observation_age_s {limit:g})")
            try:
                batch = self._batch(loaded, observation)
            except ValueError as exc:
                return self._refuse(BAD_OBSERVATION, str(exc))
            try:
                raw = loaded.act(batch)
                guarded = guard.apply(raw)
            except Exception as exc:  # a policy that fails to run: nothing sent, reported, the node stays up
                self._count("policy_errors")
                self.last_error = f"policy {loaded.version} failed: {type(exc).__name__}: {exc}"
                return StepResult(ERROR, version=loaded.version, message=self.last_error)
            if guarded.action is None:
                return StepResult(NON_FINITE, version=loaded.version, message="the policy returned NaN/inf")
            self._count("actions")
            return StepResult(
                OK,
                guarded.action,
                loaded.version,
                clamped_limit=guarded.clamped_limit,
                clamped_delta=guarded.clamped_delta,
            )

    def _refuse(self, status: str, message: str) -> StepResult:
        """No fresh, complete observation: send nothing, or hold the last action (on_stale: hold)."""
        self._count(f"{status}_observations")
        guard = self.guard
        if self.cfg.safety.on_stale == "hold" and guard is not None and guard.last is not None:
            self._count("held_actions")
            return StepResult(HELD, guard.last.copy(), self.version, message=message)
        return StepResult(status, version=self.version, message=message)

    def _batch(self, loaded: LoadedPolicy, observation: Mapping[str, np.ndarray]) -> dict:
        """lerobot's batch-1 input: images (H, W, 3) uint8 -> (1, 3, H, W) in [0, 1], vectors -> (1, n)."""
        import torch

        batch: dict = {"task": [self.cfg.task]}
        for key, shape in loaded.input_features.items():
            value = np.asarray(observation[key])
            if key.startswith(IMAGE_KEY_PREFIX):
                if value.ndim != 3 or value.shape[2] != 3:
                    raise ValueError(f"{key}: expected an (H, W, 3) RGB image, got shape {value.shape}")
                image = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1).float().div(255.0)
                batch[key] = image.unsqueeze(0)
                continue
            vector = value.astype(np.float32).reshape(-1)
            if vector.shape != shape:
                raise ValueError(f"{key} has {vector.size} values, policy {loaded.version} reads {shape}")
            if not np.all(np.isfinite(vector)):
                raise ValueError(f"{key} has NaN/inf")
            batch[key] = torch.from_numpy(vector).unsqueeze(0)
        return batch

    def _count(self, kind: str) -> None:
        self.counters[kind] = self.counters.get(kind, 0) + 1

    def close(self) -> None:
        """Free the policy (cleanup)."""
        with self._lock:
            self.loaded = None
            self.guard = None
            self.in_episode = False
