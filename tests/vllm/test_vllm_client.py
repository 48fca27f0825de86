"""The vllm backend's client logic without a server: URL policy, config checks, closed-set scoring down the
answer trie, routing to servers, and faults, against a fake vLLM (an httpx MockTransport) whose tokenizer
is one token per character and whose answer distribution is known exactly. The real server: the
test_vllm_*.py modules marked slow."""

from __future__ import annotations

import json
import logging
import math
import time

import httpx
import numpy as np
import pytest
from vllm_servers import free_port

from lrm_reward.core import prompts, vllm_client
from lrm_reward.core.engine import EngineConfig, make_engine
from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.tracking import ENGINE_ERROR_PREFIX
from lrm_reward.core.types import Modality, Query
from lrm_reward.core.vllm_client import VllmRewardEngine, VllmUnavailableError
from lrm_reward.core.vllm_transport import check_server_url

BASE = "/models/base"
ADAPTERS = {m.value: f"/models/{m.value}" for m in Modality}
FRAME = np.full((32, 32, 3), 100, dtype=np.uint8)
# the fake model's answer distribution per modality (allowed-set mass 0.9; "1.0" is below PRUNE_MASS)
DISTRIBUTION = {
    Modality.PROGRESS: {**{f"0.{i}": 0.9 / 10 * (1 + (i % 3)) / 2 for i in range(10)}, "1.0": 1e-9},
    Modality.CONTRASTIVE: {"ImageA": 0.3, "ImageB": 0.6},
    Modality.COMPLETION: {"yes": 0.72, "no": 0.18},
}
for _dist in DISTRIBUTION.values():  # scale each to mass 0.9 exactly
    _total = sum(_dist.values())
    for _label in _dist:
        _dist[_label] *= 0.9 / _total


class FakeVllm:
    """What the client needs of vLLM's HTTP API. mode: "ok", "refuse", "timeout", "500", "garbage"."""

    def __init__(self, servers: dict[str, list[dict]]) -> None:
        self.servers = servers  # "host:port" -> /v1/models entries
        self.mode = "ok"
        self.chat_requests: list[dict] = []
        self.template_extra = ""  # what a template adds after the generation prompt only (e.g. think tags)
        self.frames: set[str] = set()  # uuids of frames received (vLLM's processed-frame cache)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.mode == "refuse":
            raise httpx.ConnectError("Connection refused", request=request)
        if self.mode == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        if self.mode == "500":
            return httpx.Response(500, json={"error": {"message": "boom: engine dead", "code": 500}})
        if self.mode == "garbage":
            return httpx.Response(200, text="<html>proxy</html>")
        path = request.url.path
        host = f"{request.url.host}:{request.url.port}"
        if path == "/health":
            return httpx.Response(200)
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": self.servers[host]})
        body = json.loads(request.content)
        if path == "/tokenize":
            if "prompt" in body:
                return httpx.Response(200, json={"tokens": [ord(c) for c in body["prompt"]]})
            text = self.render(body["messages"], body.get("add_generation_prompt", True))
            return httpx.Response(200, json={"tokens": [ord(c) for c in text]})
        if path == "/v1/chat/completions":
            self.chat_requests.append(body)
            for part in body["messages"][0]["content"]:
                if (
                    part["type"] == "image_url"
                    and part["image_url"] is None
                    and part["uuid"] not in self.frames
                ):
                    message = "Cache miss for image at index 0 but data is not provided."
                    return httpx.Response(400, json={"error": {"message": message, "code": 400}})
                if part["type"] == "image_url" and part["image_url"] is not None:
                    self.frames.add(part["uuid"])
            return httpx.Response(200, json=self.complete(body))
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        text = ""
        for i, message in enumerate(messages):
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(p.get("text", "<img>") for p in content)
            last = i == len(messages) - 1
            if message["role"] == "assistant" and last:
                return text + "A:" + content
            text += f"{message['role'][0].upper()}:{content}|"
        return text + ("A:" + self.template_extra if generation_prompt else "")

    def complete(self, body: dict) -> dict:
        assistant = body["messages"][-1]["content"] if body.get("continue_final_message") else ""
        modality = next(m for m, s in prompts.PROMPT_SPECS.items() if assistant.startswith(s.answer_prefix))
        so_far = assistant[len(prompts.PROMPT_SPECS[modality].answer_prefix) :]
        dist = DISTRIBUTION[modality]
        below = sum(p for label, p in dist.items() if label.startswith(so_far)) if so_far else 1.0
        # after "0" the model puts half its mass off the answer set: a step every likely progress answer
        # shares, which the client skips (it cancels when the candidates are normalised)
        leak = 0.5 if so_far == "0" else 1.0
        listed = []
        for token in body["logprob_token_ids"]:
            mass = sum(p for label, p in dist.items() if label.startswith(so_far + chr(token)))
            p = mass / below * leak
            listed.append({"token": f"token_id:{token}", "logprob": math.log(p) if p > 0 else -9999.0})
        usage = {"prompt_tokens": 100, "prompt_tokens_details": {"cached_tokens": 64 if so_far else 0}}
        return {
            "choices": [{"message": {"content": "x"}, "logprobs": {"content": [{"top_logprobs": listed}]}}],
            "usage": usage,
        }


