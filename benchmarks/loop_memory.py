"""Peak memory of the whole day + night loop: the RSS of every process, with one copy of the reward model.

Runs ``ros2 launch lrm_reward self_improvement.launch.py use_sim:=true`` (tiny LRM on the CPU, a tiny ACT
in a policy store), then the day and the night as an operator would: episodes (policy_node drives
sim_robot_node, reward_node scores live, refinement_node records), ``refinement_node/judge_episode`` on
them, and ``refinement_node/run_nightly`` (lrm-judge + lrm-refine as child processes). Meanwhile it
samples the RSS of the launch and every descendant (psutil) every 0.1 s and prints, per process: its peak,
its RSS at the moment the whole loop peaked, and whether it holds the reward model.

    . scripts/env.sh && python benchmarks/loop_memory.py                  # one copy (the default setup)
    python benchmarks/loop_memory.py --three-copies   # the old way, for comparison: refinement_node and the
                                                      # nightly lrm-judge each load their own copy
    python benchmarks/loop_memory.py --json out.json

On the tiny model the weights are a few MB, so the numbers show the processes and what each costs in host
memory (Python + torch + the model); the GPU arithmetic for the 8B is in docs/refinement.md ("One copy of
the reward model for day and night"). Runs itself inside ``unshare -n`` (loopback only). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml
from ros_loopback import enter_loopback_namespace

REPO = Path(__file__).resolve().parents[1]
DOMAIN_ID = "65"
TASK = "pick up the purple cube and place it on the green target"
MIB = 1024 * 1024
# the processes that load the reward model in each setup
MODEL_HOLDERS = {
    "one copy": ("reward_node",),
    "three copies": ("reward_node", "refinement_node", "nightly lrm-judge --model"),
}


def label(proc: psutil.Process) -> str:
    """What a process of the loop is, from its command line."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"
    for node in ("reward_node", "refinement_node", "policy_node", "sim_robot_node"):
        if f"lib/lrm_reward/{node}" in cmd or f"lrm_reward.ros.{node}" in cmd:
            return node
    if "lrm_reward.refinement.judge" in cmd:
        return "nightly lrm-judge --via-node" if "--via-node" in cmd else "nightly lrm-judge --model"
    if "lrm_reward.refinement.refine" in cmd:
        return "nightly lrm-refine"
    if "episode_saver" in cmd:
        return "episode saver (refinement_node's child)"
    if "ros2 launch" in cmd or "bin/ros2" in cmd:
        return "ros2 launch"
    return Path(proc.name()).name


class RssSampler:
    """The RSS of a process tree every `period_s`: per label, its peak and its value at the tree's peak."""

    def __init__(self, root_pid: int, period_s: float = 0.1) -> None:
        self.root = psutil.Process(root_pid)
        self.period_s = period_s
        self.peak: dict[str, int] = {}
        self.total_peak = 0
        self.at_total_peak: dict[str, int] = {}
        self.phase = "start"
        self.total_peak_phase = ""
        self.phase_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample: dict[str, int] = {}
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    rss = proc.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                name = label(proc)
                sample[name] = sample.get(name, 0) + rss
            for name, rss in sample.items():
                self.peak[name] = max(self.peak.get(name, 0), rss)
            total = sum(sample.values())
            self.phase_peaks[self.phase] = max(self.phase_peaks.get(self.phase, 0), total)
            if total > self.total_peak:
                self.total_peak, self.at_total_peak, self.total_peak_phase = total, sample, self.phase
            self._stop.wait(self.period_s)


