"""The "vllm" engine backend: reward queries answered by vLLM OpenAI-compatible servers over HTTP.

What this is for: many robots, one GPU server. ``VllmRewardEngine`` has the local engine's interface
(``score(queries) -> answers``, never raising on bad input or a failing server), so the reward node,
``lrm-judge`` and ``lrm-eval-reward`` use it through ``make_engine`` with ``backend="vllm"``.

How an answer is read (closed-set scoring, the same numbers as the local logits readout):
- the prompt's user message goes as chat content (frames as lossless BMP data URLs, each with a uuid that
  hashes its pixels: a frame the server already holds goes as the uuid alone), followed by an
  assistant message holding the JSON answer prefix (``{ "completion_progress": ``), continued
  (``continue_final_message``), one token generated, with the log-probabilities of exactly the allowed
  next tokens (``logprob_token_ids``, a vLLM extension: full-vocabulary log-softmax values);
- answers of several tokens ("0.5" is "0" "." "5") are scored level by level down the candidates' token
  trie: one request per trie node whose children are needed, each continuing the assistant message with
  the node's tokens, so it reuses the previous request's KV blocks from vLLM's prefix cache. A branch
  holding less than ``PRUNE_MASS`` of the probability found so far is not expanded (its candidates count
  as 0, an error below 1e-4 of the value range), and a step every remaining candidate shares is not asked
  (it cancels when the candidates are normalised). Progress usually takes two requests: the prefix ->
  {"0", "1"}, then prefix + "0." -> the ten digits;
- queries of one ``score`` call (e.g. one batch of camera streams) are sent concurrently, and the
  server batches them; rounds of the trie go in lock step for all queries.
The generate readout (and chain-of-thought contrastive) asks for greedy text and parses it.

Which server answers what: ``server_url`` names one server or several (comma-separated); each model is
found by name in ``/v1/models``: a LoRA module named after its modality ("completion", "contrastive"),
or a whole model served under the name "progress" (the progress adapter merged into the base, with its
own vision tower: vLLM cannot serve a LoRA that carries full tower weights). Without adapters the
server's base model answers everything. What a server serves is checked against the configuration at
connect time (adapter folders, the merged checkpoint's provenance file) and a mismatch is refused.

Faults (the node needs nothing else): a server that is not up when the engine is made is retried with
backoff for ``server_connect_s``; then ``server_required`` refuses with a clear error (command-line tools),
otherwise the engine is made anyway and answers with that error, trying again with backoff at later
calls until the server is up (a robot that boots before its server); a server that goes away or stalls
gives failed answers whose error starts with ``tracking.ENGINE_ERROR_PREFIX`` (so callers count them
as engine errors), is not asked again until a ``/health`` probe succeeds (backoff up to
``MAX_RETRY_DELAY_S``), and is used again as soon as it answers; every ``score`` call ends within
``request_timeout_s``; HTTP errors carry the server's message and are logged once per kind. Counts are
in ``stats`` (``VllmEngineStats``) and ``faults``; ``health()`` gives a one-line status.

What it is not: no server management (``lrm_reward.serving.vllm_server`` builds and runs servers), no
model code, no torch. URLs off this machine are refused unless ``allow_remote`` is set.
"""

from __future__ import annotations

import base64
import hashlib
import io
import ipaddress
import json
import logging
import math
import threading
import time
import urllib.parse
from collections import OrderedDict
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrm_reward.core import parsing, prompts
from lrm_reward.core.engine import EngineConfig, EngineStats, QueryError, RewardEngine, check_query
from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.serving_stats import FaultCounter
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX
from lrm_reward.core.types import Answer, Modality, Query, Readout

log = logging.getLogger(__name__)

PRUNE_MASS = 1e-4  # trie branches with less than this share of the probability found so far are not expanded
FIRST_RETRY_DELAY_S = 0.5  # backoff after a server stops answering: doubles up to MAX_RETRY_DELAY_S
MAX_RETRY_DELAY_S = 8.0
PROBE_TIMEOUT_S = 1.0  # /health probe of a server that failed: a stalled one must not hold the caller long
IMAGE_CACHE_ENTRIES = 64  # encoded frames kept (an episode's initial frame is sent with every progress query)
SENT_IMAGES_KEPT = 1024  # per server: frames it has received (later requests send only their uuid)
_CACHE_MISS = "cache miss"  # in vLLM's 400 for a uuid it no longer holds
MERGED_PROVENANCE_FILE = "lrm_merged.json"  # written by serving.vllm_server.merge_adapter
PROGRESS_MODEL_NAME = Modality.PROGRESS.value  # served name of the merged progress model
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


