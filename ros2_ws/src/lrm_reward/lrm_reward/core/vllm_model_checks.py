"""What a vLLM server serves, checked against the engine configuration when the "vllm" backend connects: a
LoRA module must come from the configured adapter folder on the configured base model, and the merged
progress model's provenance file (written by ``lrm_reward.serving.vllm_server.merge_adapter``) must name
both. A mismatch is refused with a ModelLoadError; sources that are not both on this machine are logged,
not compared.

What it is not: no choice of which server answers which modality (``vllm_client``), no requests (the model
list comes from ``ServerApi.discover``).
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from pathlib import Path

from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.types import Modality
from lrm_reward.core.vllm_transport import ServedModel, ServerApi, is_loopback_host

log = logging.getLogger("lrm_reward.core.vllm_client")  # the backend's logger: filters and tests name it

MERGED_PROVENANCE_FILE = "lrm_merged.json"  # written by serving.vllm_server.merge_adapter
PROGRESS_MODEL_NAME = Modality.PROGRESS.value  # served name of the merged progress model


def check_served(link: ServerApi, model: ServedModel, name: str, spec: str, base_model: str) -> None:
    """Refuse a served model that is not what the config names: spec for the model served as name, on
    base_model."""
    if model.parent is not None:  # a LoRA module: from the configured folder, on the configured base
        check_source(link, model.root, spec, f"adapter {name!r}")
        base = link.models.get(model.parent)
        if base is not None:
            check_source(link, base.root, base_model, "base model")
        return
    if name != PROGRESS_MODEL_NAME:
        raise ModelLoadError(
            f"{link.url} serves {name!r} as a whole model; expected a LoRA module on the base"
        )
    # the merged progress model: its provenance file names the base and the adapter it was made from
    provenance = Path(model.root) / MERGED_PROVENANCE_FILE
    if not provenance.is_file():
        if is_loopback_host(urllib.parse.urlsplit(link.url).hostname or ""):
            raise ModelLoadError(
                f"{link.url} serves 'progress' from {model.root}, which has no {MERGED_PROVENANCE_FILE}: "
                "not a merged progress checkpoint made by lrm-vllm-server (merge-progress)"
            )
        log.info("cannot check the merged progress model on %s (its folder is not on this machine)", link.url)
        return
    record = json.loads(provenance.read_text())
    check_source(link, record.get("adapter", ""), spec, "merged progress adapter")
    check_source(link, record.get("base", ""), base_model, "merged progress base model")


def check_source(link: ServerApi, served: str, configured: str, what: str) -> None:
    """Refuse when the server's source and the configured one are both on this machine and differ."""
    if served == configured:
        return
    served_path, configured_path = _local_folder(served), _local_folder(configured)
    if served_path is not None and configured_path is not None:
        if served_path == configured_path:
            return
        raise ModelLoadError(
            f"{link.url} serves the {what} from {served}, but the config names {configured}: "
            "start the server from the same model config"
        )
    log.info(
        "%s on %s: served from %r, configured %r (not both on this machine: not compared)",
        what,
        link.url,
        served,
        configured,
    )


def _local_folder(spec: str) -> Path | None:
    """The resolved folder spec names on this machine (a Hub id in the local cache counts), else None."""
    if not spec:
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from lrm_reward.core.loading import looks_like_hub_id, resolve_adapter_folder

        if looks_like_hub_id(spec):
            return resolve_adapter_folder(spec, local_files_only=True).resolve()
    except Exception:  # not downloaded here: cannot compare
        return None
    return None
