"""``lrm-vllm-server``: the vLLM servers for the reward model, built from the reward node's own model config.

What this is for: one GPU box answering many robots (``model.backend: vllm`` on each reward node). From the
same base + adapters the node is configured with, it builds the command lines of (at most) two vLLM
OpenAI-compatible servers and runs them:

- the base model with the LoRA adapters vLLM can serve (completion, contrastive; each a model name), and
- the progress adapter merged into the base (``merge_adapter``), as a whole model named "progress": the
  released progress adapter carries a full vision tower (``modules_to_save``), which vLLM's LoRA support
  refuses; serving it without the tower would change its scores. The merged copy costs one more model's
  weights on the GPU (docs/vllm.md: ~17.5 GB in bf16 for the 8B, an estimate from its config).

Both bind where told (127.0.0.1 unless ``--allow-remote``), run from vLLM's own venv (``.venv-vllm``, made by
scripts/setup_vllm.sh: vLLM cannot share the project's venv), and are supervised: if one exits, the other
is stopped and the command fails (a systemd unit restarts it). ``--print`` shows the command lines only.

What it is not: no client (``lrm_reward.core.vllm_client``), no load balancing, no TLS or authentication: a
server off loopback serves anyone who can reach it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lrm_reward.core.types import Modality
from lrm_reward.core.vllm_model_checks import MERGED_PROVENANCE_FILE  # written here, checked by the client

log = logging.getLogger(__name__)

BASE_MODEL_NAME = "base"  # served name of the base model (the client finds it by parent=None anyway)
PROGRESS_MODEL_NAME = Modality.PROGRESS.value
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # --max-lora-rank values vLLM accepts
DEVICES = ("cpu", "cuda")
VLLM_VENV = ".venv-vllm"


@dataclass
class ServerSpec:
    """What to serve and where. adapters: modality -> folder, as in the node config (progress included)."""

    base_model: str
    adapters: dict[str, str] = field(default_factory=dict)
    merged_progress: str | None = None  # folder of the merged progress model (made when missing)
    host: str = "127.0.0.1"
    port: int = 8000
    progress_port: int | None = None  # default port + 1
    device: str = "cuda"
    dtype: str = "auto"  # vLLM's --dtype: auto (the checkpoint's), bfloat16, float16, float32
    max_model_len: int = 4096
    prefix_caching: bool = True
    # GPU share of each server (two servers on one GPU must not both take vLLM's default 0.9)
    gpu_memory_utilization: float | None = None
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU build only)
    allow_remote: bool = False
    local_files_only: bool = True
    python: str | None = None  # the vLLM venv's python; None = found (see find_vllm_python)
    extra_args: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from lrm_reward.core.vllm_transport import is_loopback_host

        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError("base_model is required")
        self.adapters = {str(k): str(v) for k, v in (self.adapters or {}).items() if v}
        unknown = sorted(set(self.adapters) - {m.value for m in Modality})
        if unknown:
            raise ValueError(f"adapter names must be modalities, got {unknown}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if not is_loopback_host(self.host) and not self.allow_remote:
            raise ValueError(
                f"host {self.host!r} is not loopback: refused (the server has no authentication); "
                "pass --allow-remote to serve other machines"
            )
        for name in ("port", "progress_port"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 1 <= value <= 65535):
                raise ValueError(f"{name} must be a TCP port, got {value!r}")
        if self.progress_port is None:
            self.progress_port = self.port + 1
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization < 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1)")

    @property
    def lora_adapters(self) -> dict[str, str]:
        """The adapters served as LoRA modules on the base (all but progress)."""
        return {k: v for k, v in self.adapters.items() if k != PROGRESS_MODEL_NAME}


@dataclass(frozen=True)
class ServerProcess:
    """One vLLM server: its name, command line, extra environment and URL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{env} {shlex.join(self.argv)}"


def find_vllm_python(explicit: str | None = None) -> str:
    """The vLLM venv's python: explicit, $LRM_VLLM_PYTHON, or .venv-vllm in the working directory, the
    repository of this file, or a folder above either. Raises FileNotFoundError naming the setup step."""
    for candidate in (explicit, os.environ.get("LRM_VLLM_PYTHON")):
        if candidate:
            if not Path(candidate).exists():
                raise FileNotFoundError(f"vLLM python {candidate} does not exist")
            return candidate
    for start in (Path.cwd(), Path(__file__).resolve()):
        for folder in [start, *start.parents]:
            python = folder / VLLM_VENV / "bin" / "python"
            if python.exists():
                return str(python)
    raise FileNotFoundError(
        f"no {VLLM_VENV} venv found: run scripts/setup_vllm.sh in the repository (CPU build), or install "
        "vLLM in a venv of its own (pip install vllm on a GPU box) and pass --vllm-python or set "
        "LRM_VLLM_PYTHON"
    )