# --- errors -------------------------------------------------------------------------------------------


class VllmUnavailableError(ModelLoadError):
    """The server did not come up (or answer) within server_connect_s; the message says where and why."""


class ServerFault(Exception):
    """One failed request. kind: counter name ("unreachable", "timeout", "http_404", ...); transport: the
    server itself stopped answering (connection refused or reset, timeout), so it is probed before reuse."""

    def __init__(self, kind: str, message: str, transport: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.transport = transport


# --- statistics ---------------------------------------------------------------------------------------


@dataclass
class VllmEngineStats(EngineStats):
    """EngineStats plus what the HTTP backend adds. prefix_cache_hits / misses count requests whose prompt
    did / did not reuse KV blocks from the server's cache (usage.prompt_tokens_details.cached_tokens)."""

    http_requests: int = 0
    server_faults: dict[str, int] = field(default_factory=dict)  # kind -> failed requests
    failed_fast: int = 0  # queries answered as errors without a request: their server was down
    reconnects: int = 0  # times a server that had stopped answering was found answering again
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


# --- one server ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServedModel:
    name: str
    root: str  # what the server loaded it from (folder or Hub id)
    parent: str | None  # the base model's name for a LoRA module, None for a whole model


class ServerLink:
    """HTTP to one vLLM server, with its up/down state (down = probe /health before the next request)."""

    def __init__(self, url: str, http_client) -> None:
        self.url = url
        self._http = http_client
        self._lock = threading.Lock()
        self.models: dict[str, ServedModel] = {}
        self.down_reason = ""  # "" while up
        self._retry_at = 0.0
        self._delay = FIRST_RETRY_DELAY_S
        self.reconnects = 0
        # uuids of frames this server has received: vLLM keeps the processed frame under its uuid, so a later
        # request may send the uuid alone (a restarted server has forgotten them: cleared on reconnect)
        self._sent: OrderedDict[str, None] = OrderedDict()

    def has_image(self, uuid: str) -> bool:
        with self._lock:
            return uuid in self._sent

    def sent_images(self, uuids: list[str], received: bool) -> None:
        with self._lock:
            for uuid in uuids:
                if received:
                    self._sent[uuid] = None
                    self._sent.move_to_end(uuid)
                else:
                    self._sent.pop(uuid, None)
            while len(self._sent) > SENT_IMAGES_KEPT:
                self._sent.popitem(last=False)

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

    # -- state --

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

    def ensure_up(self, deadline: float) -> bool:
        """Raise ServerFault at once while the server is known down and its retry time has not come; when it
        has, probe /health (short timeout) and the model list, and mark it up again if both answer.
        Returns True when the server was down and answers again."""
        with self._lock:
            if not self.down_reason:
                return False
            now = time.monotonic()
            if now < self._retry_at:
                raise ServerFault(
                    "down",
                    f"{self.url} not answering ({self.down_reason}); next try in "
                    f"{self._retry_at - now:.1f} s",
                )
            try:
                before = dict(self.models)
                self.discover(min(PROBE_TIMEOUT_S, max(deadline - now, 0.05)))
            except ServerFault as exc:
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, MAX_RETRY_DELAY_S)
                raise ServerFault("down", f"{self.url} still not answering: {exc}") from exc
            missing = sorted(set(before) - set(self.models))
            self._sent.clear()  # perhaps restarted: it holds no frame of ours any more
            self.down_reason = ""
            self._delay = FIRST_RETRY_DELAY_S
            self.reconnects += 1
        if missing:
            log.error("vLLM server %s is back but no longer serves %s", self.url, missing)
        log.warning("vLLM server %s answers again (reconnect %d)", self.url, self.reconnects)
        return True

    def mark_down(self, fault: ServerFault) -> None:
        with self._lock:
            if not self.down_reason:
                self._delay = FIRST_RETRY_DELAY_S
                log.warning("vLLM server %s stopped answering: %s", self.url, fault)
            self.down_reason = f"{fault.kind}: {fault}"
            self._retry_at = time.monotonic() + self._delay
            self._delay = min(self._delay * 2, MAX_RETRY_DELAY_S)


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


# --- what is asked per modality -----------------------------------------------------------------------