def _base_server(*loras: str) -> list[dict]:
    entries = [{"id": "base", "root": BASE, "parent": None}]
    return entries + [{"id": name, "root": ADAPTERS[name], "parent": "base"} for name in loras]


def _engine(fake: FakeVllm, urls: str, adapters: dict | None, **changes) -> VllmRewardEngine:
    cfg = EngineConfig(BASE, adapters=adapters, backend="vllm", server_url=urls, **changes)
    return VllmRewardEngine(cfg, transport=fake.transport())


def _queries() -> list[Query]:
    return [
        Query(Modality.PROGRESS, "open the drawer", [FRAME, FRAME]),
        Query(Modality.CONTRASTIVE, "open the drawer", [FRAME, FRAME]),
        Query(Modality.COMPLETION, "open the drawer", [FRAME]),
    ]


@pytest.fixture
def merged_progress_root(tmp_path):
    folder = tmp_path / "merged"
    folder.mkdir()
    record = {"base": BASE, "adapter": ADAPTERS["progress"]}
    (folder / vllm_client.MERGED_PROVENANCE_FILE).write_text(json.dumps(record))
    return folder


@pytest.fixture
def fleet(merged_progress_root) -> FakeVllm:
    """Two servers as lrm-vllm-server runs them: base + LoRA modules, and the merged progress model."""
    return FakeVllm(
        {
            "127.0.0.1:8000": _base_server("completion", "contrastive"),
            "127.0.0.1:8001": [{"id": "progress", "root": str(merged_progress_root), "parent": None}],
        }
    )


URLS = "http://127.0.0.1:8000,http://127.0.0.1:8001"


# --- URLs and config ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:8000", "https://127.5.5.5:443"]
)
def test_loopback_urls_are_accepted(url):
    assert check_server_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.7:8000", "http://gpu-box.lan:8000", "http://0.0.0.0:8000"])
def test_urls_off_this_machine_are_refused_unless_allowed(url):
    with pytest.raises(ValueError, match="allow_remote"):
        check_server_url(url)
    assert check_server_url(url, allow_remote=True) == url


@pytest.mark.parametrize(
    "url",
    [
        "127.0.0.1:8000",
        "ftp://127.0.0.1:8000",
        "http://127.0.0.1",
        "http://u:p@127.0.0.1:80",
        "http://127.0.0.1:8000/?a=1",
        "",
    ],
)
def test_malformed_urls_are_refused(url):
    with pytest.raises(ValueError, match="server_url"):
        check_server_url(url)


def test_engine_config_checks_the_server_settings():
    with pytest.raises(ValueError, match="needs server_url"):
        EngineConfig(BASE, backend="vllm")
    with pytest.raises(ValueError, match="allow_remote"):
        EngineConfig(BASE, backend="vllm", server_url="http://192.168.1.5:8000")
    cfg = EngineConfig(BASE, backend="vllm", server_url="http://192.168.1.5:8000", allow_remote=True)
    assert cfg.server_url == "http://192.168.1.5:8000"
    assert EngineConfig(BASE, backend="vllm", server_url=URLS).server_url == tuple(URLS.split(","))
    for bad in ({"request_timeout_s": 0}, {"server_connect_s": -1}, {"server_concurrency": 0}):
        with pytest.raises(ValueError):
            EngineConfig(BASE, backend="vllm", server_url=URLS, **bad)