class Operator:
    """Calls the nodes' services like an operator (or a script) would."""

    def __init__(self) -> None:
        import rclpy
        from rclpy.node import Node
        from std_srvs.srv import Trigger

        from lrm_interfaces.srv import JudgeEpisode, StartEpisode, StopEpisode

        self.rclpy = rclpy
        rclpy.init()
        self.node = Node("loop_memory_operator")
        self.T = {"Trigger": Trigger, "Start": StartEpisode, "Stop": StopEpisode, "Judge": JudgeEpisode}
        self.clients = {
            "record": self.node.create_client(StartEpisode, "/refinement_node/start_episode"),
            "save": self.node.create_client(StopEpisode, "/refinement_node/stop_episode"),
            "judge": self.node.create_client(JudgeEpisode, "/refinement_node/judge_episode"),
            "nightly": self.node.create_client(Trigger, "/refinement_node/run_nightly"),
            "policy": self.node.create_client(StartEpisode, "/policy_node/start_episode"),
            "policy_stop": self.node.create_client(StopEpisode, "/policy_node/stop_episode"),
            "sim": self.node.create_client(Trigger, "/sim_robot_node/start_episode"),
            "sim_result": self.node.create_client(Trigger, "/sim_robot_node/last_result"),
        }

    def call(self, name: str, request, timeout: float = 300.0):
        client = self.clients[name]
        if not client.wait_for_service(timeout_sec=timeout):
            raise RuntimeError(f"{client.srv_name} not available")
        future = client.call_async(request)
        self.rclpy.spin_until_future_complete(self.node, future, timeout_sec=timeout)
        if not future.done():
            raise RuntimeError(f"{client.srv_name} did not answer in {timeout:.0f} s")
        return future.result()

    def episode(self, index: int) -> dict:
        T = self.T
        deadline = time.monotonic() + 300
        while (res := self.call("policy", T["Start"].Request(task=TASK))).result != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"policy_node: {res.message}")
            time.sleep(1.0)
        rec = self.call("record", T["Start"].Request(task=TASK))
        if rec.result != 0:
            raise RuntimeError(f"refinement_node: {rec.message}")
        started = self.call("sim", T["Trigger"].Request())
        episode = json.loads(started.message)["episode"]
        while True:
            polled = self.call("sim_result", T["Trigger"].Request(), timeout=10.0)
            if polled.success and json.loads(polled.message)["episode"] == episode:
                break
            self.rclpy.spin_once(self.node, timeout_sec=0.5)
        self.call("policy_stop", T["Stop"].Request())
        saved = self.call("save", T["Stop"].Request(outcome=2))
        return {"episode": index, "frames": saved.num_frames, "message": saved.message}

    def close(self) -> None:
        self.node.destroy_node()
        self.rclpy.try_shutdown()


