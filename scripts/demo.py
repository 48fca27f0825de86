#!/usr/bin/env python
"""The main job, end to end on a simulated SO-101 robot: no robot, no camera, no downloaded weights.

    make demo                      # full run (~15 min on 2 CPU cores)
    python scripts/demo.py --quick # tiny everything (~3 min); tests/test_demo_quick.py runs it
    python scripts/demo.py --lrm-weights DIR   # serve real LRM weights instead of training a tiny model

Stages (each one's outputs land under --out; a rerun skips the finished stages of a run with the same
settings and redoes an interrupted one from its start; other settings or --restart start clean):
  demos      the noisy scripted expert collects demonstrations in the sim (ground truth labels)
  reward     a tiny Qwen3-VL + LRM-style adapters trained on them (lrm_reward.adaptation), or --lrm-weights
  policy     a small ACT policy trained on the successful demonstrations (lrm-refine --from-scratch)
  rollout1   the policy drives sim_robot_node over ROS; reward_node scores live; refinement_node records
  judge1     lrm-judge on the recording; accuracy against the simulator's ground truth
  refine     lrm-refine on the judged successes (+ the demonstrations): a new policy version
  rollout2   the same seeds again with the refined policy; judge2 judges them too
  report     out/demo/report.html: reward curves with thumbnails, confusion matrix, success before/after

What it is not: a benchmark. Every number it prints is measured in this run, whatever it turns out to be.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG_SRC = REPO / "ros2_ws" / "src" / "lrm_reward"
sys.path.insert(0, str(PKG_SRC))  # run the source tree, also when ros2_ws/install is older
for _var, _val in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("WANDB_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
    ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
):
    os.environ.setdefault(_var, _val)

import warnings  # noqa: E402

from tqdm import tqdm  # noqa: E402

# lerobot's dataset writer asks `datasets` for progress bars we switched off above: one warning per episode.
warnings.filterwarnings("ignore", message="Cannot enable progress bars")

from lrm_reward.sim.so101_scene import (  # noqa: E402
    ACTION_NAMES,
    ENV_STATE_NAMES,
    JOINT_NAMES,
    TASK,
    SimRenderError,
)

STAGES = ("demos", "reward", "policy", "rollout1", "judge1", "refine", "rollout2", "judge2", "report")
POLICY_NAME = "act_so101"
ROUND_SEED = 1000  # both rollout rounds see the same layouts: seeds 1000, 1001, ...
DEMO_SEED = 0
TINY_CACHE = REPO / ".cache" / "tiny_lrm"
REWARD_RECIPE = REPO / "config" / "demo_reward_train.yaml"
NODE_START_TIMEOUT_S = 120.0
EPISODE_TIMEOUT_S = 120.0
# The policy reads the joints and the cube/goal positions (what a pose estimator or AprilTag gives a real
# lab), not the camera: a vision policy cannot learn to find the cube in a few CPU minutes. The camera
# stays in the recordings for the reward model and the judge.
POLICY_INPUTS = ("observation.state", "observation.environment_state")
ENV_STATE_TOPIC = "/environment_state"


@dataclass
class DemoSettings:
    """Everything that changes the results; a rerun with other settings starts clean."""

    demos: int
    episodes: int
    max_steps: int
    image_size: int
    expert_action_sigma: float
    expert_grasp_offset_m: float
    reward_steps: int
    judge_threshold: float
    policy_steps: int
    refine_steps: int
    batch_size: int
    policy_lr: float
    refine_lr: float
    interval_frames: int
    lrm_weights: str
    device: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoSettings:
        quick = args.quick
        return cls(
            demos=args.demos or (5 if quick else 30),
            episodes=args.episodes or (3 if quick else 20),
            max_steps=args.max_steps or (50 if quick else 100),
            image_size=96,
            expert_action_sigma=args.action_sigma,
            expert_grasp_offset_m=args.grasp_offset,
            reward_steps=args.reward_steps or (8 if quick else 200),
            judge_threshold=args.judge_threshold,
            policy_steps=args.policy_steps or (10 if quick else 2000),
            refine_steps=args.refine_steps or (10 if quick else 800),
            batch_size=8 if quick else 32,
            policy_lr=args.policy_lr,
            refine_lr=args.refine_lr,
            interval_frames=args.interval_frames,
            lrm_weights=str(Path(args.lrm_weights).resolve()) if args.lrm_weights else "",
            device=args.device,
        )

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class DemoError(RuntimeError):
    """A stage cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- state
