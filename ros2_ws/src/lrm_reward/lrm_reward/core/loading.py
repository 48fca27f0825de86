"""Loading a Qwen3-VL base model plus the LRM LoRA adapters exactly as the released weights need.

What this is for: the one code path that loads both ``Qwen/Qwen3-VL-8B-Instruct`` + ``USC-PSI-Lab/LRM-models``
and the tiny test models. It follows the authors' server (arXiv 2603.16065 release):

- the base loads on the CPU with no ``device_map`` (with one, PEFT silently left ``lora_B`` at zero);
- adapters attach before the model moves to the device, ``progress`` first; its ``modules_to_save`` is
  restricted to ``["visual"]`` (the released config also names the nested ``merger``, and PEFT cannot
  build overlapping wrappers);
- an adapter config without ``r`` / ``lora_alpha`` falls back to r=64, alpha=128;
- every tensor of every adapter file must end up in the model, with its values, under that adapter (the
  progress adapter's vision tower included), and every weight the model holds for an adapter must come
  from its file; otherwise loading is refused naming the keys (PEFT only warns, so a vision tower whose
  keys do not match would silently stay the base one);
- every adapter's ``lora_B`` is checked non-zero after the move; otherwise loading is refused;
- the processor comes from ``processor`` when given, else from the base folder, else from the first
  adapter folder that has one (the authors load it from the adapter folder: a cached base snapshot can
  lack processor files);
- no adapters = the plain base (or a merged checkpoint): logged as a WARNING, ``LoadedModel.base_only``.

Weights load from safetensors only and ``trust_remote_code`` stays off.
What it is not: no prompts, no readouts, no batching (see ``readouts.py`` and ``engine.py``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FALLBACK_LORA_R = 64
FALLBACK_LORA_ALPHA = 128
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PROGRESS_ADAPTER = "progress"  # loaded first: it carries modules_to_save for the vision tower
VISION_TOWER = "visual"
_VISION_TOWER_PARTS = ("visual", "merger", "deepstack_merger_list", "patch_embed", "pos_embed", "blocks")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


class ModelLoadError(RuntimeError):
    """The model or an adapter cannot be loaded as asked; the message says which and why, on one line.

    Causes from transformers / huggingface_hub often span lines; they are folded so that a command line tool
    can print ``f"{prog}: {exc}"`` as its one error line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


@dataclass
class LoadedModel:
    """A ready model: PEFT-wrapped when adapters were given, otherwise the plain (base or merged) model."""

    model: Any
    processor: Any
    adapter_names: list[str]
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    lora_b_nonzero: dict[str, int] = field(default_factory=dict)  # adapter -> LoRA modules with lora_B != 0
    adapter_tensors: dict[str, int] = field(
        default_factory=dict
    )  # adapter -> tensors of its file, all placed
    processor_source: str = ""  # where the processor was loaded from

    @property
    def base_only(self) -> bool:
        """No adapters: the base (or a merged) checkpoint answers; not the released reward model."""
        return not self.adapter_names


def resolve_dtype(name: str, device: str):
    """torch dtype for a config name; "auto" = bfloat16 on CUDA, float32 elsewhere."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def looks_like_hub_id(spec: str) -> bool:
    """owner/name or owner/name/sub/folder, not a path that starts with /, ~ or ."""
    return bool(_HUB_ID_RE.match(spec)) and not spec.startswith((".", "~"))


def resolve_adapter_folder(spec: str, local_files_only: bool) -> Path:
    """A local folder, or a Hub "owner/repo/subfolder" fetched (or found in the cache) by huggingface_hub."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if not looks_like_hub_id(spec):
        raise ModelLoadError(f"adapter folder not found: {spec}")
    parts = spec.split("/")
    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(
            repo_id,
            allow_patterns=[f"{subfolder}/*"] if subfolder else None,
            local_files_only=local_files_only,
        )
    except Exception as exc:
        hint = " (local_files_only=True: download it first or allow the Hub)" if local_files_only else ""
        raise ModelLoadError(
            f"adapter {spec!r} is neither a local folder nor available from the Hub{hint}: {exc}"
        ) from exc
    folder = Path(root) / subfolder if subfolder else Path(root)
    if not folder.is_dir():
        raise ModelLoadError(f"adapter {spec!r}: subfolder {subfolder!r} not in the downloaded repository")
    return folder


