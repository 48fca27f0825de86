"""How to load and query the reward model: ``EngineConfig``, validated on construction (ValueError naming
the bad value). Kept apart from the engine so that parameters, launch files and command lines can build
and check one without the engine's machinery (no torch / transformers / peft here).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lrm_reward.core.types import Modality, Readout

# Reference decoding budgets (authors' server): contrastive reasons step by step before its JSON.
DEFAULT_MAX_NEW_TOKENS = {
    Modality.PROGRESS.value: 128,
    Modality.CONTRASTIVE.value: 512,
    Modality.COMPLETION.value: 128,
}
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
# "completion#2": a further adapter for that modality, on the same base; the engine asks every adapter of
# a modality and averages their answers (an ensemble of reward models trained on different data).
ENSEMBLE_MARK = "#"
_ADAPTER_NAME_RE = re.compile(r"^([a-z]+)(#[2-9]|#[1-9]\d+)?$")


def adapter_modality(name: str) -> str:
    """The modality an adapter name serves: 'completion' and 'completion#2' -> 'completion'."""
    return name.partition(ENSEMBLE_MARK)[0]


def ensemble_names(adapter_sets: list[dict[str, str]]) -> dict[str, str]:
    """Several {modality: folder} sets as one adapters dict: the first set's names as they are, the k-th
    set's as 'modality#k' (answers averaged per modality)."""
    out: dict[str, str] = {}
    for k, adapters in enumerate(adapter_sets, start=1):
        for name, spec in adapters.items():
            out[name if k == 1 else f"{name}{ENSEMBLE_MARK}{k}"] = spec
    return out


