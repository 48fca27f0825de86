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
  trie, one request per trie node whose children are needed (``vllm_scoring`` says how);
- queries of one ``score`` call (e.g. one batch of camera streams) are sent concurrently, and the
  server batches them; rounds of the trie go in lock step for all queries.
The generate readout (and chain-of-thought contrastive) asks for greedy text and parses it.

Which server answers what: ``server_url`` names one server or several (comma-separated); each model is
found by name in ``/v1/models``: a LoRA module named after its modality ("completion", "contrastive"),
or a whole model served under the name "progress" (the progress adapter merged into the base, with its
own vision tower: vLLM cannot serve a LoRA that carries full tower weights). Without adapters the
server's base model answers everything. What a server serves is checked against the configuration at
connect time (adapter folders, the merged checkpoint's provenance file: ``vllm_model_checks``) and a
mismatch is refused.

Faults (the node needs nothing else): a server that is not up when the engine is made is retried with
backoff for ``server_connect_s``; then ``server_required`` refuses with a clear error (command-line tools),
otherwise the engine is made anyway and answers with that error, trying again with backoff at later
calls until the server is up (a robot that boots before its server); a server that goes away or stalls
gives failed answers whose error starts with ``tracking.ENGINE_ERROR_PREFIX`` (so callers count them
as engine errors), is not asked again until a ``/health`` probe succeeds (backoff up to
``MAX_RETRY_DELAY_S``), and is used again as soon as it answers; every ``score`` call ends within
``request_timeout_s``; HTTP errors carry the server's message and are logged once per kind. Counts are
in ``stats`` (``VllmEngineStats``) and ``faults``; ``health()`` gives a one-line status.

Here: the engine (connecting, routing) and each server's up/down state with its backoff (``ServerLink``).
Elsewhere, and exported from here too: URLs, requests and how they fail (``vllm_transport``), the requests
of one ``score`` call (``vllm_rounds``), the answer trie (``vllm_scoring``), what a server serves
(``vllm_model_checks``).

What it is not: no server management (``lrm_reward.serving.vllm_server`` builds and runs servers), no
model code, no torch. URLs off this machine are refused unless ``allow_remote`` is set.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from lrm_reward.core.engine import EngineConfig, QueryError, RewardEngine, check_query
from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.serving_stats import FaultCounter
from lrm_reward.core.types import Answer, Modality, Query, Readout
from lrm_reward.core.vllm_model_checks import (
    MERGED_PROVENANCE_FILE,
    PROGRESS_MODEL_NAME,
    check_served,
    check_source,
)
from lrm_reward.core.vllm_rounds import (
    IMAGE_CACHE_ENTRIES,
    QueryJob,
    RequestRounds,
    Route,
    VllmEngineStats,
    engine_error,
)
from lrm_reward.core.vllm_scoring import (
    PRUNE_MASS,
    ScoringPlan,
    build_scoring_plan,
    check_chat_continuation,
    failed_answer,
)
from lrm_reward.core.vllm_transport import (
    ServedModel,
    ServerApi,
    ServerFault,
    check_server_url,
    is_loopback_host,
    parse_server_urls,
)

__all__ = [  # the backend's public names, wherever they are defined: importers may take them from here
    "FIRST_RETRY_DELAY_S",
    "IMAGE_CACHE_ENTRIES",
    "MAX_RETRY_DELAY_S",
    "MERGED_PROVENANCE_FILE",
    "PROBE_TIMEOUT_S",
    "PROGRESS_MODEL_NAME",
    "PRUNE_MASS",
    "SENT_IMAGES_KEPT",
    "Route",
    "ScoringPlan",
    "ServedModel",
    "ServerFault",
    "ServerLink",
    "VllmEngineStats",
    "VllmRewardEngine",
    "VllmUnavailableError",
    "build_scoring_plan",
    "check_chat_continuation",
    "check_server_url",
    "is_loopback_host",
    "parse_server_urls",
]

log = logging.getLogger(__name__)

FIRST_RETRY_DELAY_S = 0.5  # backoff after a server stops answering: doubles up to MAX_RETRY_DELAY_S
MAX_RETRY_DELAY_S = 8.0
PROBE_TIMEOUT_S = 1.0  # /health probe of a server that failed: a stalled one must not hold the caller long
SENT_IMAGES_KEPT = 1024  # per server: frames it has received (later requests send only their uuid)


# --- errors -------------------------------------------------------------------------------------------


class VllmUnavailableError(ModelLoadError):
    """The server did not come up (or answer) within server_connect_s; the message says where and why."""


# --- one server ---------------------------------------------------------------------------------------


# The requests are ServerApi's (vllm_transport); the up/down state stays here because its backoff reads this
# module's FIRST_RETRY_DELAY_S and MAX_RETRY_DELAY_S at call time, which tests shorten.
class ServerLink(ServerApi):
    """HTTP to one vLLM server, with its up/down state (down = probe /health before the next request)."""

    def __init__(self, url: str, http_client) -> None:
        super().__init__(url, http_client)
        self._lock = threading.Lock()
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

    # -- state --

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


# --- the engine ---------------------------------------------------------------------------------------


class VllmRewardEngine(RequestRounds, RewardEngine):
    """RewardEngine over vLLM servers; see the module docstring. transport: an httpx transport (tests).
    Connecting and routing are here; the requests of a score call are RequestRounds' (vllm_rounds)."""

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
                return [failed_answer(q, engine_error(fault)) for q in queries]
        answers: list[Answer | None] = [None] * len(queries)
        jobs: list[QueryJob] = []
        for index, query in enumerate(queries):
            try:
                jobs.append(self._job(index, query))
            except QueryError as exc:
                answers[index] = failed_answer(query, f"bad query: {exc}")
        live = []
        for job in jobs:
            try:
                if job.route.link.ensure_up(deadline):
                    with self._stats_lock:
                        self.stats.reconnects += 1
                live.append(job)
            except ServerFault as exc:
                self._count_fault(exc)
                job.answer = failed_answer(job.query, engine_error(exc))
                with self._stats_lock:
                    self.stats.failed_fast += 1
        self._encode_images(live, deadline)
        self._run_rounds([j for j in live if j.answer is None], deadline, started)
        for job in jobs:
            answers[job.index] = job.answer or failed_answer(job.query, "not answered")
        done = [
            a if a is not None else failed_answer(q, "not scored")
            for a, q in zip(answers, queries, strict=True)
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
            check_source(link, base.root, self.cfg.base_model, "base model")
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
                check_served(link, model, name, spec, self.cfg.base_model)
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

    # -- scoring --

    def _job(self, index: int, query: Query) -> QueryJob:
        if self._closed:
            raise QueryError("engine is closed")
        modality = check_query(query, self.cfg.max_task_chars, self.cfg.max_image_side)
        route = (self._routes or {}).get(modality)
        if route is None:
            have = sorted(m.value for m in self._routes or {})
            raise QueryError(f"no {modality.value!r} adapter configured (have {have})")
        clean = Query(modality, query.task, list(query.images), query.chain_of_thought)
        job = QueryJob(index, clean, route)
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
