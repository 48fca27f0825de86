"""The two ways of reading an answer from the model: scoring the closed answer set, or greedy decoding.

What this is for: one batch of same-adapter queries in, one Answer per query out.

- ``score_answer_sets`` (logits readout, our design, not the authors'): one forward pass over prompt + JSON
  answer prefix (left padded, so every row ends at the same column), then every allowed continuation
  ("0.0" .. "1.0", "ImageA"/"ImageB", "yes"/"no"; several tokens each) is scored in ONE extra pass from the
  KV cache of the shared prefix. Candidate tokens are laid out as a trie (shared prefixes once) and fed
  together with a tree attention mask, so the extra pass costs a handful of tokens per row, for all
  candidates and all rows at once. Returns the expectation, per-answer probabilities and a confidence.
- ``generate_answers`` (as the authors serve it): greedy decoding, then ``parsing.parse_answer``.

``score_answer_sets`` is the plain reference path; the engine normally takes the fast path
(``fast_readout.py``: per-episode prefix KV reuse, candidates scored inside the prompt's pass), which
reads its answers through the same ``answers_from_logits``.

What it is not: no adapter switching, no batching policy, no OOM handling (``engine.py`` does those).
Inputs here are already validated queries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from lrm_reward.core import parsing, prompts
from lrm_reward.core.types import Answer, Query


@dataclass(frozen=True)
class CandidateTrie:
    """How to score one modality's allowed answers from the logits after its answer prefix.

    Trie nodes are the proper, non-empty token prefixes of the candidates; node i is fed as one token and
    attends to the prompt and to its ancestors. Candidate c's log-probability is the sum over steps k of
    logprob[source[c, k], token[c, k]], where source 0 is the prefix's last position and source 1 + i is
    node i's output.
    """

    labels: tuple[str, ...]
    values: tuple[float, ...]
    node_tokens: tuple[int, ...]
    node_depth: tuple[int, ...]
    node_visible: tuple[tuple[bool, ...], ...]  # [i][j]: node i may attend to node j (ancestor or self)
    source: tuple[tuple[int, ...], ...]  # (C, L) padded with 0
    token: tuple[tuple[int, ...], ...]  # (C, L) padded with 0
    valid: tuple[tuple[bool, ...], ...]  # (C, L)


def build_candidate_trie(tokenizer, answer_prefix: str, answers: dict[str, float]) -> CandidateTrie:
    """Token paths of each allowed answer as it follows the answer prefix in context."""
    prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"]
    paths: list[tuple[int, ...]] = []
    for label in answers:
        joint = tokenizer(answer_prefix + label, add_special_tokens=False)["input_ids"]
        if joint[: len(prefix_ids)] == prefix_ids and len(joint) > len(prefix_ids):
            paths.append(tuple(joint[len(prefix_ids) :]))
        else:  # the label merged into the prefix's last token: score its own tokens instead
            paths.append(tuple(tokenizer(label, add_special_tokens=False)["input_ids"]))
    if len(set(paths)) != len(paths):
        raise ValueError(f"answers {list(answers)} do not tokenize to distinct token paths")

    nodes: dict[tuple[int, ...], int] = {}
    for path in paths:
        for k in range(1, len(path)):
            nodes.setdefault(path[:k], len(nodes))
    ordered = sorted(nodes, key=nodes.get)
    visible = tuple(
        tuple(ordered[i][: len(ordered[j])] == ordered[j] for j in range(len(ordered)))
        for i in range(len(ordered))
    )
    width = max(len(p) for p in paths)
    source, token, valid = [], [], []
    for path in paths:
        src = [0] + [1 + nodes[path[:k]] for k in range(1, len(path))]
        pad = width - len(path)
        source.append(tuple(src + [0] * pad))
        token.append(tuple(list(path) + [0] * pad))
        valid.append(tuple([True] * len(path) + [False] * pad))
    return CandidateTrie(
        labels=tuple(answers),
        values=tuple(answers.values()),
        node_tokens=tuple(p[-1] for p in ordered),
        node_depth=tuple(len(p) - 1 for p in ordered),
        node_visible=visible,
        source=tuple(source),
        token=tuple(token),
        valid=tuple(valid),
    )


def prompt_text(processor, query: Query, max_task_chars: int) -> str:
    """The chat-templated prompt (generation prompt included) for a validated query."""
    messages = prompts.build_messages(query.modality, query.task, len(query.images), max_task_chars)
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_batch(processor, texts: list[str], queries: list[Query], device):
    """Left-padded model inputs for a batch of prompt texts and their images (in query order)."""
    return encode_images(processor, texts, [image for query in queries for image in query.images], device)


def encode_images(processor, texts: list[str], images: list, device):
    """Left-padded model inputs for prompt texts and a flat list of their images (in text order)."""
    if not images:  # text-only prompts (e.g. a cached prompt prefix without images)
        inputs = processor(text=texts, padding=True, padding_side="left", return_tensors="pt")
        return inputs.to(device)
    # resizing/normalising on the model's device keeps the CPU out of the GPU's way
    inputs = processor(
        text=texts,
        images=images,
        padding=True,
        padding_side="left",
        return_tensors="pt",
        device=str(device),
    )
    return inputs.to(device)


def score_answer_sets(
    model, processor, queries: list[Query], trie: CandidateTrie, device, max_task_chars: int
) -> list[Answer]:
    """Logits readout for queries of one modality (and one adapter)."""
    import torch

    start = time.perf_counter()
    prefix = prompts.PROMPT_SPECS[queries[0].modality].answer_prefix
    texts = [prompt_text(processor, q, max_task_chars) + prefix for q in queries]
    inputs = encode_batch(processor, texts, queries, device)
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        node_logits = None
        if trie.node_tokens:
            node_logits = _score_trie_nodes(model, inputs["attention_mask"], out, trie, device)
        return answers_from_logits(out.logits[:, -1, :], node_logits, trie, queries, start)


def answers_from_logits(first_logits, node_logits, trie: CandidateTrie, queries: list[Query], start: float):
    """Answers from the logits after the answer prefix (B, V) and after each trie node (B, N, V) or None.

    Shared by the plain readout and the fast path (``fast_readout.py``), so both read answers the same way.
    start: perf_counter() when the batch began (for Answer.latency_s).
    """
    import torch

    modality = queries[0].modality
    prefix = prompts.PROMPT_SPECS[modality].answer_prefix
    with torch.inference_mode():
        sources = [torch.log_softmax(first_logits.float(), dim=-1).unsqueeze(1)]  # (B, 1, V)
        if node_logits is not None:
            sources.append(torch.log_softmax(node_logits.float(), dim=-1))  # (B, N, V)
        logprobs = torch.cat(sources, dim=1)  # (B, 1 + N, V)
        source = torch.tensor(trie.source, device=logprobs.device)
        token = torch.tensor(trie.token, device=logprobs.device)
        valid = torch.tensor(trie.valid, device=logprobs.device)
        steps = logprobs[:, source, token]  # (B, C, L)
        sequence = (steps * valid).sum(dim=-1)  # (B, C) log P(candidate | prompt, prefix)
        probs = torch.softmax(sequence, dim=-1).cpu()
        coverage = sequence.exp().sum(dim=-1).cpu()  # probability mass the model puts on the allowed set
    latency = time.perf_counter() - start

    values = torch.tensor(trie.values)
    answers = []
    for row in range(len(queries)):
        p = probs[row]
        best = int(p.argmax())
        expectation = float((p * values).sum())
        mass = float(coverage[row])
        answers.append(
            Answer(
                modality=modality,
                value=expectation if math.isfinite(expectation) else None,
                parsed=math.isfinite(expectation),
                confidence=float(p[best]),
                probabilities={label: float(p[i]) for i, label in enumerate(trie.labels)},
                raw_text=f"{prefix}{trie.labels[best]} [logits readout; allowed-set mass {mass:.3f}]",
                latency_s=latency,
                error=None if math.isfinite(expectation) else "non-finite logits",
            )
        )
    return answers


def _score_trie_nodes(model, prefix_mask, prefix_out, trie: CandidateTrie, device):
    """Feed the trie nodes after the cached prefix with a tree mask; return their logits (B, N, V)."""
    import torch

    batch, prefix_len = prefix_mask.shape
    n_nodes = len(trie.node_tokens)
    dtype = next(model.parameters()).dtype
    blocked = torch.finfo(dtype).min

    node_tokens = torch.tensor(trie.node_tokens, device=device).expand(batch, n_nodes)
    depth = torch.tensor(trie.node_depth, device=device)
    # M-RoPE: text after the prompt advances all three axes together from real length + rope delta.
    real_len = prefix_mask.sum(dim=1, keepdim=True)
    deltas = prefix_out.rope_deltas
    base = real_len + (deltas.to(device).view(batch, 1) if deltas is not None else 0)
    positions = (base + depth.view(1, n_nodes)).unsqueeze(0).expand(3, batch, n_nodes)

    visible_prefix = prefix_mask.bool().view(batch, 1, 1, prefix_len).expand(batch, 1, n_nodes, prefix_len)
    visible_nodes = torch.tensor(trie.node_visible, device=device).view(1, 1, n_nodes, n_nodes)
    visible = torch.cat([visible_prefix, visible_nodes.expand(batch, 1, n_nodes, n_nodes)], dim=-1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, blocked)

    with tree_mask_attention(model):
        out = model(
            input_ids=node_tokens,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=prefix_out.past_key_values,
            use_cache=True,
        )
    return out.logits  # (B, N, V)


class tree_mask_attention:
    """Run a block with an attention implementation that accepts custom 4D masks (eager or sdpa)."""

    def __init__(self, model):
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.previous = getattr(self.base.config, "_attn_implementation", None)

    def __enter__(self):
        if self.previous not in (None, "eager", "sdpa"):
            self.base.set_attn_implementation("sdpa")
        return self

    def __exit__(self, *exc_info):
        if self.previous not in (None, "eager", "sdpa"):
            self.base.set_attn_implementation(self.previous)
        return False


def generate_answers(
    model,
    processor,
    queries: list[Query],
    max_new_tokens: int,
    prefill_answer_prefix: bool,
    max_task_chars: int,
) -> list[Answer]:
    """Greedy decoding (left padded batch), then parsing; prefill starts the reply with the JSON prefix."""
    import torch

    start = time.perf_counter()
    modality = queries[0].modality
    prefix = prompts.PROMPT_SPECS[modality].answer_prefix if prefill_answer_prefix else ""
    texts = [prompt_text(processor, q, max_task_chars) + prefix for q in queries]
    inputs = encode_batch(processor, texts, queries, device=next(model.parameters()).device)
    tokenizer = processor.tokenizer
    with torch.inference_mode():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    latency = time.perf_counter() - start

    answers = []
    for query, text in zip(queries, decoded, strict=True):
        raw = prefix + text
        result = parsing.parse_answer(query.modality, raw)
        answers.append(
            Answer(
                modality=query.modality,
                value=result.value,
                parsed=result.parsed,
                raw_text=raw,
                latency_s=latency,
                error=None if result.parsed else f"unparsed model output: {result.error}",
            )
        )
    return answers