def merged_progress_folder(base_model: str, adapter: str) -> Path:
    """Default place of a merged progress model: the user's cache, keyed by the base and adapter sources."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lrm" / "merged-progress"
    key = hashlib.sha256(f"{_source_id(base_model)}\n{_source_id(adapter)}".encode()).hexdigest()[:16]
    return root / key


def merge_adapter(
    base_model: str, adapter: str, out_dir: Path, dtype: str = "auto", local_files_only: bool = True
) -> Path:
    """The progress adapter merged into the base, saved as a standalone checkpoint (with the processor and
    a provenance file the client checks). Loading follows the engine's path exactly (``loading.load_model``:
    vision tower from the adapter, lora_B checked); merged on the CPU. dtype "auto" = the base's own."""
    from lrm_reward.core import loading

    out_dir = Path(out_dir).expanduser()
    adapter_folder = loading.resolve_adapter_folder(adapter, local_files_only)
    weights = adapter_folder / loading.ADAPTER_WEIGHTS_FILE
    if dtype == "auto":
        dtype = _checkpoint_dtype(base_model)
    loaded = loading.load_model(
        base_model,
        {PROGRESS_MODEL_NAME: adapter},
        device="cpu",
        dtype=dtype,
        local_files_only=local_files_only,
    )
    merged = loaded.model.merge_and_unload()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        merged.save_pretrained(scratch, safe_serialization=True)
        loaded.processor.save_pretrained(scratch)
        record = {
            "made_by": "lrm-vllm-server (lrm_reward.serving.vllm_server.merge_adapter)",
            "base": _source_id(base_model),
            "adapter": str(adapter_folder.resolve()),
            "adapter_sha256": _sha256(weights) if weights.is_file() else None,
            "dtype": dtype,
        }
        (scratch / MERGED_PROVENANCE_FILE).write_text(json.dumps(record, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        scratch.rename(out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def merged_is_current(folder: Path, base_model: str, adapter: str, local_files_only: bool = True) -> bool:
    """True when folder holds a merge of exactly this base and adapter (same adapter weights)."""
    from lrm_reward.core import loading

    try:
        record = json.loads((Path(folder) / MERGED_PROVENANCE_FILE).read_text())
        adapter_folder = loading.resolve_adapter_folder(adapter, local_files_only)
    except (OSError, ValueError, loading.ModelLoadError):
        return False
    weights = adapter_folder / loading.ADAPTER_WEIGHTS_FILE
    return (
        record.get("base") == _source_id(base_model)
        and record.get("adapter") == str(adapter_folder.resolve())
        and record.get("adapter_sha256") == (_sha256(weights) if weights.is_file() else None)
    )


def server_processes(spec: ServerSpec) -> list[ServerProcess]:
    """The vLLM servers for spec: base (+ LoRA modules) and, when progress is configured, the merged
    progress model. Needs spec.merged_progress when progress is configured (merge first)."""
    from lrm_reward.core import loading

    python = find_vllm_python(spec.python)
    env = {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_HOST_IP": spec.host if spec.host not in ("0.0.0.0", "::") else "",
    }
    env = {k: v for k, v in env.items() if v}
    if spec.local_files_only:
        env["HF_HUB_OFFLINE"] = "1"
    if spec.device == "cpu":
        env["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kv_cache_gib)
    two = PROGRESS_MODEL_NAME in spec.adapters
    common = [
        "--host",
        spec.host,
        "--dtype",
        spec.dtype,
        "--max-model-len",
        str(spec.max_model_len),
        "--enable-prompt-tokens-details",  # per-request cached_tokens: the client counts prefix-cache hits
        "--limit-mm-per-prompt",
        json.dumps({"image": 2, "video": 0}),
        "--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching",
    ]
    if spec.device == "cpu":
        common += ["--block-size", "32"]
    utilization = spec.gpu_memory_utilization
    if spec.device == "cuda" and utilization is None and two:
        utilization = 0.45  # two full models share the GPU
    if spec.device == "cuda" and utilization is not None:
        common += ["--gpu-memory-utilization", f"{utilization:g}"]
    module = [python, "-m", "vllm.entrypoints.openai.api_server"]

    base_argv = [*module, "--model", _served_path(spec.base_model), "--served-model-name", BASE_MODEL_NAME]
    base_argv += ["--port", str(spec.port), *common]
    loras = spec.lora_adapters
    if loras:
        folders = {
            name: loading.resolve_adapter_folder(path, spec.local_files_only) for name, path in loras.items()
        }
        rank = max(_adapter_rank(folder) for folder in folders.values())
        max_rank = next((r for r in LORA_RANKS if r >= rank), rank)
        base_argv += ["--enable-lora", "--max-lora-rank", str(max_rank), "--max-loras", str(len(folders))]
        base_argv += ["--lora-modules", *(f"{name}={folder.resolve()}" for name, folder in folders.items())]
    base_argv += spec.extra_args
    processes = [ServerProcess("base", base_argv, env, f"http://{_url_host(spec.host)}:{spec.port}")]
    if two:
        if not spec.merged_progress:
            raise ValueError("progress is configured: merge it first (merged_progress folder)")
        argv = [*module, "--model", str(Path(spec.merged_progress).resolve())]
        argv += ["--served-model-name", PROGRESS_MODEL_NAME, "--port", str(spec.progress_port), *common]
        argv += spec.extra_args
        processes.append(
            ServerProcess("progress", argv, env, f"http://{_url_host(spec.host)}:{spec.progress_port}")
        )
    return processes


def start_server(process: ServerProcess, log_file: Path | None = None) -> subprocess.Popen:
    """Start one server in its own process group (so it can be stopped with everything it spawned)."""
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 (the child keeps it open)
    try:
        return subprocess.Popen(
            process.argv,
            env={**os.environ, **process.env},
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if out is not None:
            out.close()


def stop_server(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM to the server's process group, SIGKILL after grace_s."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float, stop=None) -> None:
    """Poll url/health until it answers 200; RuntimeError if the process exits, time runs out or stop()
    turns true (a SIGTERM while the servers start)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop is not None and stop():
            raise RuntimeError(f"stopped while {url} was starting")
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"vLLM server for {url} exited with status {proc.returncode} while starting")
        try:
            with _no_proxy_opener().open(f"{url}/health", timeout=2.0) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vLLM server at {url} not healthy after {timeout_s:.0f} s")


# --- reading the node's config ------------------------------------------------------------------------


def model_config_from_yaml(path: Path) -> dict:
    """base / adapters / local_files_only from a reward node parameter file (the model: section)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    params = None
    for value in data.values() if isinstance(data, dict) else []:
        if isinstance(value, dict) and isinstance(value.get("ros__parameters"), dict):
            params = value["ros__parameters"]
            break
    if params is None:
        raise ValueError(f"{path}: no '<node>: ros__parameters:' section")
    model = params.get("model")
    if not isinstance(model, dict):  # flattened keys ("model.base": ...)
        model = {}
        for key, value in params.items():
            if key.startswith("model."):
                parts = key.split(".")[1:]
                target = model
                for part in parts[:-1]:
                    target = target.setdefault(part, {})
                target[parts[-1]] = value
    if not model.get("base"):
        raise ValueError(f"{path}: no model.base")
    adapters = {k: v for k, v in (model.get("adapters") or {}).items() if v}
    return {
        "base_model": model["base"],
        "adapters": adapters,
        "local_files_only": bool(model.get("local_files_only", True)),
    }


# --- command line -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lrm-vllm-server",
        description="Run the vLLM servers for the reward model (base + LoRA adapters, merged progress) from "
        "the reward node's model config, and supervise them.",
    )
    p.add_argument("--config", type=Path, help="reward node parameter YAML (its model: section)")
    p.add_argument("--base-model", help="Qwen3-VL base folder or Hub id (overrides the config)")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="NAME=FOLDER",
        help="an adapter (repeatable; overrides the config)",
    )
    p.add_argument(
        "--merged-progress", type=Path, help="merged progress model folder (default: in ~/.cache/lrm)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="base server port (default 8000)")
    p.add_argument("--progress-port", type=int, help="merged progress server port (default port + 1)")
    p.add_argument("--device", choices=DEVICES, default="cuda", help="cuda (GPU build) or cpu (CPU build)")
    p.add_argument("--dtype", default="auto", help="vLLM --dtype (default auto: the checkpoint's)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--gpu-memory-utilization", type=float, help="per server (default 0.45 with two servers)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn vLLM's prefix caching off")
    p.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback address")
    p.add_argument("--vllm-python", help="python of the vLLM venv (default .venv-vllm or $LRM_VLLM_PYTHON)")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument(
        "--print", action="store_true", dest="print_only", help="print the command lines, run nothing"
    )
    p.add_argument("--merge-only", action="store_true", help="make the merged progress model, then exit")
    p.add_argument("extra", nargs="*", help="after --: more vLLM arguments for both servers")
    return p


def spec_from_args(args: argparse.Namespace) -> ServerSpec:
    settings: dict = model_config_from_yaml(args.config) if args.config else {"adapters": {}}
    if args.base_model:
        settings["base_model"] = args.base_model
    if args.adapter:
        adapters = {}
        for item in args.adapter:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise ValueError(f"--adapter wants NAME=FOLDER, got {item!r}")
            adapters[name] = folder
        settings["adapters"] = adapters
    if not settings.get("base_model"):
        raise ValueError("give --config (the reward node's YAML) or --base-model")
    adapters = settings.get("adapters") or {}
    merged = args.merged_progress
    if PROGRESS_MODEL_NAME in adapters and merged is None:
        merged = merged_progress_folder(settings["base_model"], adapters[PROGRESS_MODEL_NAME])
    return ServerSpec(
        base_model=settings["base_model"],
        adapters=adapters,
        merged_progress=str(merged) if merged else None,
        host=args.host,
        port=args.port,
        progress_port=args.progress_port,
        device=args.device,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        prefix_caching=not args.no_prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization,
        allow_remote=args.allow_remote,
        local_files_only=settings.get("local_files_only", True),
        python=args.vllm_python,
        extra_args=list(args.extra),
    )


def ensure_merged(spec: ServerSpec) -> None:
    """Merge progress into the base when the merged folder is missing or made from something else."""
    progress = spec.adapters.get(PROGRESS_MODEL_NAME)
    if not progress or not spec.merged_progress:
        return
    folder = Path(spec.merged_progress)
    if merged_is_current(folder, spec.base_model, progress, spec.local_files_only):
        log.info("merged progress model up to date: %s", folder)
        return
    log.info("merging the progress adapter into %s (once; minutes for the 8B) ...", folder)
    merge_adapter(spec.base_model, progress, folder, local_files_only=spec.local_files_only)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.print_only:
            for process in server_processes(spec):
                print(f"# {process.name}: {process.url}")
                print(process.shell())
            return 0
        ensure_merged(spec)
        if args.merge_only:
            print(f"merged progress model: {spec.merged_progress}")
            return 0
        processes = server_processes(spec)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"lrm-vllm-server: {exc}", file=sys.stderr)
        return 2
    return _supervise(processes, args.startup_timeout)


def _supervise(processes: list[ServerProcess], startup_timeout_s: float) -> int:
    running: list[tuple[ServerProcess, subprocess.Popen]] = []
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for process in processes:
            log.info("starting %s server: %s", process.name, process.shell())
            running.append((process, start_server(process)))
        for process, proc in running:
            wait_healthy(process.url, proc, startup_timeout_s, stop=lambda: stopping)
        urls = ",".join(p.url for p in processes)
        print(f"ready: {', '.join(f'{p.name} at {p.url}' for p in processes)}", flush=True)
        print(f'reward node: model.backend: vllm, model.server_url: "{urls}"', flush=True)
        while not stopping:
            for process, proc in running:
                if proc.poll() is not None:
                    print(
                        f"lrm-vllm-server: {process.name} server exited ({proc.returncode})", file=sys.stderr
                    )
                    return 1
            time.sleep(1.0)
        return 0
    except RuntimeError as exc:
        print(f"lrm-vllm-server: {exc}", file=sys.stderr)
        return 1
    finally:
        for _, proc in running:
            stop_server(proc)


# --- helpers ------------------------------------------------------------------------------------------


def _no_proxy_opener():
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _served_path(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def _source_id(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _adapter_rank(folder: Path) -> int:
    from lrm_reward.core.loading import ADAPTER_CONFIG_FILE, FALLBACK_LORA_R

    try:
        config = json.loads((Path(folder) / ADAPTER_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return FALLBACK_LORA_R
    return int(config.get("r") or FALLBACK_LORA_R)


def _checkpoint_dtype(base_model: str) -> str:
    """The dtype a checkpoint was saved in (config.json), as an EngineConfig dtype name."""
    path = Path(base_model).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return "bfloat16"  # a Hub id: the released Qwen3-VL checkpoints are bf16
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return value if value in ("float32", "bfloat16", "float16") else "float32"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