def restrict_modules_to_save(modules: list[str] | None) -> list[str] | None:
    """Collapse vision-tower entries (visual, its merger, ...) into the one wrapper ["visual"]."""
    if not modules:
        return None
    restricted: list[str] = []
    for name in modules:
        leaf = name.split(".")[-1]
        entry = VISION_TOWER if (VISION_TOWER in name.split(".") or leaf in _VISION_TOWER_PARTS) else name
        if entry not in restricted:
            restricted.append(entry)
    return restricted


def read_adapter_config(folder: Path, name: str):
    """LoraConfig from a folder, with the r/alpha fallbacks and modules_to_save restricted."""
    from peft import LoraConfig

    config_path = folder / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise ModelLoadError(f"adapter {name!r}: no {ADAPTER_CONFIG_FILE} in {folder}")
    try:
        raw = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"adapter {name!r}: {config_path} is not valid JSON: {exc}") from exc
    if raw.get("peft_type", "LORA").upper() != "LORA":
        raise ModelLoadError(f"adapter {name!r}: peft_type {raw.get('peft_type')!r}, only LoRA is supported")
    if not raw.get("r"):
        log.warning("adapter %r has no r in its config: using %d as the authors do", name, FALLBACK_LORA_R)
        raw["r"] = FALLBACK_LORA_R
    if not raw.get("lora_alpha"):
        log.warning("adapter %r has no lora_alpha: using %d as the authors do", name, FALLBACK_LORA_ALPHA)
        raw["lora_alpha"] = FALLBACK_LORA_ALPHA
    raw["modules_to_save"] = restrict_modules_to_save(raw.get("modules_to_save"))
    raw["inference_mode"] = True
    known = set(LoraConfig.__dataclass_fields__)
    dropped = sorted(k for k in raw if k not in known)
    if dropped:
        log.info("adapter %r: ignoring config keys this peft does not know: %s", name, dropped)
    return LoraConfig(**{k: v for k, v in raw.items() if k in known})


def order_adapters(adapters: dict[str, str]) -> list[tuple[str, str]]:
    """progress first (its vision-tower wrapper must be built first), then the rest as given."""
    items = list(adapters.items())
    return sorted(items, key=lambda item: item[0] != PROGRESS_ADAPTER)


def load_model(
    base_model: str,
    adapters: dict[str, str] | None,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    attn_implementation: str | None = None,
    local_files_only: bool = True,
    processor: str | None = None,
) -> LoadedModel:
    """Load base (+ adapters) on the CPU, verify, then move to the device. Raises ModelLoadError.

    processor: a folder / Hub id to take the processor from; None = the base, else the adapter folders.
    """
    torch_dtype = resolve_dtype(dtype, device)
    target = _select_device(device)
    # adapter folders first: a missing one fails in a second, not after loading 16 GB of base weights
    folders = [
        (name, spec, resolve_adapter_folder(spec, local_files_only))
        for name, spec in order_adapters(adapters or {})
    ]
    if not folders:
        log.warning(
            "no adapters configured: serving %s alone, the base model only, not a reward model "
            "(unless it is a merged LRM checkpoint); configure the progress/contrastive/completion adapters",
            base_model,
        )
    model = _load_base(base_model, torch_dtype, attn_implementation, local_files_only)
    proc, proc_source = find_processor(processor, base_model, [f for _, _, f in folders], local_files_only)

    names: list[str] = []
    placed: dict[str, int] = {}
    if folders:
        model, names, placed = _attach_adapters(model, folders)
    try:
        model.to(device=target, dtype=torch_dtype)
    except (RuntimeError, AssertionError) as exc:  # e.g. no CUDA here
        raise ModelLoadError(f"cannot move the model to {device!r}: {exc}") from exc
    model.eval()
    nonzero = verify_lora_b(model, names) if names else {}
    if names:
        model.set_adapter(names[0])
    return LoadedModel(model, proc, names, target, torch_dtype, nonzero, placed, proc_source)


def _select_device(device: str):
    """torch.device for the name; cuda:N also becomes this thread's current device (torch.cuda.set_device).

    The current device is per thread: the engine scopes each call to its device as well (engine.py).
    """
    import torch

    target = torch.device(device)
    if target.type == "cuda" and target.index is not None:
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if target.index >= count:
            raise ModelLoadError(f"device {device!r} asked for, but only {count} CUDA device(s) are visible")
        torch.cuda.set_device(target)
    return target