@dataclass
class EngineConfig:
    """How to load and query the reward model. Validated on construction (ValueError on bad values)."""

    base_model: str  # local folder or Hub id of a Qwen3-VL checkpoint
    # modality name -> adapter folder / Hub id; None = base or merged. "completion#2": a further completion
    # adapter on the same base, its answers averaged with the first's (ensemble_names)
    adapters: dict[str, str] | None = None
    readout: Readout = Readout.LOGITS
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, float32 elsewhere) | "float32" | "bfloat16" | "float16"
    attn_implementation: str | None = None  # e.g. "sdpa", "eager", "flash_attention_2"
    max_batch_size: int = 8
    local_files_only: bool = True  # offline-first
    backend: str = "local"
    processor: str | None = None  # where the processor lives when not with base_model
    max_new_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_NEW_TOKENS))
    # Without chain-of-thought the contrastive reply is started with its JSON prefix; this bounds the rest.
    answer_max_new_tokens: int = 16
    chain_of_thought: bool = False  # default for contrastive queries (a Query can also ask for it)
    max_task_chars: int = 2000
    max_image_side: int = 8192
    # Logits fast path: score the answer set in the prompt's own forward pass (False = the plain two-pass
    # reference path), and with prefix_cache reuse each episode's prompt prefix KV (LRU, bounded both ways).
    fast_path: bool = True
    prefix_cache: bool = True
    prefix_cache_entries: int = 32
    prefix_cache_bytes: int = 1 << 30
    # Static-shape suffix pass of the fast path (compiled_suffix.py): "off" (one eager model call),
    # "cuda-graphs" (eager kernels captured per shape and replayed, no compile), "compile+cuda-graphs"
    # (inductor-compiled layers, captured), or a torch.compile mode of the decoder layer ("default",
    # "reduce-overhead" = inductor + cudagraph trees, "max-autotune-no-cudagraphs"). Lengths are padded to
    # multiples of compile_length_step, batches to powers of two. At start the engine warms up (compiles /
    # captures) every adapter at compile_warmup_batches with frames of compile_warmup_image (height,
    # width), for at most compile_warmup_s; other shapes compile on first use.
    compile: str = "off"
    compile_length_step: int = 64
    compile_warmup_batches: tuple[int, ...] = (1,)
    compile_warmup_image: tuple[int, int] = (480, 640)
    compile_warmup_s: float = 300.0
    # backend "vllm" (vllm_client.py): the model runs in vLLM servers, this process only asks over HTTP.
    # server_url: one URL or several (a comma-separated string or a list); every model is found there by
    # name. A server off this machine (not loopback) is refused unless allow_remote. device, dtype and the
    # fast-path / compile settings are the server's business then.
    server_url: str | tuple[str, ...] | None = None
    allow_remote: bool = False
    request_timeout_s: float = 10.0  # one score() call ends within this, answered or failed
    server_connect_s: float = 30.0  # make_engine retries (with backoff) this long for a server to come up
    # still not up then: True = make_engine raises (command-line tools); False = the engine is made, answers
    # with errors and keeps trying (with backoff) at each call (a reward node that boots before the server)
    server_required: bool = False
    server_concurrency: int = 16  # HTTP requests in flight at once (the server batches them)

    def __post_init__(self) -> None:
        if not isinstance(self.base_model, str) or not self.base_model.strip():
            raise ValueError("base_model must be a non-empty folder or Hub id")
        try:
            self.readout = Readout(self.readout)
        except ValueError as exc:
            raise ValueError(
                f"readout must be one of {[r.value for r in Readout]}, got {self.readout!r}"
            ) from exc
        if self.adapters is not None:
            if not isinstance(self.adapters, dict) or not self.adapters:
                raise ValueError("adapters must be a non-empty dict of modality -> folder, or None")
            known = {m.value for m in Modality}
            for name, spec in self.adapters.items():
                match = _ADAPTER_NAME_RE.fullmatch(str(name))
                if match is None or match.group(1) not in known:
                    raise ValueError(
                        f"adapter name {name!r} is not a modality ({sorted(known)}), or one followed by "
                        f"{ENSEMBLE_MARK}2, {ENSEMBLE_MARK}3, ... for a further adapter averaged with it"
                    )
                if match.group(2) and match.group(1) not in self.adapters:
                    raise ValueError(f"adapter {name!r} averages with {match.group(1)!r}, which is not given")
                if not isinstance(spec, str) or not spec.strip():
                    raise ValueError(f"adapter {name!r} needs a folder or Hub id")
        if not _DEVICE_RE.match(str(self.device)):
            raise ValueError(f"device must look like 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.attn_implementation is not None and not str(self.attn_implementation).strip():
            raise ValueError("attn_implementation must be None or a name like 'sdpa'")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        merged = dict(DEFAULT_MAX_NEW_TOKENS)
        for name, value in (self.max_new_tokens or {}).items():
            if name not in merged:
                raise ValueError(f"max_new_tokens key {name!r} is not a modality")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"max_new_tokens[{name!r}] must be an int >= 1, got {value!r}")
            merged[name] = value
        self.max_new_tokens = merged
        for name in ("fast_path", "prefix_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in (
            "answer_max_new_tokens",
            "max_task_chars",
            "max_image_side",
            "prefix_cache_entries",
            "prefix_cache_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self._check_compile()
        self._check_server()

    def _check_server(self) -> None:
        for name in ("allow_remote", "server_required"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("request_timeout_s", "server_connect_s"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if (
            not isinstance(self.server_concurrency, int)
            or isinstance(self.server_concurrency, bool)
            or not (1 <= self.server_concurrency <= 256)
        ):
            raise ValueError(f"server_concurrency must be an int in 1..256, got {self.server_concurrency!r}")
        if self.backend != "local" and self.averaged:
            raise ValueError(
                "averaging several adapters per modality (names like 'completion#2') runs in-process only: "
                "use backend 'local'"
            )
        if self.server_url in (None, "", ()):
            self.server_url = None
            if self.backend == "vllm":
                raise ValueError("backend 'vllm' needs server_url, e.g. http://127.0.0.1:8000")
            return
        from lrm_reward.core.vllm_transport import parse_server_urls

        urls = parse_server_urls(self.server_url, self.allow_remote)
        self.server_url = urls[0] if len(urls) == 1 else urls

    def _check_compile(self) -> None:
        from lrm_reward.core.compiled_suffix import COMPILE_MODES

        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.compile != "off" and not self.fast_path:
            raise ValueError("compile needs fast_path=True (it compiles the fast path's suffix pass)")
        if not isinstance(self.compile_length_step, int) or not 1 <= self.compile_length_step <= 4096:
            raise ValueError(
                f"compile_length_step must be an int in 1..4096, got {self.compile_length_step!r}"
            )
        try:
            batches = tuple(self.compile_warmup_batches)
            image = tuple(self.compile_warmup_image)
        except TypeError as exc:
            raise ValueError("compile_warmup_batches and compile_warmup_image must be sequences") from exc
        if not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches):
            raise ValueError(f"compile_warmup_batches must be ints >= 1, got {self.compile_warmup_batches!r}")
        self.compile_warmup_batches = batches
        if len(image) != 2 or not all(isinstance(v, int) and 1 <= v <= self.max_image_side for v in image):
            raise ValueError(
                f"compile_warmup_image must be (height, width) in 1..{self.max_image_side}, got {image!r}"
            )
        self.compile_warmup_image = image
        if not isinstance(self.compile_warmup_s, (int, float)) or not self.compile_warmup_s >= 0:
            raise ValueError(f"compile_warmup_s must be a number >= 0, got {self.compile_warmup_s!r}")

    @property
    def averaged(self) -> bool:
        """Several adapters serve one modality (their answers are averaged)."""
        return any(ENSEMBLE_MARK in name for name in self.adapters or {})

    def describe(self) -> str:
        """Human-readable id of base + adapters."""
        if not self.adapters:
            return self.base_model
        listed = ", ".join(f"{name}={spec}" for name, spec in self.adapters.items())
        return f"{self.base_model} + LoRA[{listed}]"
