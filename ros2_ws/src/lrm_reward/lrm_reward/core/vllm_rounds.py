"""The scoring half of the "vllm" engine backend: how the queries of one ``score`` call travel to the
servers and come back as answers. Each query's frames are encoded (lossless BMP data URLs named by a hash
of their pixels) and its requests go in lock-step rounds, all queries at once, until every answer is read
or the call's deadline passes; failed requests and token usage are counted.

``RequestRounds`` is a mixin of ``vllm_client.VllmRewardEngine``: it uses the engine's attributes declared
on it (set in the engine's ``__init__``). What it is not: no connecting, routing or server up/down state
(``vllm_client``), no trie arithmetic (``vllm_scoring``), no HTTP error handling (``vllm_transport``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from lrm_reward.core import parsing, prompts
from lrm_reward.core.engine import EngineConfig, EngineStats
from lrm_reward.core.serving_stats import FaultCounter
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX
from lrm_reward.core.types import Answer, Query
from lrm_reward.core.vllm_scoring import ScoringPlan, TrieWalk, failed_answer
from lrm_reward.core.vllm_transport import ServerFault

log = logging.getLogger("lrm_reward.core.vllm_client")  # the backend's logger: filters and tests name it

IMAGE_CACHE_ENTRIES = 64  # encoded frames kept (an episode's initial frame is sent with every progress query)
_CACHE_MISS = "cache miss"  # in vLLM's 400 for a uuid it no longer holds


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


# --- where a query goes -------------------------------------------------------------------------------


class RoutedServer(Protocol):
    """What a route needs of its server: ``vllm_client.ServerLink`` (a Protocol, so this module need not
    import the engine's module)."""

    url: str

    def post(self, path: str, body: dict, timeout: float) -> dict: ...

    def has_image(self, uuid: str) -> bool: ...

    def sent_images(self, uuids: list[str], received: bool) -> None: ...

    def ensure_up(self, deadline: float) -> bool: ...

    def mark_down(self, fault: ServerFault) -> None: ...


@dataclass(frozen=True)
class Route:
    link: RoutedServer
    model: str  # name in the request ("completion", "progress", or the base model's name)
    plan: ScoringPlan


@dataclass(eq=False)
class QueryJob:
    """One query on its way through the rounds."""

    index: int
    query: Query
    route: Route
    generate: bool = False
    max_new_tokens: int = 0
    prefill: bool = False
    content: list[dict] | None = None  # the user message; image parts as {"type": "image", "uuid", "url"}
    walk: TrieWalk = field(init=False)  # closed-set scoring: this query's way down its route's answer trie
    answer: Answer | None = None

    def __post_init__(self) -> None:
        self.walk = TrieWalk(self.route.plan)


# --- the rounds ---------------------------------------------------------------------------------------


class RequestRounds:
    """Encoding, requests and counting for VllmRewardEngine; see the module docstring."""

    cfg: EngineConfig
    stats: VllmEngineStats
    faults: FaultCounter
    _stats_lock: threading.Lock
    _pool: ThreadPoolExecutor
    _images: OrderedDict[str, str]  # uuid -> data URL of recent frames
    _images_lock: threading.Lock

    # -- scoring --

    def _encode_images(self, jobs: list[QueryJob], deadline: float) -> None:
        def encode(job: QueryJob) -> None:
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
                job.answer = failed_answer(
                    job.query, f"{ENGINE_ERROR_PREFIX}timeout: images not encoded in time"
                )
            elif future.exception() is not None:
                exc = future.exception()
                job.answer = failed_answer(job.query, f"bad query: {type(exc).__name__}: {exc}")

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

    def _run_rounds(self, jobs: list[QueryJob], deadline: float, started: float) -> None:
        """Lock-step rounds: every unfinished query sends its next level's requests, all at once."""
        active = list(jobs)
        while active:
            requests: list[tuple[QueryJob, tuple[int, ...] | None, list[int]]] = []
            for job in active:
                if job.generate:
                    requests.append((job, None, []))
                    continue
                for node, ids in job.walk.next_requests():
                    requests.append((job, node, ids))
            remaining = deadline - time.monotonic()
            if not requests:
                break
            if remaining <= 0:
                fault = self._timeout_fault()
                self._count_fault(fault)
                for job in active:
                    job.answer = failed_answer(job.query, engine_error(fault))
                break
            futures: dict[Future, tuple[QueryJob, tuple[int, ...] | None, list[int]]] = {
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
                    job.answer = failed_answer(job.query, engine_error(fault))
                    continue
                exc = future.exception()
                if exc is not None:
                    fault = (
                        exc
                        if isinstance(exc, ServerFault)
                        else ServerFault("client_error", f"{type(exc).__name__}: {exc}")
                    )
                    self._count_fault(fault)
                    job.answer = failed_answer(job.query, engine_error(fault))
                    continue
                results.setdefault(id(job), []).append((node, ids, future.result()))
            still = []
            for job in active:
                if job.answer is not None:
                    continue
                if job.generate:
                    job.answer = self._parse_generated(job, results[id(job)][0][2], started)
                    continue
                job.walk.record(results.get(id(job), []))
                if job.walk.frontier:
                    still.append(job)
                else:
                    job.answer = job.walk.answer(job.query, started)
            active = still

    def _ask(self, job: QueryJob, node: tuple[int, ...] | None, ids: list[int], deadline: float):
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

    def _post_chat(self, link: RoutedServer, body: dict, content: list[dict], deadline: float) -> dict:
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

    def _parse_generated(self, job: QueryJob, text: str, started: float) -> Answer:
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


def engine_error(fault: ServerFault) -> str:
    """The answer error for a failed request: it starts with ENGINE_ERROR_PREFIX, so callers count it as an
    engine error."""
    return f"{ENGINE_ERROR_PREFIX}VllmServerError: {fault.kind}: {fault}"