@dataclass(frozen=True)
class ScoringPlan:
    """How one modality's closed answer set is read on one server: the candidates' token paths after the
    answer prefix and, for each trie node (a proper, non-empty prefix of a path), the text that continues
    the answer prefix up to it."""

    labels: tuple[str, ...]
    values: tuple[float, ...]
    paths: tuple[tuple[int, ...], ...]
    node_text: dict[tuple[int, ...], str]

    def children(self, node: tuple[int, ...]) -> list[int]:
        depth = len(node)
        return sorted({p[depth] for p in self.paths if len(p) > depth and p[:depth] == node})


@dataclass(frozen=True)
class Route:
    link: ServerLink
    model: str  # name in the request ("completion", "progress", or the base model's name)
    plan: ScoringPlan


def build_scoring_plan(
    link: ServerLink, tokenizer_model: str, modality: Modality, timeout: float
) -> ScoringPlan:
    """Tokenize the answer prefix and every allowed answer on the server; refuse a tokenizer that merges an
    answer into the prefix (its tokens could not be fed as a continuation)."""
    spec = prompts.PROMPT_SPECS[modality]
    prefix_ids = link.tokenize(tokenizer_model, spec.answer_prefix, timeout)
    paths = []
    for label in spec.answers:
        joint = link.tokenize(tokenizer_model, spec.answer_prefix + label, timeout)
        if joint[: len(prefix_ids)] != prefix_ids or len(joint) == len(prefix_ids):
            raise ModelLoadError(
                f"{link.url}: the tokenizer of {tokenizer_model!r} merges answer {label!r} into the answer "
                f"prefix {spec.answer_prefix!r}: closed-set scoring over HTTP needs a clean token boundary"
            )
        paths.append(tuple(joint[len(prefix_ids) :]))
    if len(set(paths)) != len(paths):
        raise ModelLoadError(f"{link.url}: answers {list(spec.answers)} do not tokenize to distinct paths")
    node_text: dict[tuple[int, ...], str] = {}
    for label, path in zip(spec.answers, paths, strict=True):
        for depth in range(1, len(path)):
            node = path[:depth]
            if node in node_text:
                continue
            # the node's text is the part of the label its tokens cover: check the server splits it back
            text = next(
                (
                    label[:n]
                    for n in range(1, len(label) + 1)
                    if link.tokenize(tokenizer_model, spec.answer_prefix + label[:n], timeout)
                    == prefix_ids + list(node)
                ),
                None,
            )
            if text is None:
                raise ModelLoadError(
                    f"{link.url}: answer {label!r} has no text boundary after its first {depth} token(s): "
                    "it cannot be scored token by token over HTTP"
                )
            node_text[node] = text
    return ScoringPlan(tuple(spec.answers), tuple(spec.answers.values()), tuple(paths), node_text)


def check_chat_continuation(link: ServerLink, model: str, timeout: float) -> None:
    """The server's chat template must continue an assistant message exactly where the local engine's
    prompt (generation prompt + answer prefix) goes on; a template that adds anything (e.g. think tags)
    would change every answer."""
    probe = [{"role": "user", "content": "x"}]
    prefix = prompts.PROGRESS_ANSWER_PREFIX
    opened = link.post(
        "/tokenize", {"model": model, "messages": probe, "add_generation_prompt": True}, timeout
    )
    continued = link.post(
        "/tokenize",
        {
            "model": model,
            "messages": [*probe, {"role": "assistant", "content": prefix}],
            "add_generation_prompt": False,
            "continue_final_message": True,
        },
        timeout,
    )
    expected = list(opened["tokens"]) + link.tokenize(model, prefix, timeout)
    if list(continued["tokens"]) != expected:
        raise ModelLoadError(
            f"{link.url}: the chat template of {model!r} does not continue an assistant message right after "
            "the generation prompt (it adds or drops tokens): its answers would differ from the local "
            "engine's"
        )


# --- the engine ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    """One query on its way through the rounds."""

    index: int
    query: Query
    route: Route
    generate: bool = False
    max_new_tokens: int = 0
    prefill: bool = False
    content: list[dict] | None = None  # the user message; image parts as {"type": "image", "uuid", "url"}
    frontier: list[tuple[tuple[int, ...], float]] = field(default_factory=lambda: [((), 0.0)])
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> log-probability
    mass_exact: bool = True  # False once a shared step was skipped (the allowed-set mass is then unknown)
    answer: Answer | None = None


