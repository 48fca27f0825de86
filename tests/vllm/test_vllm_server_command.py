"""lrm-vllm-server builds its vLLM command lines from the reward node's model config; the CLIs take
--backend vllm --server URL. No server is started here (test_vllm_parity.py and the others do that)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from lrm_reward.core.backend_arguments import add_backend_arguments, backend_settings
from lrm_reward.serving import vllm_server as S

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def adapters(tmp_path) -> dict[str, str]:
    folders = {}
    for name, rank in (("progress", 64), ("contrastive", 64), ("completion", 32)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 128}))
        folders[name] = str(folder)
    return folders


def _spec(adapters, **changes) -> S.ServerSpec:
    settings = dict(base_model="Qwen/Qwen3-VL-8B-Instruct", adapters=adapters, python=sys.executable)
    settings.update(changes)
    return S.ServerSpec(**settings)


def test_two_servers_base_with_lora_modules_and_the_merged_progress_model(adapters, tmp_path):
    merged = tmp_path / "merged"
    base, progress = S.server_processes(_spec(adapters, merged_progress=str(merged), port=9000))
    assert (base.name, base.url, progress.name, progress.url) == (
        "base",
        "http://127.0.0.1:9000",
        "progress",
        "http://127.0.0.1:9001",
    )
    argv = base.argv
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == "Qwen/Qwen3-VL-8B-Instruct"  # a Hub id stays one (HF cache)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--max-lora-rank") + 1] == "64"
    modules = argv[argv.index("--lora-modules") + 1 :][:2]
    assert sorted(m.split("=")[0] for m in modules) == ["completion", "contrastive"]  # not progress
    assert "--enable-prompt-tokens-details" in argv and "--enable-prefix-caching" in argv
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.45"  # two models share the GPU
    assert progress.argv[progress.argv.index("--model") + 1] == str(merged.resolve())
    assert progress.argv[progress.argv.index("--served-model-name") + 1] == "progress"
    assert "--enable-lora" not in progress.argv
    assert base.env["VLLM_HOST_IP"] == "127.0.0.1" and base.env["HF_HUB_OFFLINE"] == "1"


def test_cpu_flags_and_no_progress_means_one_server(adapters):
    only = {k: v for k, v in adapters.items() if k != "progress"}
    (server,) = S.server_processes(_spec(only, device="cpu", prefix_caching=False))
    assert "--block-size" in server.argv and "--no-enable-prefix-caching" in server.argv
    assert "--gpu-memory-utilization" not in server.argv and server.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_binding_off_loopback_needs_allow_remote(adapters):
    with pytest.raises(ValueError, match="allow-remote"):
        _spec(adapters, host="0.0.0.0")
    spec = _spec(adapters, host="0.0.0.0", allow_remote=True, merged_progress="/m")
    assert S.server_processes(spec)[0].url == "http://127.0.0.1:8000"


def test_progress_needs_the_merged_model(adapters):
    with pytest.raises(ValueError, match="merge it first"):
        S.server_processes(_spec(adapters))


def test_the_model_config_comes_from_the_reward_node_yaml(tmp_path):
    settings = S.model_config_from_yaml(REPO / "config" / "reward_node.yaml")
    assert settings["base_model"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert set(settings["adapters"]) == {"progress", "contrastive", "completion"}
    args = S.build_parser().parse_args(
        ["--config", str(REPO / "config" / "reward_node.yaml"), "--port", "8100"]
    )
    spec = S.spec_from_args(args)
    assert spec.merged_progress and spec.progress_port == 8101 and spec.host == "127.0.0.1"
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "reward_node:\n  ros__parameters:\n    model.base: /b\n    model.adapters.completion: /c\n"
    )
    assert S.model_config_from_yaml(flat) == {
        "base_model": "/b",
        "adapters": {"completion": "/c"},
        "local_files_only": True,
    }


def test_print_shows_the_command_lines(adapters, tmp_path, capsys):
    argv = [
        "--base-model",
        "/base",
        "--vllm-python",
        sys.executable,
        "--print",
        "--merged-progress",
        str(tmp_path),
    ]
    argv += [f"--adapter={name}={folder}" for name, folder in adapters.items()]
    assert S.main(argv) == 0
    out = capsys.readouterr().out
    assert "# base: http://127.0.0.1:8000" in out and "# progress: http://127.0.0.1:8001" in out
    assert S.main(["--print"]) == 2  # no model config at all


def test_a_merge_is_current_only_for_the_same_base_and_adapter_weights(adapters, tmp_path):
    weights = Path(adapters["progress"]) / "adapter_model.safetensors"
    weights.write_bytes(b"weights v1")
    merged = tmp_path / "merged"
    merged.mkdir()
    record = {
        "base": "/base",
        "adapter": str(Path(adapters["progress"]).resolve()),
        "adapter_sha256": S._sha256(weights),
    }
    (merged / S.MERGED_PROVENANCE_FILE).write_text(json.dumps(record))
    assert S.merged_is_current(merged, "/base", adapters["progress"])
    assert not S.merged_is_current(merged, "/other-base", adapters["progress"])
    weights.write_bytes(b"weights v2")  # the adapter was retrained: merge again
    assert not S.merged_is_current(merged, "/base", adapters["progress"])


def _backend(*argv: str) -> dict:
    parser = argparse.ArgumentParser()
    add_backend_arguments(parser)
    return backend_settings(parser.parse_args(list(argv)))


def test_backend_flags_become_engine_settings():
    assert _backend() == {}
    assert _backend(
        "--backend", "vllm", "--server", "http://127.0.0.1:8000", "--server", "http://127.0.0.1:8001"
    ) == {
        "backend": "vllm",
        "server_url": "http://127.0.0.1:8000,http://127.0.0.1:8001",
        "allow_remote": False,
        "server_required": True,
    }
    settings = _backend(
        "--backend", "vllm", "--server", "http://h:1", "--allow-remote", "--request-timeout", "3"
    )
    assert settings["allow_remote"] is True and settings["request_timeout_s"] == 3.0
    with pytest.raises(ValueError, match="needs --server"):
        _backend("--backend", "vllm")
    with pytest.raises(ValueError, match="go with --backend vllm"):
        _backend("--server", "http://127.0.0.1:8000")


def test_lrm_eval_reward_takes_the_backend_flags(tmp_path):
    from lrm_reward.adaptation import evaluate

    argv = ["--base-model", "/base", "--adapters", "released=/adapters", "--dataset", str(tmp_path)]
    argv += ["--output-dir", str(tmp_path / "out")]
    argv += ["--backend", "vllm", "--server", "http://127.0.0.1:8000", "--request-timeout", "30"]
    args = evaluate.build_parser().parse_args(argv)
    cfg = evaluate.config_from_args(args)
    assert (cfg.backend, cfg.server_url, cfg.allow_remote, cfg.request_timeout_s) == (
        "vllm",
        "http://127.0.0.1:8000",
        False,
        30.0,
    )


@pytest.mark.slow
def test_the_command_serves_from_the_node_config_and_stops_its_server_on_sigterm(tiny_vllm_lrm, tmp_path):
    """lrm-vllm-server end to end (one server: completion only, to keep one vLLM process on this machine)."""
    import os
    import signal
    import subprocess
    import urllib.request

    from vllm_servers import VLLM_PYTHON, free_port, needs_vllm

    needs_vllm()
    config = tmp_path / "reward_node.yaml"
    config.write_text(
        "reward_node:\n  ros__parameters:\n    model:\n"
        f"      base: {tiny_vllm_lrm.base}\n      adapters:\n"
        f"        completion: {tiny_vllm_lrm.adapters['completion']}\n"
    )
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "lrm_reward.serving.vllm_server",
        "--config",
        str(config),
        "--port",
        str(port),
    ]
    argv += [
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--vllm-python",
        str(VLLM_PYTHON),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "ros2_ws" / "src" / "lrm_reward")}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("reward node:") or proc.poll() is not None:
                break
        assert f'model.server_url: "http://127.0.0.1:{port}"' in "".join(lines), "".join(lines[-20:])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        with pytest.raises(OSError):
            opener.open(f"http://127.0.0.1:{port}/health", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