class RunState:
    """out/state.json: settings key, finished stages and their results. Written atomically."""

    def __init__(self, out: Path, settings: DemoSettings, restart: bool) -> None:
        self.path = out / "state.json"
        self.out = out
        old = json.loads(self.path.read_text()) if self.path.is_file() else None
        self.resumed = bool(old and old.get("key") == settings.key() and not restart)
        if not self.resumed and out.exists():
            for child in out.iterdir():  # start clean, but never follow a link out of the folder
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.data = old if self.resumed else {"key": settings.key(), "settings": asdict(settings), "done": {}}
        self._write()

    def done(self, stage: str) -> bool:
        return stage in self.data["done"]

    def result(self, stage: str) -> dict:
        return self.data["done"][stage]

    def finish(self, stage: str, result: dict) -> None:
        self.data["done"][stage] = result
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def say(message: str) -> None:
    tqdm.write(f"[demo] {message}")


def fresh_dir(path: Path) -> Path:
    """An interrupted stage starts over: remove what it left."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------- (a) demos
def collect_demos(out: Path, s: DemoSettings) -> dict:
    from lrm_reward.refinement.recorder import EpisodeOutcome, EpisodeRecorder, RecorderConfig
    from lrm_reward.sim.noisy_expert import ExpertNoise, NoisyExpert
    from lrm_reward.sim.so101_scene import CONTROL_DT_S, SceneConfig, So101Scene

    root = fresh_dir(out / "data" / "demos_stage")
    recorders = {
        ok: EpisodeRecorder(
            RecorderConfig(
                data_root=root,
                cameras=("front",),
                fps=round(1 / CONTROL_DT_S),
                dataset_name="demos" if ok else "demos_failed",
                state_names=JOINT_NAMES,
                action_names=ACTION_NAMES,
                robot_type="so101_sim",
                use_videos=False,
                spool_to_disk=False,
                image_writer_threads=0,
                rewards=True,  # NaN rewards: the same features as the recorded rollouts
                environment_state_names=ENV_STATE_NAMES,
            )
        )
        for ok in (True, False)
    }
    expert = NoisyExpert(ExpertNoise(s.expert_action_sigma, s.expert_grasp_offset_m, seed=DEMO_SEED))
    outcomes = []
    with So101Scene(SceneConfig(image_size=s.image_size, max_steps=s.max_steps)) as scene:
        for i in tqdm(range(s.demos), desc="demos: noisy expert in sim", unit="ep", leave=False):
            seed = DEMO_SEED + i
            state = scene.reset(seed)
            expert.reset(seed)
            frames = [(state, None)]
            while not state.done:
                action = expert.act(state)
                state = scene.step(action)
                frames.append((state, action))
            ok = bool(state.success)
            outcomes.append({"seed": seed, "success": ok, "steps": state.step_index})
            rec = recorders[ok]
            rec.start(TASK, notes=f"noisy expert, seed {seed}", policy_version="scripted_expert")
            t0 = 1_000_000.0 + i * 1000.0
            # The action that led to frame k+1 is recorded with frame k (what the robot did from there).
            for k, (st, _) in enumerate(frames[:-1]):
                t = t0 + k * CONTROL_DT_S
                rec.add_image("front", t, st.image)
                rec.add_state(t, st.joint_positions, JOINT_NAMES)
                rec.add_environment_state(t, st.environment_state, ENV_STATE_NAMES)
                rec.add_action(t, frames[k + 1][1], ACTION_NAMES)
            result = rec.stop(EpisodeOutcome.SUCCESS if ok else EpisodeOutcome.FAILURE)
            if result.status.value not in ("saved",):
                raise DemoError(f"saving demonstration {i} failed: {result.message}")
    for rec in recorders.values():
        rec.close()
    n_ok = sum(o["success"] for o in outcomes)
    if n_ok == 0:
        raise DemoError("the noisy expert never succeeded: lower --action-sigma / --grasp-offset")
    final = out / "data" / "demos"
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return {"episodes": outcomes, "successes": n_ok, "root": str(final / "demos")}


# ---------------------------------------------------------------------------------------------- (b) reward
def tiny_base_model() -> Path:
    from lrm_reward.core import tiny_model

    return tiny_model.cached_tiny_lrm(TINY_CACHE, seed=0).base  # the test suite's tiny_lrm uses it too


def prepare_reward_model(out: Path, s: DemoSettings, demos: dict) -> dict:
    if s.lrm_weights:
        weights = Path(s.lrm_weights)
        base = weights / "base" if (weights / "base").is_dir() else weights
        adapters = weights / "adapters" if (weights / "adapters").is_dir() else weights
        missing = [m for m in ("progress", "completion") if not (adapters / m).is_dir()]
        if not (base / "config.json").is_file() or missing:
            raise DemoError(
                f"--lrm-weights {weights}: expected a Qwen3-VL folder (base/ or the folder itself, with "
                "config.json) and adapter folders progress/ completion/ "
                f"(missing: {missing or 'config.json'})"
            )
        return {"base": str(base), "adapters": str(adapters), "trained": False}
    from lrm_reward.adaptation import train

    base = tiny_base_model()
    adapters = out / "models" / "reward_adapters"
    demos_root = Path(demos["root"]).parent
    datasets = [str(demos_root / "demos")]
    if (demos_root / "demos_failed" / "meta" / "info.json").is_file():
        datasets.append(str(demos_root / "demos_failed"))
    import yaml

    # The recipe (why: docs/adaptation.md, "Small bases"); the demo adds the paths and its step budget.
    recipe = yaml.safe_load(REWARD_RECIPE.read_text())
    recipe.update(base_model=str(base), datasets=datasets, output_dir=str(adapters))
    recipe["max_steps"] = s.reward_steps
    recipe["vision_warmup_steps"] = min(int(recipe.get("vision_warmup_steps", 0)), s.reward_steps)
    contrastive = recipe.setdefault("per_modality", {}).setdefault("contrastive", {})
    contrastive["max_steps"] = min(int(contrastive.get("max_steps", s.reward_steps)), s.reward_steps)
    config = out / "models" / "reward_train.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = train.main(["--config", str(config)])  # modality order from the recipe: completion first
    if code != 0:
        raise DemoError(f"training the reward model failed (lrm-train-reward exit {code}); see the log above")
    return {"base": str(base), "adapters": str(adapters), "trained": True}


# ---------------------------------------------------------------------------------------------- (c, f) policy
def act_overrides(s: DemoSettings) -> dict:
    return {
        "chunk_size": 10,
        "n_action_steps": 10,
        "dim_model": 128,
        "dim_feedforward": 512,
        "n_heads": 4,
        "n_encoder_layers": 2,
        "n_decoder_layers": 1,
        "use_vae": False,
        # ACT leaves observation.environment_state unnormalized; the cube/goal offsets are centimetres,
        # small next to the joint angles, so they get the same mean/std scaling as the state.
        "normalization_mapping": {"ENV": "MEAN_STD"},
    }


@contextlib.contextmanager
def one_torch_thread():
    """A policy this small trains fastest on one thread; two OpenMP threads on a busy 2-core machine spin
    against each other (measured: the same ACT steps became several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_policy(out: Path, s: DemoSettings, demos: dict) -> dict:
    store = out / "policies"
    if store.exists():
        shutil.rmtree(store)
    with one_torch_thread():
        result = _train_from_scratch(store, s, demos)
    return {
        "store": str(store),
        "version": result.version.ref,
        "path": str(result.version.path),
        "final_loss": result.losses[-1] if result.losses else None,
    }


def _train_from_scratch(store: Path, s: DemoSettings, demos: dict):
    from lrm_reward.refinement.refine import RefineConfig, refine

    return refine(
        RefineConfig(
            store_root=store,
            policy_name=POLICY_NAME,
            demos=[Path(demos["root"])],
            steps=s.policy_steps,
            batch_size=s.batch_size,
            lr=s.policy_lr,
            device=s.device,
            from_scratch=True,
            policy_type="act",
            policy_overrides=act_overrides(s),
            policy_inputs=POLICY_INPUTS,
            cache_frames=True,
            report=False,
        )
    )


def refine_policy(out: Path, s: DemoSettings, rollout: dict, demos: dict) -> dict:
    from lrm_reward.refinement.refine import NothingToTrainError, RefineConfig, refine

    try:
        result = refine(
            RefineConfig(
                store_root=Path(out / "policies"),
                policy_name=POLICY_NAME,
                datasets=[Path(rollout["dataset"])],
                demos=[Path(demos["root"])],
                steps=s.refine_steps,
                batch_size=s.batch_size,
                lr=s.refine_lr,
                cache_frames=True,
                device=s.device,
            )
        )
    except NothingToTrainError as exc:
        raise DemoError(f"refinement selected nothing: {exc}") from exc
    judged_kept = [r for r in result.selection.kept if r["source"] == "judged"]
    return {
        "version": result.version.ref,
        "path": str(result.version.path),
        "parent": result.parent,
        "judged_successes_used": len(judged_kept),
        "demos_used": sum(1 for r in result.selection.kept if r["source"] == "demo"),
        "final_loss": result.losses[-1] if result.losses else None,
        "report": str(result.report) if result.report else "",
    }


# ---------------------------------------------------------------------------------------------- (d, g) ROS
class NodeProcess:
    def __init__(self, name: str, argv: list[str], log: Path, env: dict) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise DemoError(f"{self.name} exited with code {self.proc.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _params_file(path: Path, node: str, params: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({node: {"ros__parameters": params}}))
    return path


def start_nodes(work: Path, s: DemoSettings, reward_model: dict, policy_path: str, dataset: str):
    env = {**os.environ, "PYTHONPATH": f"{PKG_SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    env.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
    adapters = Path(reward_model["adapters"])
    reward_params = {
        "task": TASK,
        "image_topics": ["image"],
        "model": {
            "base": reward_model["base"],
            "adapters": {
                m: str(adapters / m) if (adapters / m).is_dir() else ""
                for m in ("progress", "contrastive", "completion")
            },
            "device": s.device,
            "dtype": "float32" if s.device == "cpu" else "auto",
            "max_batch_size": 4,
        },
        "modalities": ["progress", "completion"],
        "interval_frames": s.interval_frames,
        "completion_debounce": 2,
    }
    rec_params = {
        "data_root": str(work / "data"),
        "dataset_name": dataset,
        "robot_type": "so101_sim",
        "fps": 10,
        "cameras": ["front"],
        "action_type": "joint_state",
        "use_videos": False,
        "stop_waits_for_save": True,  # judged right after the round: every episode must be on disk
        "image_writer_threads": 0,
        "max_gap_s": 1.0,
        "environment_state_topic": ENV_STATE_TOPIC,
        "environment_state_type": "joint_state",  # stamped like the frame it belongs to
        "environment_state_names": list(ENV_STATE_NAMES),
    }
    sim_params = {
        "image_size": s.image_size,
        "max_steps": s.max_steps,
        "seed": ROUND_SEED,
        "controller": "policy",
        "policy_path": policy_path,
        "policy_device": s.device,
    }
    py = sys.executable
    nodes = [
        NodeProcess(
            "sim_robot_node",
            [py, "-m", "lrm_reward.ros.sim_robot_node", "--ros-args", "--params-file",
             str(_params_file(work / "sim_robot_node.yaml", "sim_robot_node", sim_params))],
            work / "sim_robot_node.log",
            env,
        ),
        NodeProcess(
            "reward_node",
            [py, "-m", "lrm_reward.ros.reward_node", "--ros-args", "--params-file",
             str(_params_file(work / "reward_node.yaml", "reward_node", reward_params)),
             "-r", "image:=/camera/image"],
            work / "reward_node.log",
            env,
        ),
        NodeProcess(
            "refinement_node",
            [py, "-m", "lrm_reward.ros.refinement_node", "--ros-args", "--params-file",
             str(_params_file(work / "refinement_node.yaml", "refinement_node", rec_params)),
             "-r", "image:=/camera/image", "-r", "action:=/sim_robot_node/applied_action",
             "-r", "reward:=/reward_node/reward"],
            work / "refinement_node.log",
            env,
        ),
    ]  # fmt: skip
    return nodes


class DemoClient:
    """The demo's own ROS node: calls the nodes' services and listens to results and rewards."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String
        from std_srvs.srv import Trigger

        from lrm_interfaces.msg import RewardSignal
        from lrm_interfaces.srv import SetTask, StartEpisode, StopEpisode

        self.rclpy = rclpy
        rclpy.init()
        self.node = Node("lrm_demo")
        self.results: list[dict] = []
        self.rewards: list[RewardSignal] = []
        latched = QoSProfile(
            depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE
        )
        self.node.create_subscription(
            String,
            "/sim_robot_node/episode_result",
            lambda m: self.results.append(json.loads(m.data)),
            latched,
        )
        self.node.create_subscription(RewardSignal, "/reward_node/reward", self.rewards.append, 100)
        self.sim_start = self.node.create_client(Trigger, "/sim_robot_node/start_episode")
        self.sim_result = self.node.create_client(Trigger, "/sim_robot_node/last_result")
        self.set_task = self.node.create_client(SetTask, "/reward_node/set_task")
        self.rec_start = self.node.create_client(StartEpisode, "/refinement_node/start_episode")
        self.rec_stop = self.node.create_client(StopEpisode, "/refinement_node/stop_episode")
        self.types = {
            "Trigger": Trigger,
            "SetTask": SetTask,
            "StartEpisode": StartEpisode,
            "StopEpisode": StopEpisode,
        }

    def wait_ready(self, nodes: list[NodeProcess]) -> None:
        deadline = time.monotonic() + NODE_START_TIMEOUT_S
        clients = (self.sim_start, self.sim_result, self.set_task, self.rec_start, self.rec_stop)
        while not all(c.service_is_ready() for c in clients):
            for n in nodes:
                n.check()
            if time.monotonic() > deadline:
                raise DemoError(
                    f"the nodes did not come up within {NODE_START_TIMEOUT_S:.0f} s "
                    f"(logs in {nodes[0].log_path.parent})"
                )
            self.rclpy.spin_once(self.node, timeout_sec=0.2)
        # The reward node answers set_task only once it is active (model loaded).
        while True:
            res = self.call(self.set_task, self.types["SetTask"].Request(task=TASK))
            if res.result == res.RESULT_OK:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"reward_node never became active: {res.message}")
            for n in nodes:
                n.check()
            time.sleep(0.5)

    def call(self, client, request, timeout: float = 120.0):
        future = client.call_async(request)
        self.rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        if not future.done():
            raise DemoError(f"service {client.srv_name} did not answer within {timeout:.0f} s")
        return future.result()

    def run_episode(self, policy_version: str, round_name: str, nodes: list[NodeProcess]) -> dict:
        T = self.types
        res = self.call(self.set_task, T["SetTask"].Request(task=TASK, reset_only=True))
        if res.result != res.RESULT_OK:
            raise DemoError(f"reward_node set_task: {res.message}")
        rec = self.call(
            self.rec_start,
            T["StartEpisode"].Request(task=TASK, notes=f"demo {round_name}", policy_version=policy_version),
        )
        if rec.result != rec.RESULT_OK:
            raise DemoError(f"refinement_node start_episode: {rec.message}")
        seen = len(self.results)
        started = self.call(self.sim_start, T["Trigger"].Request())
        if not started.success:
            raise DemoError(f"sim_robot_node start_episode: {started.message}")
        deadline = time.monotonic() + EPISODE_TIMEOUT_S
        episode = json.loads(started.message)["episode"]
        result, next_poll = None, time.monotonic() + 2.0
        while result is None:
            if len(self.results) > seen and self.results[-1]["episode"] == episode:
                result = self.results[-1]
            elif time.monotonic() > next_poll:  # the latched topic is the fast path; polling the safe one
                polled = self.call(self.sim_result, T["Trigger"].Request(), timeout=10.0)
                if polled.success and json.loads(polled.message)["episode"] == episode:
                    result = json.loads(polled.message)
                next_poll = time.monotonic() + 2.0
            if time.monotonic() > deadline:
                raise DemoError(f"the sim episode did not finish within {EPISODE_TIMEOUT_S:.0f} s")
            for n in nodes:
                n.check()
            self.rclpy.spin_once(self.node, timeout_sec=0.1)
        # Wait for the reward of the last frame (or a little while): the recorder keeps what came.
        last = result["last_stamp"] - 1e-6
        wait_until = time.monotonic() + 10.0
        while time.monotonic() < wait_until:
            if any(r.header.stamp.sec + r.header.stamp.nanosec * 1e-9 >= last for r in self.rewards[-5:]):
                break
            self.rclpy.spin_once(self.node, timeout_sec=0.05)
        truth = "success" if result["success"] else "failure"
        stop = self.call(
            self.rec_stop,
            T["StopEpisode"].Request(
                outcome=0, notes=f"simulator ground truth: {truth} (seed {result['seed']})"
            ),
        )
        if stop.result != stop.RESULT_OK:
            raise DemoError(f"refinement_node stop_episode: {stop.message}")
        return {
            "episode_index": int(stop.episode_index),
            "frames": int(stop.num_frames),
            "seed": result["seed"],
            "success": result["success"],
            "steps": result["steps"],
            "note": result["note"],
            "policy_version": policy_version,
        }

    def close(self) -> None:
        self.node.destroy_node()
        with contextlib.suppress(Exception):
            self.rclpy.try_shutdown()


def rollout(out: Path, s: DemoSettings, reward_model: dict, policy: dict, round_name: str) -> dict:
    work = fresh_dir(out / round_name)
    dataset = f"rollouts_{round_name}"
    nodes = start_nodes(work, s, reward_model, policy["path"], dataset)
    client = None
    episodes = []
    started = time.monotonic()
    try:
        client = DemoClient()
        say(f"{round_name}: starting sim_robot_node, reward_node, refinement_node (logs: {work})")
        client.wait_ready(nodes)
        bar = tqdm(range(s.episodes), desc=f"{round_name}: rollouts over ROS", unit="ep", leave=False)
        for _ in bar:
            ep = client.run_episode(policy["version"], round_name, nodes)
            episodes.append(ep)
            bar.set_postfix(successes=sum(e["success"] for e in episodes))
        rewards = len(client.rewards)
    finally:
        if client is not None:
            client.close()
        for n in nodes:
            n.stop()
    successes = sum(e["success"] for e in episodes)
    return {
        "dataset": str(work / "data" / dataset),
        "episodes": episodes,
        "successes": successes,
        "success_rate": successes / len(episodes),
        "policy_version": policy["version"],
        "reward_messages": rewards,
        "wall_s": time.monotonic() - started,
    }


# ---------------------------------------------------------------------------------------------- (e) judge
def judge(s: DemoSettings, reward_model: dict, roll: dict) -> dict:
    from lrm_reward.refinement import judge as J

    adapters = Path(reward_model["adapters"])
    spec = ",".join(f"{m}={adapters / m}" for m in ("progress", "completion"))
    argv = [roll["dataset"], "--model", reward_model["base"], "--adapters", spec, "--device", s.device]
    argv += ["--every-k", "5", "--success-threshold", str(s.judge_threshold), "--force"]
    code = J.main(argv)
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
            }
        )
    n = sum(matrix.values())
    return {"rows": rows, "matrix": matrix, "accuracy": (matrix["tp"] + matrix["tn"]) / n if n else None}


# ---------------------------------------------------------------------------------------------- (h) report
def _episode_frames(dataset: Path) -> dict[int, dict]:
    """Per episode: reward columns and the camera images (PNG bytes) of the recorded frames."""
    import pandas as pd

    files = sorted((dataset / "data").rglob("*.parquet"))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    out: dict[int, dict] = {}
    for e, g in df.sort_values(["episode_index", "frame_index"]).groupby("episode_index"):
        images = g["observation.images.front"].tolist()
        out[int(e)] = {
            "progress": g["reward.progress"].to_numpy(dtype=float),
            "completion": g["reward.completion"].to_numpy(dtype=float),
            "fused": g["reward.fused"].to_numpy(dtype=float),
            "images": [im["bytes"] if isinstance(im, dict) else None for im in images],
        }
    return out


def _png_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _figure_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(out: Path, state: RunState, timings: dict) -> Path:
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = state.data["done"]
    s = state.data["settings"]
    parts = ["<h1>lrm demo: simulated SO-101 pick-and-place through the whole loop</h1>"]
    reward = r["reward"]
    model_text = (
        f"tiny Qwen3-VL (this machine, CPU) with LRM-style adapters trained on {len(r['demos']['episodes'])} "
        "simulated demonstrations"
        if reward["trained"]
        else f"LRM weights from {reward['base']} + {reward['adapters']}"
    )
    parts.append(f"<p>Task: <b>{html.escape(TASK)}</b>. Reward model: {html.escape(model_text)}.</p>")

    # success before / after
    r1, r2 = r.get("rollout1"), r.get("rollout2")
    rows = []
    for name, roll in (("before (round 1)", r1), ("after refinement (round 2)", r2)):
        if roll:
            rows.append(
                f"<tr><td>{name}</td><td>{html.escape(roll['policy_version'])}</td>"
                f"<td>{roll['successes']} / {len(roll['episodes'])}</td>"
                f"<td>{roll['success_rate']:.0%}</td></tr>"
            )
    parts.append(
        "<h2>Success rate (simulator ground truth)</h2><table><tr><th>round</th><th>policy</th>"
        "<th>successes</th><th>rate</th></tr>" + "".join(rows) + "</table>"
    )
    demos = r["demos"]
    parts.append(
        f"<p>Demonstrations: the noisy scripted expert succeeded in {demos['successes']} of "
        f"{len(demos['episodes'])} episodes; the policy was trained on the successes "
        f"({html.escape(r['policy']['version'])}). "
        f"Refinement used {r.get('refine', {}).get('judged_successes_used', 0)} "
        f"judged successes plus {r.get('refine', {}).get('demos_used', 0)} demonstrations "
        f"(&rarr; {html.escape(r.get('refine', {}).get('version', '-'))}).</p>"
    )

    # confusion matrix over both judged rounds
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for stage in ("judge1", "judge2"):
        for k, v in r.get(stage, {}).get("matrix", {}).items():
            total[k] += v
    n = sum(total.values())
    acc = f"{(total['tp'] + total['tn']) / n:.0%} of {n} episodes" if n else "no judged episodes"
    parts.append(
        "<h2>Judge vs. ground truth</h2><table>"
        "<tr><th></th><th>judged success</th><th>judged failure</th></tr>"
        f"<tr><th>really succeeded</th><td>{total['tp']}</td><td>{total['fn']}</td></tr>"
        f"<tr><th>really failed</th><td>{total['fp']}</td><td>{total['tn']}</td></tr></table>"
        f"<p>Judge accuracy: {acc}.</p>"
    )

    # reward curves with thumbnails
    parts.append("<h2>Reward curves (live from reward_node, as recorded)</h2>")
    for stage, roll_name in (("judge1", "rollout1"), ("judge2", "rollout2")):
        judged = r.get(stage)
        roll = r.get(roll_name)
        if not judged or not roll:
            continue
        frames = _episode_frames(Path(roll["dataset"]))
        shown = sorted(judged["rows"], key=lambda row: (not row["success"], row["episode_index"]))[:4]
        for row in shown:
            ep = frames.get(row["episode_index"])
            if ep is None:
                continue
            fig, ax = plt.subplots(figsize=(6, 2.4))
            ax.plot(ep["progress"], label="progress")
            ax.plot(ep["completion"], label="P(complete)")
            if row["curve"]:
                ax.plot(row["curve_frames"], row["curve"], "o", ms=3, label="judge progress")
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("frame (10 fps)")
            ax.legend(fontsize=7, loc="upper left")
            title = (
                f"{roll_name} ep {row['episode_index']} (seed {row['seed']}): truth "
                f"{'success' if row['success'] else 'failure'}, judged "
                f"{'success' if row['judged_success'] else 'failure'} ({row['confidence']:.2f})"
            )
            ax.set_title(title, fontsize=8)
            plot = _figure_b64(fig)
            plt.close(fig)
            imgs = [b for b in ep["images"] if b]
            picks = [imgs[0], imgs[len(imgs) // 2], imgs[-1]] if imgs else []
            thumbs = "".join(f'<img src="data:image/png;base64,{_png_b64(b)}" width="96">' for b in picks)
            parts.append(f'<div class="ep"><img src="data:image/png;base64,{plot}"><br>{thumbs}</div>')

    parts.append(
        "<h2>Watch the same live on a ROS 2 workstation</h2><pre>"
        + html.escape(
            ". scripts/env.sh\n"
            "ros2 run lrm_reward sim_robot_node --ros-args -p controller:=expert -p rate_hz:=10\n"
            'ros2 launch lrm_reward reward.launch.py image:=/camera/image task:="' + TASK + '" \\\n'
            f"    model_path:={reward['base']} adapters:={reward['adapters']} device:=cpu use_rviz:=true\n"
            "ros2 service call /sim_robot_node/start_episode std_srvs/srv/Trigger\n"
            "rqt_plot /reward_node/reward/progress /reward_node/reward/completion_prob\n"
            "ros2 run rqt_image_view rqt_image_view /reward_node/annotated\n"
        )
        + "</pre>"
    )
    timing_rows = "".join(f"<tr><td>{k}</td><td>{v:.1f} s</td></tr>" for k, v in timings.items())
    parts.append(f"<h2>Timings (this run)</h2><table>{timing_rows}</table>")
    parts.append(f"<h2>Settings</h2><pre>{html.escape(json.dumps(s, indent=1))}</pre>")
    style = (
        "body{font-family:sans-serif;max-width:980px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}.ep{margin:12px 0}"
    )
    page = "<!doctype html><html><head><meta charset='utf-8'><title>lrm demo</title>"
    page += f"<style>{style}</style></head>"
    page += "<body>" + "\n".join(parts) + "</body></html>"
    path = out / "report.html"
    path.write_text(page)
    return path


# ---------------------------------------------------------------------------------------------- main
def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny everything, a few short episodes (~3 min)")
    p.add_argument("--out", default=str(REPO / "out" / "demo"), help="output folder (default out/demo)")
    p.add_argument("--restart", action="store_true", help="start clean instead of continuing a run")
    p.add_argument(
        "--lrm-weights", default=None, help="folder with base/ (Qwen3-VL) and progress/ completion/ adapters"
    )
    p.add_argument("--device", default="cpu", help="torch device for the reward model and the policy")
    p.add_argument("--demos", type=int, default=None, help="expert demonstrations to collect")
    p.add_argument("--episodes", type=int, default=None, help="rollouts per round")
    p.add_argument("--max-steps", type=int, default=None, help="steps per episode (10 per second)")
    p.add_argument("--action-sigma", type=float, default=0.05, help="expert action noise")
    p.add_argument("--grasp-offset", type=float, default=0.01, help="[m] expert grasp offset std")
    p.add_argument(
        "--reward-steps", type=int, default=None, help="reward adapter training steps per modality"
    )
    p.add_argument(
        "--judge-threshold",
        type=float,
        default=0.25,
        # The tiny model's P(yes) on held-out successful final frames was 0.30-0.66, on failed ones <= 0.17
        # (docs/adaptation.md); 0.5 would call most successes failures.
        help="mean completion probability of the last frames for lrm-judge to call an episode a success",
    )
    p.add_argument("--policy-steps", type=int, default=None, help="ACT training steps on the demonstrations")
    p.add_argument("--refine-steps", type=int, default=None, help="ACT refinement steps")
    p.add_argument("--policy-lr", type=float, default=5e-4, help="learning rate of the ACT training")
    p.add_argument("--refine-lr", type=float, default=2e-4, help="learning rate of the ACT refinement")
    p.add_argument("--interval-frames", type=int, default=5, help="reward_node queries every k frames")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    settings = DemoSettings.from_args(args)
    out = Path(args.out).resolve()
    state = RunState(out, settings, args.restart)
    say(
        ("continuing the run in " if state.resumed else "starting a clean run in ")
        + f"{out} (finished stages: {', '.join(state.data['done']) or 'none'})"
    )
    timings: dict[str, float] = dict(state.data.get("timings", {}))
    t_all = time.monotonic()
    bar = tqdm(STAGES, desc="lrm demo", unit="stage", position=0)
    try:
        for stage in bar:
            bar.set_description(f"lrm demo: {stage}")
            if state.done(stage) and stage != "report":
                continue
            t0 = time.monotonic()
            done = state.data["done"]
            if stage == "demos":
                res = collect_demos(out, settings)
                say(f"demonstrations: expert succeeded in {res['successes']} of {settings.demos}")
            elif stage == "reward":
                res = prepare_reward_model(out, settings, done["demos"])
            elif stage == "policy":
                res = train_policy(out, settings, done["demos"])
                say(f"policy {res['version']} trained, final loss {res['final_loss']:.4f}")
            elif stage in ("rollout1", "rollout2"):
                policy = done["policy"] if stage == "rollout1" else done["refine"]
                res = rollout(out, settings, done["reward"], policy, stage)
                say(f"{stage}: {res['successes']} / {len(res['episodes'])} successes (ground truth)")
            elif stage in ("judge1", "judge2"):
                res = judge(settings, done["reward"], done["rollout" + stage[-1]])
                say(f"{stage}: judge accuracy {res['accuracy']:.0%} ({res['matrix']})")
            elif stage == "refine":
                with one_torch_thread():
                    res = refine_policy(out, settings, done["rollout1"], done["demos"])
                say(f"refined {res['version']} on {res['judged_successes_used']} judged successes")
            else:
                timings["total (this invocation)"] = time.monotonic() - t_all
                path = write_report(out, state, timings)
                res = {"path": str(path)}
            timings[stage] = time.monotonic() - t0
            state.data["timings"] = timings
            state.finish(stage, res)
    except (DemoError, SimRenderError) as exc:
        bar.close()
        print(f"[demo] error: {exc}", file=sys.stderr)
        print("[demo] rerun the same command to continue from the failed stage", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        bar.close()
        print("\n[demo] interrupted: rerun the same command to continue (or add --restart)", file=sys.stderr)
        return 130
    bar.close()
    done = state.data["done"]
    r1, r2 = done["rollout1"], done["rollout2"]
    say(
        f"success before: {r1['successes']}/{len(r1['episodes'])}, "
        f"after: {r2['successes']}/{len(r2['episodes'])}"
    )
    for stage in ("judge1", "judge2"):
        say(f"{stage}: accuracy {done[stage]['accuracy']} confusion {done[stage]['matrix']}")
    say(f"total {time.monotonic() - t_all:.0f} s; report: {done['report']['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