class VllmRewardEngine(RewardEngine):
    """RewardEngine over vLLM servers; see the module docstring. transport: an httpx transport (tests)."""

    def __init__(self, cfg: EngineConfig, transport=None) -> None:
        import httpx

        if not cfg.server_url:
            raise ValueError("backend 'vllm' needs server_url (e.g. http://127.0.0.1:8000)")
        self.cfg = cfg
        self.stats = VllmEngineStats()
        self.faults = FaultCounter()
        self._stats_lock = threading.Lock()
        self._urls = parse_server_urls(cfg.server_url, cfg.allow_remote)
        limits = httpx.Limits(
            max_connections=cfg.server_concurrency * 2, max_keepalive_connections=cfg.server_concurrency
        )
        # trust_env=False: no proxy from the environment may carry frames meant for a loopback server
        self._http = httpx.Client(trust_env=False, limits=limits, transport=transport)
        self._links = [ServerLink(url, self._http) for url in self._urls]
        self._pool = ThreadPoolExecutor(cfg.server_concurrency, thread_name_prefix="vllm-request")
        self._images: OrderedDict[str, str] = OrderedDict()  # uuid -> data URL of recent frames
        self._images_lock = threading.Lock()
        self._routes: dict[Modality, Route] | None = None  # None until the servers were found and checked
        self._closed = False
        # not connected yet (server_required=False): the next connect attempt and its backoff
        self._connect_lock = threading.Lock()
        self._connect_error = ""
        self._connect_at = 0.0
        self._connect_delay = FIRST_RETRY_DELAY_S
        self.model_id = f"vllm[{', '.join(self._urls)}] {cfg.describe()}"
        try:
            self._connect()
        except VllmUnavailableError as exc:
            if cfg.server_required:
                self.close()
                raise
            self._connect_error = str(exc)
            self._connect_at = time.monotonic() + self._connect_delay
            log.error(
                "%s. The engine answers every query with this error and tries again (with backoff) at later "
                "calls; it serves as soon as the server is up",
                exc,
            )
        except BaseException:
            self.close()
            raise

    # -- public --

    def score(self, queries: list[Query]) -> list[Answer]:
        started = time.monotonic()
        deadline = started + self.cfg.request_timeout_s
        if self._routes is None and not self._closed:
            try:
                self._connect_later(deadline)
            except ServerFault as fault:
                self._count_fault(fault)
                with self._stats_lock:
                    self.stats.queries += len(queries)
                    self.stats.failed_fast += len(queries)
                    self.stats.unparsed += len(queries)
                    self.stats.errors += len(queries)
                return [_failed(q, _engine_error(fault)) for q in queries]
        answers: list[Answer | None] = [None] * len(queries)
        jobs: list[_Job] = []
        for index, query in enumerate(queries):
            try:
                jobs.append(self._job(index, query))
            except QueryError as exc:
                answers[index] = _failed(query, f"bad query: {exc}")
        live = []
        for job in jobs:
            try:
                if job.route.link.ensure_up(deadline):
                    with self._stats_lock:
                        self.stats.reconnects += 1
                live.append(job)
            except ServerFault as exc:
                self._count_fault(exc)
                job.answer = _failed(job.query, _engine_error(exc))
                with self._stats_lock:
                    self.stats.failed_fast += 1
        self._encode_images(live, deadline)
        self._run_rounds([j for j in live if j.answer is None], deadline, started)
        for job in jobs:
            answers[job.index] = job.answer or _failed(job.query, "not answered")
        done = [
            a if a is not None else _failed(q, "not scored") for a, q in zip(answers, queries, strict=True)
        ]
        with self._stats_lock:
            self.stats.queries += len(done)
            self.stats.forward_batches += 1
            self.stats.unparsed += sum(1 for a in done if not a.parsed)
            self.stats.errors += sum(1 for a in done if a.error and a.value is None)
        return done

    def health(self) -> tuple[bool, str]:
        """(all servers answering, one line saying which are not and why)."""
        if self._routes is None:
            return False, f"vLLM server not connected yet: {self._connect_error}"
        down = [f"{link.url}: {link.down_reason}" for link in self._links if link.down_reason]
        if down:
            return False, "vLLM server not answering: " + "; ".join(down)
        return True, f"vLLM servers answering: {', '.join(self._urls)}"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()

    # -- connecting --

    def _connect(self) -> None:
        """Discover every server, retrying with backoff for server_connect_s; then route and plan."""
        started = time.monotonic()
        delay, attempt = FIRST_RETRY_DELAY_S, 0
        while True:
            attempt += 1
            try:
                for link in self._links:
                    link.discover(timeout=max(2.0, min(self.cfg.request_timeout_s, 10.0)))
                break
            except ServerFault as exc:
                waited = time.monotonic() - started
                if waited + delay > self.cfg.server_connect_s:
                    raise VllmUnavailableError(
                        f"vLLM server not ready after {attempt} tries in {waited:.0f} s "
                        f"(server_connect_s={self.cfg.server_connect_s:g}): {exc}. Start it first "
                        "(lrm-vllm-server, see docs/vllm.md) or check model.server_url"
                    ) from exc
                if attempt == 1:
                    log.warning(
                        "vLLM server not ready (%s): retrying for up to %.0f s",
                        exc,
                        self.cfg.server_connect_s,
                    )
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)
        self._set_routes(max(5.0, self.cfg.request_timeout_s))

    def _set_routes(self, timeout: float) -> None:
        try:
            routes = self._choose_routes(timeout)
        except ServerFault as exc:
            raise VllmUnavailableError(f"vLLM server failed while being set up: {exc}") from exc
        served = ", ".join(f"{m.value}@{r.link.url}/{r.model}" for m, r in routes.items())
        self.model_id = f"vllm[{served}] {self.cfg.describe()}"
        self._routes = routes

    def _connect_later(self, deadline: float) -> None:
        """Not connected at construction (server_required=False): one attempt when its backoff time has
        come, else a ServerFault at once. A server serving the wrong models counts as not connected too."""
        with self._connect_lock:
            if self._routes is not None:
                return
            now = time.monotonic()
            if now < self._connect_at:
                raise ServerFault(
                    "not_connected", f"{self._connect_error} (next try in {self._connect_at - now:.1f} s)"
                )
            timeout = max(deadline - now, 0.1)
            try:
                for link in self._links:
                    link.discover(min(PROBE_TIMEOUT_S * 2, timeout))
                self._set_routes(timeout)
            except (ServerFault, ModelLoadError) as exc:
                self._connect_error = f"vLLM server not ready: {exc}"
                self._connect_at = time.monotonic() + self._connect_delay
                self._connect_delay = min(self._connect_delay * 2, MAX_RETRY_DELAY_S)
                raise ServerFault("not_connected", self._connect_error) from exc
            self._connect_error = ""
            with self._stats_lock:
                self.stats.reconnects += 1
        log.warning("vLLM servers found: %s", self.model_id)

    def _choose_routes(self, timeout: float) -> dict[Modality, Route]:
        served = {
            name: (link, model) for link in reversed(self._links) for name, model in link.models.items()
        }
        listing = ", ".join(f"{link.url}: {sorted(link.models)}" for link in self._links)
        picks: dict[Modality, tuple[ServerLink, ServedModel]] = {}
        if not self.cfg.adapters:
            link = self._links[0]
            bases = [m for m in link.models.values() if m.parent is None]
            if not bases:
                raise ModelLoadError(f"{link.url} serves no base model ({listing})")
            base = bases[0]
            self._check_source(link, base.root, self.cfg.base_model, "base model")
            log.warning(
                "no adapters configured: %s/%s answers every modality (not the released reward model)",
                link.url,
                base.name,
            )
            picks = {m: (link, base) for m in Modality}
        else:
            for name, spec in self.cfg.adapters.items():
                if name not in served:
                    raise ModelLoadError(
                        f"no vLLM server serves {name!r} (served: {listing}). Start the servers with "
                        "lrm-vllm-server for the same model config (progress is served as a merged model)"
                    )
                link, model = served[name]
                self._check_served(link, model, name, spec)
                picks[Modality(name)] = (link, model)
        routes: dict[Modality, Route] = {}
        plans: dict[tuple[str, str, Modality], ScoringPlan] = {}
        checked: set[tuple[str, str]] = set()
        for modality, (link, model) in picks.items():
            tokenizer_model = model.parent or model.name
            if (link.url, tokenizer_model) not in checked:
                check_chat_continuation(link, tokenizer_model, timeout)
                checked.add((link.url, tokenizer_model))
            key = (link.url, tokenizer_model, modality)
            if key not in plans:
                plans[key] = build_scoring_plan(link, tokenizer_model, modality, timeout)
            routes[modality] = Route(link, model.name, plans[key])
        return routes

    def _check_served(self, link: ServerLink, model: ServedModel, name: str, spec: str) -> None:
        if model.parent is not None:  # a LoRA module: from the configured folder, on the configured base
            self._check_source(link, model.root, spec, f"adapter {name!r}")
            base = link.models.get(model.parent)
            if base is not None:
                self._check_source(link, base.root, self.cfg.base_model, "base model")
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
            log.info(
                "cannot check the merged progress model on %s (its folder is not on this machine)", link.url
            )
            return
        record = json.loads(provenance.read_text())
        self._check_source(link, record.get("adapter", ""), spec, "merged progress adapter")
        self._check_source(link, record.get("base", ""), self.cfg.base_model, "merged progress base model")

    def _check_source(self, link: ServerLink, served: str, configured: str, what: str) -> None:
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

    # -- scoring --

    def _job(self, index: int, query: Query) -> _Job:
        if self._closed:
            raise QueryError("engine is closed")
        modality = check_query(query, self.cfg.max_task_chars, self.cfg.max_image_side)
        route = (self._routes or {}).get(modality)
        if route is None:
            have = sorted(m.value for m in self._routes or {})
            raise QueryError(f"no {modality.value!r} adapter configured (have {have})")
        clean = Query(modality, query.task, list(query.images), query.chain_of_thought)
        job = _Job(index, clean, route)
        cot = modality is Modality.CONTRASTIVE and (query.chain_of_thought or self.cfg.chain_of_thought)
        if cot:
            job.generate, job.max_new_tokens = True, self.cfg.max_new_tokens[modality.value]
        elif self.cfg.readout is Readout.GENERATE:
            job.generate = True
            if modality is Modality.CONTRASTIVE:  # released prompt, reply started at its JSON answer
                job.max_new_tokens, job.prefill = self.cfg.answer_max_new_tokens, True
            else:
                job.max_new_tokens = self.cfg.max_new_tokens[modality.value]
        return job

    def _encode_images(self, jobs: list[_Job], deadline: float) -> None:
        def encode(job: _Job) -> None:
            messages = prompts.build_messages(
                job.query.modality, job.query.task, len(job.query.images), self.cfg.max_task_chars
            )
            frames = iter([self._encoded(image) for image in job.query.images])
            job.content = [
                dict(zip(("type", "uuid", "url"), ("image", *next(frames)), strict=True))
                if part["type"] == "image"
                else part
                for part in messages[0]["content"]
            ]

        futures = {self._pool.submit(encode, job): job for job in jobs}
        wait(futures, timeout=max(deadline - time.monotonic(), 0.0))
        for future, job in futures.items():
            if not future.done():
                future.cancel()
                job.answer = _failed(job.query, f"{ENGINE_ERROR_PREFIX}timeout: images not encoded in time")
            elif future.exception() is not None:
                exc = future.exception()
                job.answer = _failed(job.query, f"bad query: {type(exc).__name__}: {exc}")

    def _encoded(self, image: np.ndarray) -> tuple[str, str]:
        """(uuid, data URL) of a frame. The uuid is a hash of the pixels: vLLM keys its caches (processed
        frames, prefix KV blocks) on it as it would on its own content hash. BMP: lossless like PNG but
        encoded in ~2 ms instead of ~40 ms for 640x480 (the frame crosses loopback or a LAN, and is sent
        once per server: later requests name its uuid)."""
        from PIL import Image

        array = np.ascontiguousarray(image)
        digest = hashlib.blake2b(array.data, digest_size=16, key=repr(array.shape).encode()).hexdigest()
        uuid = f"lrm-{digest}"
        with self._images_lock:
            if uuid in self._images:
                self._images.move_to_end(uuid)
                return uuid, self._images[uuid]
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="BMP")
        url = "data:image/bmp;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        with self._images_lock:
            self._images[uuid] = url
            while len(self._images) > IMAGE_CACHE_ENTRIES:
                self._images.popitem(last=False)
        return uuid, url

    def _run_rounds(self, jobs: list[_Job], deadline: float, started: float) -> None:
        """Lock-step rounds: every unfinished query sends its next level's requests, all at once."""
        active = list(jobs)
        while active:
            requests: list[tuple[_Job, tuple[int, ...] | None, list[int]]] = []
            for job in active:
                if job.generate:
                    requests.append((job, None, []))
                    continue
                for node, ids in self._next_requests(job):
                    requests.append((job, node, ids))
            remaining = deadline - time.monotonic()
            if not requests:
                break
            if remaining <= 0:
                fault = self._timeout_fault()
                self._count_fault(fault)
                for job in active:
                    job.answer = _failed(job.query, _engine_error(fault))
                break
            futures: dict[Future, tuple[_Job, tuple[int, ...] | None, list[int]]] = {
                self._pool.submit(self._ask, job, node, ids, deadline): (job, node, ids)
                for job, node, ids in requests
            }
            done, pending = wait(futures, timeout=remaining + 0.05, return_when=ALL_COMPLETED)
            results: dict[int, list] = {}
            for future in pending:
                future.cancel()
            for future, (job, node, ids) in futures.items():
                if job.answer is not None:
                    continue
                if future not in done:
                    fault = self._timeout_fault()
                    job.route.link.mark_down(fault)
                    self._count_fault(fault)
                    job.answer = _failed(job.query, _engine_error(fault))
                    continue
                exc = future.exception()
                if exc is not None:
                    fault = (
                        exc
                        if isinstance(exc, ServerFault)
                        else ServerFault("client_error", f"{type(exc).__name__}: {exc}")
                    )
                    self._count_fault(fault)
                    job.answer = _failed(job.query, _engine_error(fault))
                    continue
                results.setdefault(id(job), []).append((node, ids, future.result()))
            still = []
            for job in active:
                if job.answer is not None:
                    continue
                if job.generate:
                    job.answer = self._parse_generated(job, results[id(job)][0][2], started)
                    continue
                self._record(job, results.get(id(job), []))
                if job.frontier:
                    still.append(job)
                else:
                    job.answer = self._closed_set_answer(job, started)
            active = still

    def _next_requests(self, job: _Job) -> list[tuple[tuple[int, ...], list[int]]]:
        """The trie nodes this job must ask about next (each with the child tokens to read)."""
        plan = job.route.plan
        paths = plan.paths
        while True:
            # a step every remaining candidate shares cancels when normalising: skip it
            if len(job.frontier) == 1 and not job.scores:
                node, lp = job.frontier[0]
                children = plan.children(node)
                if len(children) == 1 and (*node, children[0]) not in paths:
                    job.frontier = [((*node, children[0]), lp)]
                    job.mass_exact = False
                    continue
            return [(node, plan.children(node)) for node, _ in job.frontier]

    def _record(self, job: _Job, results: list) -> None:
        plan = job.route.plan
        frontier = []
        for node, ids, logprobs in results:
            base = dict(job.frontier)[node]
            for token in ids:
                child = (*node, token)
                child_lp = base + logprobs[token]
                if child in plan.paths:
                    job.scores[plan.paths.index(child)] = child_lp
                if any(len(p) > len(child) and p[: len(child)] == child for p in plan.paths):
                    frontier.append((child, child_lp))
        if frontier:  # prune branches that cannot matter
            found = [math.exp(lp) for lp in job.scores.values()] + [math.exp(lp) for _, lp in frontier]
            total = sum(found)
            frontier = [(n, lp) for n, lp in frontier if total == 0 or math.exp(lp) >= PRUNE_MASS * total]
        job.frontier = frontier

    def _ask(self, job: _Job, node: tuple[int, ...] | None, ids: list[int], deadline: float):
        """One chat-completion request; returns {token id: logprob} (closed set) or the generated text."""
        route = job.route
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise self._timeout_fault()
        modality = job.query.modality
        prefix = prompts.PROMPT_SPECS[modality].answer_prefix
        messages: list[dict] = [{"role": "user", "content": []}]
        body: dict = {"model": route.model, "temperature": 0.0}
        if job.generate:
            body["max_tokens"] = job.max_new_tokens
            if job.prefill:
                messages.append({"role": "assistant", "content": prefix})
        else:
            text = prefix + (route.plan.node_text[node] if node else "")
            messages.append({"role": "assistant", "content": text})
            body.update(max_tokens=1, logprobs=True, logprob_token_ids=ids, return_tokens_as_token_ids=True)
        continuing = len(messages) == 2
        body.update(
            messages=messages, add_generation_prompt=not continuing, continue_final_message=continuing
        )
        reply = self._post_chat(route.link, body, job.content, deadline)
        self._count_usage(reply.get("usage"))
        try:
            choice = reply["choices"][0]
            if job.generate:
                return str(choice["message"]["content"] or "")
            listed = choice["logprobs"]["content"][0]["top_logprobs"]
            logprobs = {int(str(e["token"]).removeprefix("token_id:")): float(e["logprob"]) for e in listed}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ServerFault(
                "bad_response", f"{route.link.url}: unexpected completion {json.dumps(reply)[:300]}"
            ) from exc
        missing = [t for t in ids if t not in logprobs]
        if missing:
            raise ServerFault("bad_response", f"{route.link.url}: no logprob for token ids {missing}")
        return logprobs

    def _post_chat(self, link: ServerLink, body: dict, content: list[dict], deadline: float) -> dict:
        """POST one chat completion; frames the server already holds go as their uuid alone. When it has
        dropped one after all (its cache is bounded; a restart empties it), the request goes again with
        every frame's data."""
        uuids = [part["uuid"] for part in content if part["type"] == "image"]
        for with_data in (False, True):
            parts = []
            omitted = False
            for part in content:
                if part["type"] != "image":
                    parts.append(part)
                elif not with_data and link.has_image(part["uuid"]):
                    parts.append({"type": "image_url", "image_url": None, "uuid": part["uuid"]})
                    omitted = True
                else:
                    parts.append(
                        {"type": "image_url", "image_url": {"url": part["url"]}, "uuid": part["uuid"]}
                    )
            body["messages"][0]["content"] = parts
            try:
                reply = link.post("/v1/chat/completions", body, deadline - time.monotonic())
            except ServerFault as fault:
                if fault.transport:
                    link.mark_down(fault)
                    raise
                if omitted and fault.kind == "http_400" and _CACHE_MISS in str(fault).lower():
                    link.sent_images(uuids, received=False)
                    continue
                raise
            link.sent_images(uuids, received=True)
            return reply
        raise ServerFault("bad_response", f"{link.url}: frames not accepted even with their data")

    def _closed_set_answer(self, job: _Job, started: float) -> Answer:
        plan = job.route.plan
        modality = job.query.modality
        logprobs = np.array([job.scores.get(i, -np.inf) for i in range(len(plan.paths))], dtype=np.float64)
        if not np.isfinite(logprobs.max()):
            return _failed(job.query, "non-finite logprobs from the server")
        weights = np.exp(logprobs - logprobs.max())
        probs = weights / weights.sum()
        best = int(probs.argmax())
        expectation = float((probs * np.array(plan.values)).sum())
        mass = f"{float(np.exp(logprobs).sum()):.3f}" if job.mass_exact else "n/a"
        prefix = prompts.PROMPT_SPECS[modality].answer_prefix
        return Answer(
            modality=modality,
            value=expectation,
            parsed=True,
            confidence=float(probs[best]),
            probabilities={label: float(p) for label, p in zip(plan.labels, probs, strict=True)},
            raw_text=f"{prefix}{plan.labels[best]} [logits readout via vLLM; allowed-set mass {mass}]",
            latency_s=time.monotonic() - started,
        )

    def _parse_generated(self, job: _Job, text: str, started: float) -> Answer:
        prefix = prompts.PROMPT_SPECS[job.query.modality].answer_prefix if job.prefill else ""
        raw = prefix + text
        result = parsing.parse_answer(job.query.modality, raw)
        return Answer(
            modality=job.query.modality,
            value=result.value,
            parsed=result.parsed,
            raw_text=raw,
            latency_s=time.monotonic() - started,
            error=None if result.parsed else f"unparsed model output: {result.error}",
        )

    # -- counting --

    def _timeout_fault(self) -> ServerFault:
        return ServerFault(
            "timeout", f"no answer within request_timeout_s={self.cfg.request_timeout_s:g} s", True
        )

    def _count_fault(self, fault: ServerFault) -> None:
        with self._stats_lock:
            self.stats.server_faults[fault.kind] = self.stats.server_faults.get(fault.kind, 0) + 1
        if fault.kind == "down":
            return  # counted; the fault that took the server down was logged
        if self.faults.report(fault.kind, str(fault)):
            log.error("vLLM %s: %s (logged once per kind; counted in the engine's stats)", fault.kind, fault)

    def _count_usage(self, usage) -> None:
        if not isinstance(usage, dict):
            return
        prompt = int(usage.get("prompt_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        with self._stats_lock:
            self.stats.http_requests += 1
            self.stats.prompt_tokens += prompt
            self.stats.cached_prompt_tokens += cached
            if cached:
                self.stats.prefix_cache_hits += 1
            else:
                self.stats.prefix_cache_misses += 1


def _engine_error(fault: ServerFault) -> str:
    return f"{ENGINE_ERROR_PREFIX}VllmServerError: {fault.kind}: {fault}"


def _failed(query: Query, error: str) -> Answer:
    try:
        modality = Modality(query.modality)
    except (ValueError, AttributeError):
        modality = Modality.PROGRESS
    return Answer(modality=modality, value=None, parsed=False, error=error)


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
