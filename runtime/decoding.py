"""Decoding state shared by every mode, and the autoregressive baseline.

A mode is a generator: it reads `state.tokens` (every committed token), runs its models and
yields the tokens it commits next (one for `ar`, several for speculative modes). The engine
appends them, checks the stop conditions and either resumes or closes the generator. A model's
KV may hold any text (another conversation's, a discarded turn); a mode first feeds whatever its
models do not hold of `state.tokens` (`catch_up` compares token ids), so modes, turns, conversations
and rollbacks compose without special cases.

A mode reads two things besides the text: its user's settings (a frozen dataclass per mode, validated
when built, runtime/modes.py) and a `DecodeContext`, what the engine measured or read from the bundle.
The two never mix, so a misspelt setting is an error rather than an internal silently overridden.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgespec.runtime.model import ModelRunner
from edgespec.runtime.ngram import NgramModel
from edgespec.runtime.sampling import SamplingParams, apply_repetition_penalty, process_logits, sample


class ModeError(ValueError):
    """The decoding mode is unknown or needs a model this bundle does not have."""


# The most tokens a step proposes: its verify pass then holds at most MAX_PROPOSAL + 1 rows, every size of
# which the pass-size check tries (runtime/selfcheck.py), and adaptive sizing never goes near it on a CPU.
MAX_PROPOSAL = 31


def check_size(name: str, value: int | None, optional: bool = True, most: int = MAX_PROPOSAL) -> None:
    """A size setting: an integer from 0 to `most`, or (`optional`) None, which leaves the size to the mode."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value <= most:
        raise ValueError(f"{name} must be an integer from 0 to {most}{' (or None: adaptive)' if optional else ''}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class NoSettings:
    """This mode has no settings of its own."""


@dataclass(frozen=True)
class ArSettings:
    """model: "target" (default) or "draft", the model that decodes."""

    model: str = "target"

    def __post_init__(self) -> None:
        if self.model not in ("target", "draft"):
            raise ValueError(f"model must be 'target' or 'draft', got {self.model!r}")


@dataclass(frozen=True)
class DecodeContext:
    """What the engine hands a mode besides the user's settings: measured, or read from the bundle.

    Cost curves are seconds per pass by rows (runtime/costs.py); `prior_alpha` is the draft's agreement
    with the target measured at export (None: the sizing's own prior); `bundle_tau` is the EAD threshold
    `edgespec calibrate-ead` stored.
    """

    target_cost_curve: dict[int, float] | None = None
    draft_cost_curve: dict[int, float] | None = None
    ngram_model: NgramModel | None = None
    prior_alpha: float | None = None
    bundle_tau: float | None = None
    exact_passes: bool = True  # the target computes a row alike in passes of every size it runs (selfcheck.py)


@dataclass
class DecodeState:
    target: ModelRunner
    draft: ModelRunner | None
    tokens: list[int]
    params: SamplingParams
    rng: np.random.Generator
    settings: Any = field(default_factory=NoSettings)  # the mode's settings dataclass
    context: DecodeContext = field(default_factory=DecodeContext)
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
    if state.settings.model == "draft":
        if state.draft is None:
            raise ModeError('model="draft" needs a bundle with a draft model')
        target = state.draft
    yield from one_token_steps(state, target)


def one_token_steps(state: DecodeState, runner: ModelRunner) -> Iterator[list[int]]:
    """Feed what `runner` does not hold, then commit one token per pass."""
    t0 = time.perf_counter()
    fed = runner.stats.tokens
    logits = next_logits(runner, state.tokens)
    state.prefilled = runner.stats.tokens - fed
    state.stats["prefill_seconds"] = time.perf_counter() - t0
    while True:
        token = state.next_token(logits)
        yield [token]
        logits = runner.forward([token])[-1]
