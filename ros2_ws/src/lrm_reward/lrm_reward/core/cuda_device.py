"""Keeping CUDA work on the configured device (``cuda:N``), whichever thread runs it.

What this is for: torch's "current device" is per thread and starts at 0, so streams, CUDA graph capture,
``synchronize`` and ``empty_cache`` called without a device act on cuda:0 even when the model sits on cuda:1.
The engine scopes every call to its device with ``on_device``; memory is handed back with ``release_memory``.
What it is not: device selection or validation (``loading.py``); torch is imported only when needed.
"""

from __future__ import annotations

import contextlib
import gc


def on_device(device):
    """Make `device` the current CUDA device for the block. A no-op for the CPU, None or a plain "cuda"."""
    if device is None:
        return contextlib.nullcontext()
    import torch

    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def release_memory(device=None) -> None:
    """Collect garbage, then hand cached CUDA blocks back: those of `device` (cuda:N), not device 0's."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        with on_device(device):
            torch.cuda.empty_cache()