def write_params(work: Path, tiny, three_copies: bool, steps: int) -> Path:
    params = yaml.safe_load((REPO / "config" / "self_improvement.yaml").read_text())
    params["reward_node"]["ros__parameters"].update(interval_frames=5)
    rec = params["refinement_node"]["ros__parameters"]
    rec.update(use_videos=False, dataset_name="day", max_gap_s=2.0)
    rec["judge"]["curve_every_k"] = 5
    rec["nightly"].update(steps=steps, batch_size=4, demos=[str(work / "data" / "day")], datasets=["day"])
    if three_copies:
        adapters = ",".join(f"{m}={tiny.adapters[m]}" for m in ("progress", "completion"))
        rec["judge"].update(
            mode="local", model=str(tiny.base), adapters=adapters, device="cpu", dtype="float32"
        )
    params["sim_robot_node"]["ros__parameters"].update(max_steps=30)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def run_loop(args, work: Path) -> dict:
    from lrm_reward.core import tiny_model
    from lrm_reward.policy.tiny_policy import store_tiny_act
    from lrm_reward.refinement.feature_topics import ENV_STATE_KEY, STATE_KEY, image_key

    tiny = tiny_model.cached_tiny_lrm(REPO / ".cache" / "tiny_lrm", seed=0)
    store = work / "policies"
    store_tiny_act(
        store, "act_pick", {image_key("front"): (3, 96, 96), STATE_KEY: (6,), ENV_STATE_KEY: (6,)}, 4
    )
    params = write_params(work, tiny, args.three_copies, args.refine_steps)
    log = open(work / "launch.log", "wb")  # noqa: SIM115 - closed below
    argv = ["ros2", "launch", "lrm_reward", "self_improvement.launch.py", f"params_file:={params}"]
    argv += ["use_sim:=true", f"policy:={store / 'act_pick'}", f"task:={TASK}", f"data_root:={work / 'data'}"]
    argv += [f"model_path:={tiny.base}", f"adapters:={tiny.base.parent}", "device:=cpu", "dtype:=float32"]
    launch = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    sampler = RssSampler(launch.pid)
    sampler.start()
    operator = Operator()
    timings = {}
    try:
        sampler.phase = "day: episodes"
        started = time.monotonic()
        episodes = [operator.episode(i) for i in range(args.episodes)]
        timings["episodes_s"] = time.monotonic() - started
        sampler.phase = "day: judge_episode"
        started = time.monotonic()
        judged = operator.call("judge", operator.T["Judge"].Request(dataset="day", episode_index=-1))
        timings["judge_s"] = time.monotonic() - started
        if judged.result != 0:
            raise RuntimeError(f"judge_episode: {judged.message}")
        sampler.phase = "night: lrm-judge + lrm-refine"
        started = time.monotonic()
        nightly = operator.call("nightly", operator.T["Trigger"].Request())
        if not nightly.success:
            raise RuntimeError(f"run_nightly: {nightly.message}")
        nightly_log = Path(nightly.message.rsplit("log: ", 1)[1])
        while "=== refine exited" not in _read(nightly_log) and "=== judge exited with 1" not in _read(
            nightly_log
        ):
            time.sleep(0.5)
        timings["nightly_s"] = time.monotonic() - started
        night = _read(nightly_log)
    finally:
        operator.close()
        sampler.phase = "shutdown"
        os.killpg(launch.pid, signal.SIGINT)
        try:
            launch.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(launch.pid, signal.SIGKILL)
        sampler.stop()
        log.close()
    return {
        "setup": "three copies" if args.three_copies else "one copy",
        "episodes": episodes,
        "judge_message": judged.message,
        "nightly_exit_codes": re.findall(r"=== (\w+) exited with (\d+)", night),
        "timings_s": timings,
        "peak_mib": {k: v / MIB for k, v in sorted(sampler.peak.items())},
        "at_total_peak_mib": {k: v / MIB for k, v in sorted(sampler.at_total_peak.items())},
        "total_peak_mib": sampler.total_peak / MIB,
        "total_peak_phase": sampler.total_peak_phase,
        "phase_peak_mib": {k: v / MIB for k, v in sampler.phase_peaks.items()},
        "work": str(work),
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def print_table(result: dict) -> None:
    print(f"\n{result['setup']}: RSS of every process of the loop (MiB; tiny LRM on the CPU)")
    print(f"{'process':<40} {'peak':>8} {'at loop peak':>13}  reward model")
    for name, peak in sorted(result["peak_mib"].items(), key=lambda kv: -kv[1]):
        if peak < 1:
            continue  # gone before its first sample
        now = result["at_total_peak_mib"].get(name, 0.0)
        holds = "loaded" if name in MODEL_HOLDERS[result["setup"]] else ""
        print(f"{name:<40} {peak:>8.0f} {now:>13.0f}  {holds}")
    total = f"{result['total_peak_mib']:>13.0f}  ({result['total_peak_phase']})"
    print(f"{'whole loop at its peak':<40} {'':>8} {total}")
    for phase, peak in result["phase_peak_mib"].items():
        print(f"  peak during {phase:<34} {peak:>8.0f}")
    print(f"nightly steps: {result['nightly_exit_codes']}; timings: {result['timings_s']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=2, help="episodes recorded before judging")
    p.add_argument("--refine-steps", type=int, default=20, help="lrm-refine training steps in the night")
    p.add_argument("--three-copies", action="store_true", help="the old setup: three copies of the model")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    code = enter_loopback_namespace(Path(__file__), DOMAIN_ID)
    if code is not None:
        return code
    os.environ.setdefault("ROS_LOG_DIR", tempfile.mkdtemp(prefix="lrm-roslog."))
    work = Path(tempfile.mkdtemp(prefix="loop_memory."))
    result = run_loop(args, work)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