def test_a_server_that_never_comes_up_is_retried_then_refused_clearly(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = EngineConfig(
        BASE,
        adapters={"completion": ADAPTERS["completion"]},
        backend="vllm",
        server_url=url,
        server_connect_s=1.2,
        server_required=True,
    )
    started = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(VllmUnavailableError) as failure:
        make_engine(cfg)
    assert isinstance(failure.value, ModelLoadError)  # CLIs print it as one line
    assert time.monotonic() - started >= 0.5  # retried with backoff, not given up at once
    message = str(failure.value)
    assert url in message and "tries" in message and "lrm-vllm-server" in message
    assert any("retrying" in r.getMessage() for r in caplog.records)


# --- scoring ------------------------------------------------------------------------------------------


def test_closed_set_scores_equal_the_model_distribution(fleet):
    with _engine(fleet, URLS, ADAPTERS) as engine:
        answers = engine.score(_queries())
    for answer in answers:
        assert answer.parsed and answer.error is None, answer.error
        dist = DISTRIBUTION[answer.modality]
        total = sum(dist.values())
        for label, p in dist.items():
            assert answer.probabilities[label] == pytest.approx(p / total, abs=1e-6)
        spec = prompts.PROMPT_SPECS[answer.modality]
        expected = sum(spec.answers[label] * p / total for label, p in dist.items())
        assert answer.value == pytest.approx(expected, abs=1e-6)
    # each model was asked on its own server
    models = {r["model"] for r in fleet.chat_requests}
    assert models == {"progress", "contrastive", "completion"}


def test_progress_takes_two_requests_when_only_zero_point_something_is_likely(fleet):
    with _engine(fleet, URLS, {"progress": ADAPTERS["progress"]}) as engine:
        engine.score(_queries()[:1])
        assert engine.stats.http_requests == 2  # prefix -> {0, 1}; then "0." -> the ten digits ("1" pruned)
        assert engine.stats.prefix_cache_hits == 1  # the second continued the first (fake cache numbers)
    continued = [r["messages"][-1]["content"] for r in fleet.chat_requests]
    assert continued == [prompts.PROGRESS_ANSWER_PREFIX, prompts.PROGRESS_ANSWER_PREFIX + "0."]
    assert all(r["max_tokens"] == 1 and r["continue_final_message"] for r in fleet.chat_requests)


def test_frames_travel_losslessly_once_then_by_uuid(fleet):
    import base64
    import io

    from PIL import Image

    frame = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    with _engine(fleet, URLS, ADAPTERS) as engine:
        engine.score([Query(Modality.COMPLETION, "t", [frame])])
        engine.score([Query(Modality.PROGRESS, "t", [frame, frame])])
        for model in ("completion", "progress"):  # one server each: the first request carries the data
            images = [
                [p["image_url"] is not None for p in r["messages"][0]["content"] if p["type"] == "image_url"]
                for r in fleet.chat_requests
                if r["model"] == model
            ]
            assert len(images) >= 2 and all(images[0]) and not any(any(i) for i in images[1:]), images
        uuids = {p["uuid"] for r in fleet.chat_requests for p in r["messages"][0]["content"] if "uuid" in p}
        assert len(uuids) == 1
        fleet.frames.clear()  # the servers restarted, or evicted the frame: sent again with its data
        answers = engine.score([Query(Modality.PROGRESS, "t", [frame, frame])])
        assert answers[0].parsed and engine.stats.server_faults == {}
    url = next(
        p["image_url"]["url"]
        for p in fleet.chat_requests[0]["messages"][0]["content"]
        if p["type"] == "image_url"
    )
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, frame)


def test_bad_queries_are_answered_as_errors_without_a_request(fleet):
    with _engine(fleet, URLS, {"completion": ADAPTERS["completion"]}) as engine:
        answers = engine.score(
            [Query(Modality.COMPLETION, "t", [FRAME, FRAME]), Query(Modality.PROGRESS, "t", [FRAME])]
        )
    assert [a.parsed for a in answers] == [False, False]
    assert "bad query" in answers[0].error and "no 'progress' adapter" in answers[1].error
    assert fleet.chat_requests == []


# --- routing and what a server serves -----------------------------------------------------------------


def test_missing_model_and_wrong_sources_are_refused(fleet, tmp_path):
    with pytest.raises(ModelLoadError, match="no vLLM server serves 'progress'"):
        _engine(fleet, "http://127.0.0.1:8000", ADAPTERS)
    fake = FakeVllm({"127.0.0.1:8000": [{"id": "progress", "root": str(tmp_path), "parent": None}]})
    with pytest.raises(ModelLoadError, match="not a merged progress checkpoint"):
        _engine(fake, "http://127.0.0.1:8000", {"progress": ADAPTERS["progress"]})


