"""Training samples -> model batches: the order samples are drawn in, and prompt + answer + end token
encoded with the labels (the loss) on the answer tokens only.

What it is not: no sample building (``samples.py``: labels, frames, chat messages), no optimisation
(``train_modality``).
"""

from __future__ import annotations

import numpy as np

from lrm_reward.adaptation import samples as S
from lrm_reward.adaptation.train_errors import TrainingError
from lrm_reward.core.types import Modality


class SampleOrder:
    """Sample position p -> sample index: a fresh deterministic permutation per epoch (resumable by step)."""

    def __init__(self, n: int, seed: int, modality: Modality) -> None:
        self.n = n
        self.seed = seed
        self.salt = list(Modality).index(modality)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(first, first + count)]


class AnswerTokens:
    """Token ids of each answer text + end token (a handful of distinct answers: cached)."""

    def __init__(self, processor) -> None:
        self.tokenizer = processor.tokenizer
        self._cache: dict[str, list[int]] = {}

    def ids(self, answer: str) -> list[int]:
        if answer not in self._cache:
            self._cache[answer] = self.tokenizer(answer + S.END_TOKEN, add_special_tokens=False)["input_ids"]
        return self._cache[answer]


def encode_batch(processor, answer_tokens: AnswerTokens, batch: list[S.Sample], episodes, store):
    """Processor inputs for prompt + answer + end token, left padded, and labels on the answer tokens only."""
    import torch

    texts, images, answers = [], [], []
    for sample in batch:
        prompt = processor.apply_chat_template(
            S.chat_messages(sample), tokenize=False, add_generation_prompt=True
        )
        answers.append(answer_tokens.ids(sample.answer_text))
        texts.append(prompt + sample.answer_text + S.END_TOKEN)
        episode = episodes[sample.episode]
        images.extend(store.frame(episode, t) for t in sample.frames)
    inputs = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    ids = inputs["input_ids"]
    labels = torch.full_like(ids, -100)
    for row, answer in enumerate(answers):
        n = len(answer)
        if ids[row, -n:].tolist() != answer:
            # The answer must tokenize the same inside the full text, or the loss would sit on wrong tokens.
            raise TrainingError(
                "the answer tokens differ inside the full prompt (tokenizer merges across the prompt/answer "
                f"boundary) for {batch[row].answer_text!r}"
            )
        labels[row, -n:] = ids[row, -n:]
    return inputs, labels