def adopt_model(model, processor, device: str, dtype: str = "auto") -> LoadedModel:
    """Wrap an already built model (e.g. random weights built on the GPU for a benchmark) like load_model.

    A PEFT model keeps its adapters in attachment order and is verified the same way; nothing is loaded.
    """
    import torch

    torch_dtype = resolve_dtype(dtype, device)
    model.to(device=torch.device(device), dtype=torch_dtype)
    model.eval()
    names = list(getattr(model, "peft_config", {}) or {})
    nonzero = verify_lora_b(model, names) if names else {}
    if names:
        model.set_adapter(names[0])
    processor.tokenizer.padding_side = "left"
    return LoadedModel(model, processor, names, torch.device(device), torch_dtype, nonzero)


def verify_lora_b(model, adapter_names: list[str]) -> dict[str, int]:
    """Count LoRA modules with a non-zero lora_B per adapter; refuse an adapter with none."""
    total = {name: 0 for name in adapter_names}
    nonzero = {name: 0 for name in adapter_names}
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if lora_b is None or not hasattr(lora_b, "keys"):
            continue
        for name in adapter_names:
            if name in lora_b:
                total[name] += 1
                nonzero[name] += int(bool(lora_b[name].weight.detach().ne(0).any()))
    for name in adapter_names:
        if total[name] == 0:
            raise ModelLoadError(
                f"adapter {name!r} attached no LoRA modules: its target_modules match nothing"
            )
        if nonzero[name] == 0:
            raise ModelLoadError(
                f"adapter {name!r}: every lora_B weight ({total[name]} modules) is zero, so the base model "
                "would answer as if adapted; refusing to run (a known PEFT failure when the base was loaded "
                "with device_map, or a broken adapter file)"
            )
        if nonzero[name] < total[name]:
            log.warning(
                "adapter %r: %d of %d lora_B weights are zero", name, total[name] - nonzero[name], total[name]
            )
    return nonzero


def _load_base(spec: str, torch_dtype, attn_implementation: str | None, local_files_only: bool):
    from transformers import AutoConfig, AutoModelForImageTextToText

    path = Path(spec).expanduser()
    if not path.is_dir() and not looks_like_hub_id(spec):
        raise ModelLoadError(f"base model folder not found: {spec}")
    location = str(path) if path.is_dir() else spec
    try:
        config = AutoConfig.from_pretrained(
            location, local_files_only=local_files_only, trust_remote_code=False
        )
    except Exception as exc:
        hint = " (local_files_only=True: download it first or allow the Hub)" if local_files_only else ""
        raise ModelLoadError(f"cannot read the base model config from {spec!r}{hint}: {exc}") from exc
    if not str(getattr(config, "model_type", "")).startswith("qwen3_vl"):
        log.warning(
            "base model %r is %r, not Qwen3-VL: prompts and adapters assume Qwen3-VL", spec, config.model_type
        )
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype,
        use_safetensors=True,  # never unpickle .bin weights
        trust_remote_code=False,
        local_files_only=local_files_only,
    )
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    # No device_map here on purpose: adapters must attach on the CPU before the move.
    try:
        return AutoModelForImageTextToText.from_pretrained(location, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the base model from {spec!r}: {type(exc).__name__}: {exc}"
        ) from exc


def find_processor(
    explicit: str | None, base_model: str, adapter_folders: list[Path], local_files_only: bool
) -> tuple[Any, str]:
    """(processor, where it came from): `explicit` when given (no fallback), else the base, else the first
    adapter folder that holds one. Raises ModelLoadError naming every place tried."""
    if explicit:
        return _load_processor(explicit, local_files_only), explicit
    errors = []
    for spec in [base_model, *(str(folder) for folder in adapter_folders)]:
        try:
            proc = _load_processor(spec, local_files_only)
        except ModelLoadError as exc:
            errors.append(str(exc))
            continue
        if spec != base_model:
            log.info("processor loaded from the adapter folder %s (the base %s has none)", spec, base_model)
        return proc, spec
    raise ModelLoadError(
        "no processor (tokenizer + image processor) in the base model or any adapter folder; set "
        f"model.processor to a folder that has one. Tried: {' | '.join(errors)}"
    )


