"""Episodes of the noisy scripted expert in the simulator, recorded as LeRobotDatasets with ground truth.

Two stages use it: the demonstrations the policy learns from, and the labelled episodes the reward model
learns from (in a lab, operator-labelled recordings play that part). Every episode's outcome is the
simulator's ground truth, written to the recorder's sidecar, where lrm-train-reward reads its labels.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lrm_demo.common import DEMO_SEED, DemoError, DemoSettings, fresh_dir
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, TASK

# (action sigma, grasp offset sigma, failure mode, place offset): the offset from the target's centre where
# the cube is put down, at most this far (m) or a (least, most) pair.
Noise = tuple[float, float, str, float | tuple[float, float]]


def record_expert_episodes(
    root: Path,
    seeds: list[int],
    noises: list[Noise],
    s: DemoSettings,
    dataset_for,
    desc: str,
) -> list[dict]:
    """Run the noisy expert on each seed (noise levels and failure modes taken in turn) and record it.

    dataset_for(success) names the dataset an episode goes to, so successes and failures can be kept
    apart (demonstrations) or together (reward-model data).
    """
    jobs = _jobs(seeds, noises)
    with tqdm(total=len(jobs), desc=desc, unit="ep", leave=False) as bar:
        return _record(root, jobs, s, dataset_for, bar.update)


def _jobs(seeds: list[int], noises: list[Noise]) -> list[tuple]:
    """(index, seed, noise) per episode: noise levels and failure modes taken in turn."""
    return [(i, seed, noises[i % len(noises)]) for i, seed in enumerate(seeds)]


def record_expert_episodes_sharded(
    root: Path,
    seeds: list[int],
    noises: list[Noise],
    s: DemoSettings,
    dataset: str,
    desc: str,
    shards: int,
) -> tuple[list[dict], list[Path]]:
    """record_expert_episodes into `shards` datasets (root/part<k>/<dataset>), one process per shard.

    Rendering is most of the time (software GL: ~40 ms a frame) and one process uses one core, so the
    shards are recorded side by side, as many at once as there are cores (one after the other on one).
    The shard count, not the core count, decides which episode lands where: the datasets are the same on
    every machine. Returns the outcomes in seed order and the datasets.
    """
    import multiprocessing as mp
    import queue
    from contextlib import suppress

    jobs = _jobs(seeds, noises)
    parts = [(root / f"part{k}", jobs[k::shards]) for k in range(shards)]
    processes = max(1, min(shards, os.cpu_count() or 1))
    with tqdm(total=len(jobs), desc=desc, unit="ep", leave=False) as bar:
        if processes == 1:
            results = [_record_shard(part, shard, s, dataset, bar) for part, shard in parts]
        else:
            ctx = mp.get_context("spawn")  # a fresh GL context per process: never fork one
            with ctx.Manager() as manager, ctx.Pool(processes) as pool:
                done = manager.Queue()  # each worker says "one more episode" here
                pending = [
                    pool.apply_async(_record_shard, (part, shard, s, dataset, done)) for part, shard in parts
                ]
                while any(not p.ready() for p in pending) or not done.empty():
                    with suppress(queue.Empty):
                        bar.update(done.get(timeout=0.5))
                results = [p.get() for p in pending]  # re-raises a worker's DemoError here
    order = {seed: n for n, seed in enumerate(seeds)}
    outcomes = sorted((o for shard in results for o in shard), key=lambda o: order[o["seed"]])
    return outcomes, [part / dataset for part, _ in parts]


def _record_shard(root: Path, jobs: list, s: DemoSettings, dataset: str, done) -> list[dict]:
    """One shard of reward-model data, with final frames; done: a queue (worker) or the bar (in-process)."""
    progress = done.update if hasattr(done, "update") else done.put
    return _record(root, jobs, s, lambda ok: dataset, progress, final_frame=True)


def _record(root: Path, jobs: list, s: DemoSettings, dataset_for, progress, final_frame=False) -> list[dict]:
    """Record the (index, seed, noise) jobs; progress(1) after each episode.

    final_frame: also record the episode's last frame (after the scene's end-of-episode home move), as the
    live recorder does; the judge reads it, so the reward model's data needs it. Demonstrations leave it
    out: no action follows it for a policy to learn."""
    from lrm_reward.refinement.recorder import EpisodeOutcome, EpisodeRecorder, RecorderConfig
    from lrm_reward.sim.noisy_expert import ExpertNoise, NoisyExpert
    from lrm_reward.sim.so101_scene import CONTROL_DT_S, SceneConfig, So101Scene

    recorders: dict[str, EpisodeRecorder] = {}

    def recorder(name: str) -> EpisodeRecorder:
        if name not in recorders:
            recorders[name] = EpisodeRecorder(
                RecorderConfig(
                    data_root=root,
                    cameras=("front",),
                    fps=round(1 / CONTROL_DT_S),
                    dataset_name=name,
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
        return recorders[name]

    outcomes = []
    scene_cfg = SceneConfig(image_size=s.image_size, max_steps=s.max_steps, camera=s.camera_view)
    with So101Scene(scene_cfg) as scene:
        for i, seed, (sigma, grasp_offset, fail_mode, place_offset) in jobs:
            # One noise seed; the episode seed varies the noise (reset below).
            place_min, place_max = _place_range(place_offset)
            expert = NoisyExpert(
                ExpertNoise(
                    sigma,
                    grasp_offset,
                    DEMO_SEED,
                    fail_mode,
                    place_offset_max_m=place_max,
                    place_offset_min_m=place_min,
                )
            )
            state = scene.reset(seed)
            expert.reset(seed)
            frames = [(state, None)]
            while not state.done:
                action = expert.act(state)
                state = scene.step(action)
                frames.append((state, action))
            ok = bool(state.success)
            noise = [sigma, grasp_offset, fail_mode, place_offset]
            outcomes.append({"seed": seed, "success": ok, "steps": state.step_index, "noise": noise})
            rec = recorder(dataset_for(ok))
            how = " ".join(str(x) for x in (f"{sigma}/{grasp_offset}", fail_mode) if x)
            if place_max:
                how += f", placed {place_min}-{place_max} m off-centre"
            rec.start(TASK, notes=f"noisy expert {how}, seed {seed}", policy_version="scripted_expert")
            t0 = 1_000_000.0 + i * 1000.0
            # The action that led to frame k+1 is recorded with frame k (what the robot did from there); the
            # final frame, if kept, with a standstill (gripper as it was).
            last = frames[-1][1]
            hold = np.array([0.0, 0.0, 0.0, last[3]], np.float32) if last is not None else None
            actions = [frames[k + 1][1] for k in range(len(frames) - 1)] + [hold]
            for k, (st, _) in enumerate(frames if final_frame else frames[:-1]):
                t = t0 + k * CONTROL_DT_S
                rec.add_image("front", t, st.image)
                rec.add_state(t, st.joint_positions, JOINT_NAMES)
                rec.add_environment_state(t, st.environment_state, ENV_STATE_NAMES)
                rec.add_action(t, actions[k], ACTION_NAMES)
            result = rec.stop(EpisodeOutcome.SUCCESS if ok else EpisodeOutcome.FAILURE)
            if result.status.value not in ("saved",):
                raise DemoError(f"saving episode {i} (seed {seed}) failed: {result.message}")
            progress(1)
    for rec in recorders.values():
        rec.close()
    return outcomes


def _place_range(place_offset) -> tuple[float, float]:
    """A noise entry's place offset: the most (m), or a (least, most) pair."""
    if isinstance(place_offset, (tuple, list)):
        return float(place_offset[0]), float(place_offset[1])
    return 0.0, float(place_offset)


def collect_demos(out: Path, s: DemoSettings) -> dict:
    root = fresh_dir(out / "data" / "demos_stage")
    seeds = [DEMO_SEED + i for i in range(s.demos)]
    noise = [(s.expert_action_sigma, s.expert_grasp_offset_m, "", 0.0)]
    outcomes = record_expert_episodes(
        root, seeds, noise, s, lambda ok: "demos" if ok else "demos_failed", "demos: noisy expert in sim"
    )
    n_ok = sum(o["success"] for o in outcomes)
    if n_ok == 0:
        raise DemoError("the noisy expert never succeeded: lower --action-sigma / --grasp-offset")
    final = out / "data" / "demos"
    if final.exists():
        shutil.rmtree(final)
    root.rename(final)
    return {"episodes": outcomes, "successes": n_ok, "root": str(final / "demos")}
