"""Command-line flags that choose the engine backend, shared by the tools that build an engine (lrm-judge,
lrm-eval-reward): ``--backend local|vllm``, ``--server URL``, ``--allow-remote``, ``--request-timeout``.

What this is for: one spelling of these flags everywhere, turned into EngineConfig fields by
``backend_settings(args)``. What it is not: no engine, no HTTP (argparse only).
"""

from __future__ import annotations

import argparse

BACKENDS = ("local", "vllm")


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the backend flags to a parser (an argument group titled "engine backend")."""
    group = parser.add_argument_group("engine backend")
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="local: load the model in this process (default); vllm: ask vLLM servers (docs/vllm.md)",
    )
    group.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="--backend vllm: server URL, e.g. http://127.0.0.1:8000 (repeatable, or comma-separated)",
    )
    group.add_argument(
        "--allow-remote",
        action="store_true",
        help="--backend vllm: allow a server that is not on this machine (frames travel unencrypted)",
    )
    group.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        metavar="S",
        help="--backend vllm: seconds one engine call may take before its answers count as failed",
    )


def backend_settings(args: argparse.Namespace) -> dict:
    """EngineConfig keyword arguments from the parsed flags; ValueError for an inconsistent combination."""
    backend = getattr(args, "backend", "local") or "local"
    servers = ",".join(getattr(args, "server", None) or [])
    if backend != "vllm":
        if servers or getattr(args, "allow_remote", False) or getattr(args, "request_timeout", None):
            raise ValueError("--server, --allow-remote and --request-timeout go with --backend vllm")
        return {}
    if not servers:
        raise ValueError("--backend vllm needs --server URL (e.g. http://127.0.0.1:8000)")
    # a tool run wants the server now: fail with the reason rather than answer everything with errors
    settings: dict = {
        "backend": "vllm",
        "server_url": servers,
        "allow_remote": bool(args.allow_remote),
        "server_required": True,
    }
    if args.request_timeout is not None:
        settings["request_timeout_s"] = args.request_timeout
    return settings