def _load_processor(spec: str, local_files_only: bool):
    from transformers import AutoProcessor

    path = Path(spec).expanduser()
    location = str(path) if path.is_dir() else spec
    try:
        proc = AutoProcessor.from_pretrained(
            location, local_files_only=local_files_only, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the processor from {spec!r}: {type(exc).__name__}: {exc}") from exc
    if getattr(proc, "tokenizer", None) is None or getattr(proc, "image_processor", None) is None:
        raise ModelLoadError(f"{spec!r} has no multimodal processor (tokenizer + image processor)")
    proc.tokenizer.padding_side = "left"  # generate and the shared-prefix readout both want left padding
    return proc


def _attach_adapters(model, folders: list[tuple[str, str, Path]]):
    """Attach (name, spec, folder) adapters in order; returns (peft model, names, tensors placed per name)."""
    from peft import PeftModel

    # transformers can rename a model's modules between versions and map old checkpoints onto the new names;
    # PeftModel.from_pretrained applies that mapping, load_adapter does not unless told: give it to both
    key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
    peft_model = None
    names: list[str] = []
    placed: dict[str, int] = {}
    for name, spec, folder in folders:
        if not (folder / ADAPTER_WEIGHTS_FILE).is_file():
            found = sorted(p.name for p in folder.iterdir())
            raise ModelLoadError(
                f"adapter {name!r}: no {ADAPTER_WEIGHTS_FILE} in {folder} (found {found}); "
                "only safetensors weights are loaded"
            )
        config = read_adapter_config(folder, name)
        try:
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(
                    model,
                    str(folder),
                    adapter_name=name,
                    config=config,
                    is_trainable=False,
                    torch_device="cpu",
                    key_mapping=key_mapping,
                )
            else:
                peft_model.add_adapter(name, config)
                peft_model.load_adapter(
                    str(folder), adapter_name=name, torch_device="cpu", key_mapping=key_mapping
                )
        except Exception as exc:
            raise ModelLoadError(
                f"adapter {name!r} from {spec!r} does not fit the base model: {type(exc).__name__}: {exc}"
            ) from exc
        # PEFT's own load result only warns, and from_pretrained drops it: check the file against the model
        placed[name] = account_adapter_weights(peft_model, name, folder, key_mapping)
        names.append(name)
    return peft_model, names, placed


def account_adapter_weights(peft_model, name: str, folder: Path, key_mapping: dict | None = None) -> int:
    """Check that every tensor of the adapter file sits in the model under `name` with the same values, and
    that every weight the model holds for `name` came from the file. Returns the number of tensors placed;
    raises ModelLoadError naming the keys otherwise. Reads the file one tensor at a time (no second copy).
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    # the model's weights for this adapter, keyed as PEFT saves (and loads) them
    held = get_peft_model_state_dict(peft_model, adapter_name=name, save_embedding_layers=False)
    no_place: list[str] = []
    not_loaded: list[str] = []
    seen: set[str] = set()
    path = folder / ADAPTER_WEIGHTS_FILE
    with safe_open(str(path), framework="pt", device="cpu") as weights:
        keys = list(weights.keys())
        for key in keys:
            model_key = map_adapter_key(key, key_mapping)
            seen.add(model_key)
            target = held.get(model_key)
            if target is None:
                no_place.append(key)
                continue
            value = weights.get_tensor(key)
            same = value.shape == target.shape and torch.equal(value.to(target.dtype), target.detach().cpu())
            if not same:
                not_loaded.append(key)
    left_out = sorted(k for k in held if k not in seen)
    problems = []
    if no_place:
        problems.append(
            f"{len(no_place)} tensor(s) of the file have no place in the model: {_some(no_place)}"
        )
    if not_loaded:
        problems.append(f"{len(not_loaded)} tensor(s) did not load (values differ): {_some(not_loaded)}")
    if left_out:
        problems.append(
            f"{len(left_out)} adapter weight(s) of the model are not in the file (left as initialised or "
            f"copied from the base): {_some(left_out)}"
        )
    if problems:
        bad = no_place + not_loaded + left_out
        tower = " (vision tower weights among them)" if _touches_tower(bad) else ""
        raise ModelLoadError(
            f"adapter {name!r} in {path}: of {len(keys)} tensors, "
            + "; ".join(problems)
            + tower
            + ". Refusing to run on a partly loaded adapter: the adapter was saved for another model layout "
            "or peft/transformers version, or the file is damaged"
        )
    return len(keys)


def map_adapter_key(key: str, key_mapping: dict | None) -> str:
    """The name PEFT loads a saved adapter key under, after transformers' checkpoint key mapping (as
    peft.utils.load_peft_weights does: the first matching pattern, applied below the base_model prefix)."""
    if not key_mapping:
        return key
    prefix = next((p for p in ("base_model.model.", "base_model.") if key.startswith(p)), "")
    rest = key.removeprefix(prefix)
    for pattern, replacement in key_mapping.items():
        renamed, count = re.subn(pattern, replacement, rest)
        if count:
            rest = renamed
            break
    return prefix + rest


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _touches_tower(keys: list[str]) -> bool:
    return any(f".{VISION_TOWER}." in key or key.startswith(f"{VISION_TOWER}.") for key in keys)
