"""Closed-set scoring over HTTP for the "vllm" engine backend: the same numbers as the local logits readout,
read from a vLLM server one token at a time.

Answers of several tokens ("0.5" is "0" "." "5") are scored level by level down the candidates' token trie:
one request per trie node whose children are needed, each continuing the assistant message with the node's
tokens, so it reuses the previous request's KV blocks from vLLM's prefix cache. A branch holding less than
``PRUNE_MASS`` of the probability found so far is not expanded (its candidates count as 0, an error below
1e-4 of the value range), and a step every remaining candidate shares is not asked (it cancels when the
candidates are normalised). Progress usually takes two requests: the prefix -> {"0", "1"}, then prefix +
"0." -> the ten digits.

Here: the plan of one modality on one server (``build_scoring_plan``, with the chat-template check it relies
on), one query's walk down the trie (``TrieWalk``) and the answer it gives. What it is not: beyond those
set-up checks it sends nothing (``vllm_rounds`` sends the scoring requests); no generate readout.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from lrm_reward.core import prompts
from lrm_reward.core.loading import ModelLoadError
from lrm_reward.core.types import Answer, Modality, Query
from lrm_reward.core.vllm_transport import ServerApi

PRUNE_MASS = 1e-4  # trie branches with less than this share of the probability found so far are not expanded


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


def build_scoring_plan(
    link: ServerApi, tokenizer_model: str, modality: Modality, timeout: float
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


def check_chat_continuation(link: ServerApi, model: str, timeout: float) -> None:
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


# --- one query down the trie --------------------------------------------------------------------------


@dataclass(eq=False)
class TrieWalk:
    """One query's way down its plan's answer trie: the nodes still to expand, with their log-probabilities,
    and the candidates scored so far."""

    plan: ScoringPlan
    frontier: list[tuple[tuple[int, ...], float]] = field(default_factory=lambda: [((), 0.0)])
    scores: dict[int, float] = field(default_factory=dict)  # candidate index -> log-probability
    mass_exact: bool = True  # False once a shared step was skipped (the allowed-set mass is then unknown)

    def next_requests(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """The trie nodes this walk must ask about next (each with the child tokens to read)."""
        plan = self.plan
        paths = plan.paths
        while True:
            # a step every remaining candidate shares cancels when normalising: skip it
            if len(self.frontier) == 1 and not self.scores:
                node, lp = self.frontier[0]
                children = plan.children(node)
                if len(children) == 1 and (*node, children[0]) not in paths:
                    self.frontier = [((*node, children[0]), lp)]
                    self.mass_exact = False
                    continue
            return [(node, plan.children(node)) for node, _ in self.frontier]

    def record(self, results: list) -> None:
        """One level's answers, (node, child token ids, {token id: logprob}) per request: score the candidates
        reached and set the next frontier."""
        plan = self.plan
        frontier = []
        for node, ids, logprobs in results:
            base = dict(self.frontier)[node]
            for token in ids:
                child = (*node, token)
                child_lp = base + logprobs[token]
                if child in plan.paths:
                    self.scores[plan.paths.index(child)] = child_lp
                if any(len(p) > len(child) and p[: len(child)] == child for p in plan.paths):
                    frontier.append((child, child_lp))
        if frontier:  # prune branches that cannot matter
            found = [math.exp(lp) for lp in self.scores.values()] + [math.exp(lp) for _, lp in frontier]
            total = sum(found)
            frontier = [(n, lp) for n, lp in frontier if total == 0 or math.exp(lp) >= PRUNE_MASS * total]
        self.frontier = frontier

    def answer(self, query: Query, started: float) -> Answer:
        """The answer once the frontier is empty: the candidates normalised over the allowed set."""
        plan = self.plan
        modality = query.modality
        logprobs = np.array([self.scores.get(i, -np.inf) for i in range(len(plan.paths))], dtype=np.float64)
        if not np.isfinite(logprobs.max()):
            return failed_answer(query, "non-finite logprobs from the server")
        weights = np.exp(logprobs - logprobs.max())
        probs = weights / weights.sum()
        best = int(probs.argmax())
        expectation = float((probs * np.array(plan.values)).sum())
        mass = f"{float(np.exp(logprobs).sum()):.3f}" if self.mass_exact else "n/a"
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


def failed_answer(query: Query, error: str) -> Answer:
    """An answer with no value, carrying error (a query whose modality is not one gets PROGRESS)."""
    try:
        modality = Modality(query.modality)
    except (ValueError, AttributeError):
        modality = Modality.PROGRESS
    return Answer(modality=modality, value=None, parsed=False, error=error)
