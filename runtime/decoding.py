"""Decoding state shared by every mode, and the autoregressive baseline.

A mode is a generator: it reads `state.tokens` (every committed token), runs its models and
yields the tokens it commits next (one for `ar`, several for speculative modes). The engine
appends them, checks the stop conditions and either resumes or closes the generator. A model's
KV may hold any text (another conversation's, a discarded turn); a mode first feeds whatever its
models do not hold of `state.tokens` (`catch_up` compares token ids), so modes, turns, conversations
and rollbacks compose without special cases.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from edgespec.runtime.model import ModelRunner
from edgespec.runtime.sampling import SamplingParams, apply_repetition_penalty, process_logits, sample


@dataclass
class DecodeState:
    target: ModelRunner
    draft: ModelRunner | None
    tokens: list[int]
    params: SamplingParams
    rng: np.random.Generator
    options: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    prefilled: int = 0  # tokens fed to the target to catch up before the first new token
    end: int = 0  # committed length at which decoding stops (prompt + max_new_tokens, at most the context)

    @property
    def remaining(self) -> int:
        """Tokens still to come at most: what a one-off cost (a draft's catch-up) can be spread over."""
        return max(1, self.end - len(self.tokens))

    def next_token(self, logits: np.ndarray, context: list[int] | None = None) -> int:
        """Choose one token from target logits with the sampling settings (greedy: argmax)."""
        logits = apply_repetition_penalty(logits, context if context is not None else self.tokens,
                                          self.params.repetition_penalty)
        if self.params.greedy:
            return int(logits.argmax())
        return sample(process_logits(logits, self.params), self.rng)


def catch_up(runner: ModelRunner, tokens: list[int], keep_last: int = 0) -> np.ndarray | None:
    """Feed the tokens `runner` has not seen, leaving the last `keep_last` unfed; returns the last logits
    (None when there was nothing to feed).

    The buffer may hold another conversation's text, or this one's discarded turn: it is compared with
    `tokens` id by id and rolled back to the first difference, so only what it holds of this text is reused.
    """
    end = len(tokens) - keep_last
    common = min(runner.common_prefix(tokens), end)
    if runner.length > common:
        runner.rollback(common)
    if common == end:
        return None
    return runner.prefill(tokens[common:end])


def next_logits(runner: ModelRunner, tokens: list[int]) -> np.ndarray:
    """The runner's logits for the token after `tokens`, feeding what it has not seen; when it holds them
    all, the last one is fed again (a buffer keeps K/V, not logits)."""
    if runner.common_prefix(tokens) >= len(tokens):
        runner.rollback(len(tokens) - 1)
    return catch_up(runner, tokens)


def decode_ar(state: DecodeState) -> Iterator[list[int]]:
    """Plain autoregressive decoding: one pass per token (the baseline). `model="draft"` decodes with the draft."""
    target = state.target
    if state.options.get("model", "target") == "draft":
        if state.draft is None:
            raise ValueError('model="draft" needs a bundle with a draft model')
        target = state.draft
    elif state.options.get("model", "target") != "target":
        raise ValueError(f"model must be 'target' or 'draft', got {state.options['model']!r}")
    t0 = time.perf_counter()
    fed = target.stats.tokens
    logits = next_logits(target, state.tokens)
    state.prefilled = target.stats.tokens - fed
    state.stats["prefill_seconds"] = time.perf_counter() - t0
    while True:
        token = state.next_token(logits)
        yield [token]
        logits = target.forward([token])[-1]
