"""reward_node with ``model.backend: vllm`` against a real vLLM server (the tiny head_dim-32 model, CPU,
loopback): queried frames are answered by the server; the server killed mid-run -> every frame still
answered (held, the failed queries counted as unparsed), /diagnostics ERROR naming the server, the node up;
the server back -> answers again, the reconnect counted. Skips, saying why, without .venv-vllm."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ros, pytest.mark.slow]

rclpy = pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from test_reward_node import FPS, MODEL_STATUS, T0_NS, Probe, image_msg, kv, pick_and_place_frame  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm"))
from vllm_servers import TINY_CACHE, TINY_VARIANT, needs_vllm, server_for  # noqa: E402

TASK = "put the red block on the green target"
FRAMES = 12
INTERVAL = 4


@pytest.fixture
def server(tmp_path):
    needs_vllm()
    from lrm_reward.core import tiny_model

    tiny = tiny_model.cached_tiny_lrm(TINY_CACHE, seed=0, variant=TINY_VARIANT)
    handle = server_for(tiny, tmp_path, ("completion",))
    handle.start()
    yield tiny, handle
    handle.stop()


def play(probe: Probe, offset_s: int):
    stamps = [T0_NS + offset_s * 1_000_000_000 + i * 1_000_000_000 // FPS for i in range(FRAMES)]
    frames = [pick_and_place_frame(i / (FRAMES - 1)) for i in range(FRAMES)]
    probe.publish_frames(probe.raw, [image_msg(f, ns) for f, ns in zip(frames, stamps, strict=True)])
    return probe.wait_rewards(stamps, timeout=180.0)


def test_reward_node_scores_through_vllm_and_rides_out_a_server_crash(start_node, ros_node, server):
    tiny, up = server
    params = {
        "task": TASK,
        "image_topics": ["image"],
        "model": {
            "base": str(tiny.base),
            "adapters": {"completion": str(tiny.adapters["completion"])},
            "backend": "vllm",
            "server_url": up.url,
            # a loaded 2-core CI machine can take more than the default 10 s over a call; the kill below
            # fails fast (connection refused), not by this timeout
            "request_timeout_s": 60.0,
            "device": "cpu",
            "dtype": "float32",
        },
        "modalities": ["completion"],
        "interval_frames": INTERVAL,
        "qos_overrides": {
            "/camera/image": {
                "subscription": {"reliability": "reliable", "depth": 200, "history": "keep_last"}
            }
        },
    }
    process = start_node("lrm_reward", "reward_node", params=params, args=["-r", "image:=/camera/image"])
    probe = Probe(ros_node, process)
    probe.wait_connected(probe.raw)

    rewards = play(probe, 0)
    queried = [r for r in rewards if r.queried]
    assert queried and all(r.unparsed == 0 and 0.0 <= r.completion_prob <= 1.0 for r in queried)
    status = probe.fresh_diagnostics(lambda s: MODEL_STATUS in s)[MODEL_STATUS]
    assert "vLLM servers answering" in kv(status)["server"], kv(status)

    up.kill()
    rewards = play(probe, 10)  # every frame still answered: the queried ones as failed, the rest held
    assert process.alive()
    failed = [r for r in rewards if r.queried]
    assert failed and all(r.unparsed > 0 for r in failed), [(r.queried, r.unparsed) for r in rewards]
    assert all(math.isfinite(r.reward) for r in rewards)
    down = probe.fresh_diagnostics(
        lambda s: MODEL_STATUS in s and s[MODEL_STATUS].level == DiagnosticStatus.ERROR, 30.0
    )[MODEL_STATUS]
    assert "not answering" in down.message and up.url in down.message, down.message
    assert any(k.startswith("server faults") for k in kv(down)), kv(down)

    up.start()
    answered = []
    for attempt in range(6):  # the backend retries a down server with backoff: a few clips at most
        rewards = play(probe, 20 + 10 * attempt)
        answered = [r for r in rewards if r.queried and r.unparsed == 0]
        if answered:
            break
    assert answered, "no frame scored after the server came back"
    back = probe.fresh_diagnostics(
        lambda s: MODEL_STATUS in s and "answering:" in kv(s[MODEL_STATUS])["server"]
    )
    assert int(kv(back[MODEL_STATUS])["server reconnects"]) >= 1
    assert process.alive()
