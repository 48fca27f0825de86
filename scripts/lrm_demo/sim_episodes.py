"""Episodes of the noisy scripted expert in the simulator, recorded as LeRobotDatasets with ground truth.

Two stages use it: the demonstrations the policy learns from, and the labelled episodes the reward model
learns from (in a lab, operator-labelled recordings play that part). Every episode's outcome is the
simulator's ground truth, written to the recorder's sidecar, where lrm-train-reward reads its labels.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tqdm import tqdm

from lrm_demo.common import DEMO_SEED, DemoError, DemoSettings, fresh_dir
from lrm_reward.sim.so101_scene import ACTION_NAMES, ENV_STATE_NAMES, JOINT_NAMES, TASK


def record_expert_episodes(
    root: Path,
    seeds: list[int],
    noises: list[tuple[float, float, str]],
    s: DemoSettings,
    dataset_for,
    desc: str,
) -> list[dict]:
    """Run the noisy expert on each seed (noise levels and failure modes taken in turn) and record it.

    dataset_for(success) names the dataset an episode goes to, so successes and failures can be kept
    apart (demonstrations) or together (reward-model data).
    """
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
        for i, seed in enumerate(tqdm(seeds, desc=desc, unit="ep", leave=False)):
            sigma, grasp_offset, fail_mode = noises[i % len(noises)]
            # One noise seed; the episode seed varies the noise (reset below).
            expert = NoisyExpert(ExpertNoise(sigma, grasp_offset, seed=DEMO_SEED, fail_mode=fail_mode))
            state = scene.reset(seed)
            expert.reset(seed)
            frames = [(state, None)]
            while not state.done:
                action = expert.act(state)
                state = scene.step(action)
                frames.append((state, action))
            ok = bool(state.success)
            noise = [sigma, grasp_offset, fail_mode]
            outcomes.append({"seed": seed, "success": ok, "steps": state.step_index, "noise": noise})
            rec = recorder(dataset_for(ok))
            rec.start(
                TASK,
                notes=f"noisy expert {sigma}/{grasp_offset} {fail_mode}, seed {seed}".replace("  ", " "),
                policy_version="scripted_expert",
            )
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
                raise DemoError(f"saving episode {i} (seed {seed}) failed: {result.message}")
    for rec in recorders.values():
        rec.close()
    return outcomes


def collect_demos(out: Path, s: DemoSettings) -> dict:
    root = fresh_dir(out / "data" / "demos_stage")
    seeds = [DEMO_SEED + i for i in range(s.demos)]
    noise = [(s.expert_action_sigma, s.expert_grasp_offset_m, "")]
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