def test_a_chat_template_that_changes_the_continuation_is_refused(fleet):
    fleet.template_extra = "<think></think>"
    with pytest.raises(ModelLoadError, match="chat template"):
        _engine(fleet, URLS, ADAPTERS)


def test_without_adapters_the_base_model_answers_everything(caplog):
    fake = FakeVllm({"127.0.0.1:8000": _base_server()})
    with caplog.at_level(logging.WARNING), _engine(fake, "http://127.0.0.1:8000", None) as engine:
        answers = engine.score(_queries())
    assert all(a.parsed for a in answers)
    assert {r["model"] for r in fake.chat_requests} == {"base"}
    assert any("not the released reward model" in r.getMessage() for r in caplog.records)


# --- faults -------------------------------------------------------------------------------------------


def test_http_errors_carry_the_server_message_logged_once_per_kind(fleet, caplog):
    with _engine(fleet, URLS, ADAPTERS) as engine:
        fleet.mode = "500"
        with caplog.at_level(logging.ERROR, logger="lrm_reward.core.vllm_client"):
            first, second = engine.score(_queries()), engine.score(_queries())
        assert all(
            a.error.startswith(ENGINE_ERROR_PREFIX) and "boom: engine dead" in a.error for a in first + second
        )
        assert engine.stats.server_faults["http_500"] == 6
        assert len([r for r in caplog.records if "http_500" in r.getMessage()]) == 1
        assert engine.health()[0] is True  # the server answered: not marked down
        fleet.mode = "garbage"
        assert "bad_response" in engine.score(_queries()[2:])[0].error


def test_a_server_that_stops_answering_fails_fast_then_is_used_again(fleet, monkeypatch):
    monkeypatch.setattr(vllm_client, "FIRST_RETRY_DELAY_S", 0.2)
    with _engine(fleet, URLS, ADAPTERS) as engine:
        for mode, kind in (("refuse", "unreachable"), ("timeout", "timeout")):
            fleet.mode = mode
            failed = engine.score(_queries())
            assert all(not a.parsed and a.error.startswith(ENGINE_ERROR_PREFIX) for a in failed)
            assert engine.stats.server_faults[kind] >= 1
            assert engine.health()[0] is False
            requests = len(fleet.chat_requests)
            again = engine.score(_queries())  # within the backoff: no request at all
            assert all("not answering" in a.error for a in again) and len(fleet.chat_requests) == requests
            fleet.mode = "ok"
            time.sleep(0.5)
            assert all(a.parsed for a in engine.score(_queries()))
        assert engine.stats.reconnects == 2 * 2  # both servers, both outages
        assert engine.stats.failed_fast >= 6


def test_every_call_ends_within_its_timeout(fleet):
    class Slow(FakeVllm):
        def complete(self, body):
            time.sleep(1.0)
            return super().complete(body)

    slow = Slow(fleet.servers)
    with _engine(slow, URLS, ADAPTERS, request_timeout_s=0.3) as engine:
        started = time.monotonic()
        answers = engine.score(_queries())
        assert time.monotonic() - started < 0.9
    assert all(not a.parsed and "timeout" in a.error for a in answers)


def test_an_engine_made_before_its_server_answers_errors_until_the_server_is_up(fleet, monkeypatch):
    monkeypatch.setattr(vllm_client, "FIRST_RETRY_DELAY_S", 0.2)
    fleet.mode = "refuse"
    with _engine(fleet, URLS, ADAPTERS, server_connect_s=0.3) as engine:  # server_required=False (default)
        assert engine.health()[0] is False
        started = time.monotonic()
        failed = engine.score(_queries())
        assert time.monotonic() - started < 0.5
        assert all(a.error.startswith(ENGINE_ERROR_PREFIX) and "not_connected" in a.error for a in failed)
        fleet.mode = "ok"
        answers = wait_for(lambda: engine.score(_queries()), lambda a: all(x.parsed for x in a), 5.0)
        assert all(a.parsed for a in answers)
        assert engine.health()[0] is True and "completion@http://127.0.0.1:8000" in engine.model_id


def wait_for(call, done, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    result = call()
    while not done(result) and time.monotonic() < deadline:
        time.sleep(0.1)
        result = call()
    return result
