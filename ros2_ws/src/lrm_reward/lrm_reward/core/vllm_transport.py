"""HTTP to vLLM servers for the "vllm" engine backend: which server URLs may be asked, and ``ServerApi``, one
server's API (``/health``, ``/v1/models``, ``/tokenize``, chat completions) with every failed request raised
as a ``ServerFault`` that says what kind of failure it was.

What it is not: no up/down state or backoff (``vllm_client.ServerLink`` adds them), no scoring, no engine.
"""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
from dataclasses import dataclass

_LOOPBACK_NAMES = ("localhost",)


# --- URLs ---------------------------------------------------------------------------------------------


def is_loopback_host(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost" (no name is resolved: a lookup could go anywhere)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server_url(url: str, allow_remote: bool = False) -> str:
    """The URL normalised (no trailing slash); ValueError for anything that is not a plain http(s) server
    address, and for a host that is not loopback unless allow_remote (frames would leave this machine)."""
    if not isinstance(url, str) or not url.strip():
        raise ValueError("server_url must be a non-empty URL like http://127.0.0.1:8000")
    text = url.strip()
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"server_url {text!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"server_url {text!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"server_url {text!r} has no host")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError(f"server_url {text!r} must not carry credentials, a query or a fragment")
    if port is None:
        raise ValueError(f"server_url {text!r} needs an explicit port (e.g. :8000)")
    if not is_loopback_host(parts.hostname) and not allow_remote:
        raise ValueError(
            f"server_url {text!r} is not on this machine (loopback): refused. Set allow_remote (node "
            "parameter model.allow_remote, CLI --allow-remote) to send frames to another machine"
        )
    return text.rstrip("/")


def parse_server_urls(value, allow_remote: bool = False) -> tuple[str, ...]:
    """One URL, a comma-separated string of URLs, or a sequence of URLs -> checked, de-duplicated tuple."""
    if isinstance(value, str):
        items = [v for v in value.split(",") if v.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"server_url must be a URL string or a list of URLs, got {type(value).__name__}")
    urls = []
    for item in items:
        url = check_server_url(item, allow_remote)
        if url not in urls:
            urls.append(url)
    if not urls:
        raise ValueError("server_url names no server")
    return tuple(urls)


# --- faults -------------------------------------------------------------------------------------------


class ServerFault(Exception):
    """One failed request. kind: counter name ("unreachable", "timeout", "http_404", ...); transport: the
    server itself stopped answering (connection refused or reset, timeout), so it is probed before reuse."""

    def __init__(self, kind: str, message: str, transport: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.transport = transport


# --- one server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    name: str
    root: str  # what the server loaded it from (folder or Hub id)
    parent: str | None  # the base model's name for a LoRA module, None for a whole model


class ServerApi:
    """Requests to one vLLM server; each failure raises a ServerFault. models: what the last discover()
    found."""

    def __init__(self, url: str, http_client) -> None:
        self.url = url
        self._http = http_client
        self.models: dict[str, ServedModel] = {}

    # -- requests --

    def _request(self, method: str, path: str, timeout: float, body: dict | None = None) -> dict | str:
        import httpx

        try:
            response = self._http.request(method, self.url + path, json=body, timeout=max(timeout, 0.001))
        except httpx.TimeoutException as exc:
            raise ServerFault(
                "timeout", f"{self.url}{path}: no answer within {timeout:.2f} s ({type(exc).__name__})", True
            ) from exc
        except httpx.ConnectError as exc:
            raise ServerFault("unreachable", f"{self.url}: cannot connect ({exc})", True) from exc
        except httpx.TransportError as exc:  # reset, closed mid-answer, ...
            raise ServerFault("disconnected", f"{self.url}{path}: {type(exc).__name__}: {exc}", True) from exc
        if response.status_code >= 400:
            raise ServerFault(
                f"http_{response.status_code}", f"{self.url}{path}: {_server_message(response)}"
            )
        if path == "/health":
            return response.text
        try:
            return response.json()
        except ValueError as exc:
            raise ServerFault(
                "bad_response", f"{self.url}{path}: answer is not JSON: {response.text[:200]!r}"
            ) from exc

    def get(self, path: str, timeout: float) -> dict | str:
        return self._request("GET", path, timeout)

    def post(self, path: str, body: dict, timeout: float) -> dict:
        result = self._request("POST", path, timeout, body)
        if not isinstance(result, dict):
            raise ServerFault("bad_response", f"{self.url}{path}: expected a JSON object")
        return result

    # -- what it serves --

    def discover(self, timeout: float) -> None:
        """/health then /v1/models; raises ServerFault."""
        self.get("/health", timeout)
        listing = self.get("/v1/models", timeout)
        try:
            entries = listing["data"]
            self.models = {
                e["id"]: ServedModel(str(e["id"]), str(e.get("root") or ""), e.get("parent")) for e in entries
            }
        except (KeyError, TypeError) as exc:
            raise ServerFault(
                "bad_response", f"{self.url}/v1/models: unexpected answer {listing!r:.200}"
            ) from exc

    def tokenize(self, model: str, text: str, timeout: float) -> list[int]:
        body = {"model": model, "prompt": text, "add_special_tokens": False}
        return [int(t) for t in self.post("/tokenize", body, timeout)["tokens"]]


def _server_message(response) -> str:
    """The server's own error message (OpenAI error JSON or FastAPI detail), else the start of the body."""
    try:
        data = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]!r}"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return f"HTTP {response.status_code}: {error['message']}"
        if isinstance(data.get("message"), str):
            return f"HTTP {response.status_code}: {data['message']}"
        if "detail" in data:
            return f"HTTP {response.status_code}: {data['detail']}"
    return f"HTTP {response.status_code}: {json.dumps(data)[:300]}"
