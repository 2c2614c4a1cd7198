"""Entropy-adaptive decoding (EAD, Simonds 2025): switch between the small and large model by entropy.

LOSSY BY DESIGN: tokens produced while the small model is active are the small model's, not the
large model's, so the output differs from the large model's own decoding. τ trades quality for
cost; `edgespec calibrate-ead` picks it from a quality target.

The small model is the bundle's draft, the large one its target. Each keeps its fixed-size KV
buffer; a model that becomes active first catches up on the tokens it has not seen in one
chunked pass. Entropy is in bits, of the active model's distribution before temperature;
its rolling mean over `window` tokens is compared with τ, and after a switch the new model
keeps control for at least `min_span` tokens.

The token at a switch is written by the large model either way: switching up, the large model
catches up and writes it (the small one was unsure of it); switching down, the large model's
distribution for it is already computed, so the small model takes over from the next token.
Handing that token to the small model instead cost a pass and quality for nothing: with window 1
the small model wrote tokens the large one had been sure of, at its own entropy of 1–5 bits, and
the large model's NLL of the text rose to 3.5–4.4x its own (docs/benchmarks.md, section ead).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Real

import numpy as np

from edgespec.runtime.decoding import DecodeState, check_size, next_logits
from edgespec.runtime.sampling import entropy_bits
from edgespec.runtime.speculative import require_draft
from edgespec.runtime.staged import StagedSettings, StagedStep

DEFAULT_TAU = 2.5


@dataclass(frozen=True)
class EadSettings:
    """tau: the entropy threshold in bits (default: the bundle's calibrated one, else 2.5); window: tokens
    in the rolling mean of entropy; min_span: tokens a model keeps control for after a switch."""

    tau: float | None = None
    window: int = 5
    min_span: int = 10

    def __post_init__(self) -> None:
        if self.tau is not None and (isinstance(self.tau, bool) or not isinstance(self.tau, Real)
                                     or math.isnan(self.tau)):
            raise ValueError(f"tau must be a number of bits, got {self.tau!r}")
        check_size("min_span", self.min_span, optional=False, most=1 << 30)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")


@dataclass(frozen=True)
class EadSpecSettings(EadSettings, StagedSettings):
    """`ead`'s settings, and `staged`'s for the large model's stretches."""

    def __post_init__(self) -> None:
        EadSettings.__post_init__(self)
        StagedSettings.__post_init__(self)


class EadController:
    """The switching rule and its log, independent of how each model produces tokens."""

    def __init__(self, tau: float, window: int, min_span: int, stats: dict, params_ratio: float):
        self.tau, self.min_span = tau, min_span
        self.entropies: deque[float] = deque(maxlen=window)
        self.active = "small"
        self.since_switch = min_span  # the first token may already switch
        self.out = stats
        self.params_ratio = params_ratio
        self.counts = {"small": 0, "large": 0}
        self.switches: list[dict] = []
        self.catch_up_tokens = 0
        self.catch_up_passes = 0
        self.first_feed = True

    @property
    def mean_entropy(self) -> float:
        return sum(self.entropies) / len(self.entropies)

    def observe(self, entropy: float) -> None:
        self.entropies.append(entropy)

    def decide(self, position: int) -> bool:
        """Apply the switching rule after the latest entropy; True when the active model changed."""
        if self.since_switch < self.min_span:
            return False
        mean = self.mean_entropy
        target = "large" if mean >= self.tau else "small"
        if target == self.active:
            return False
        self.active = target
        self.since_switch = 0
        self.switches.append({"position": position, "to": target, "mean_entropy": round(mean, 4)})
        return True

    def produced(self, n: int, by: str | None = None) -> None:
        """`n` tokens written by `by` (the active model when not given); the active one's span grows."""
        by = by or self.active
        self.counts[by] += n
        if by == self.active:
            self.since_switch += n
        self.publish()

    def publish(self) -> None:
        total = sum(self.counts.values())
        large_share = self.counts["large"] / total if total else 0.0
        self.out["ead"] = {
            "tau": self.tau, "tokens_small": self.counts["small"], "tokens_large": self.counts["large"],
            "small_share": self.counts["small"] / total if total else 0.0,
            "large_share": large_share, "switches": len(self.switches), "switch_log": list(self.switches),
            "catch_up_tokens": self.catch_up_tokens, "catch_up_passes": self.catch_up_passes,
            "cost_estimate": large_share + (1 - large_share) * self.params_ratio,
        }


def add_ar_ratio(stats: dict, decode_seconds: float | None, tokens: int, target_curve: dict[int, float] | None) -> None:
    """Wall-clock ratio of this run's decode phase to the large model's `ar` for as many tokens.

    `ar` is not re-run here: its time is `tokens` × the large model's one-token pass, measured on
    this machine (the bundle's cached cost curve), so the ratio leaves out `ar`'s per-token Python
    overhead and is an estimate (below 1: faster than `ar`). bench/bench_ead.py measures the
    ratio side by side.
    """
    if "ead" not in stats or not target_curve or not decode_seconds or tokens < 1:
        return
    ar_seconds = tokens * target_curve[min(target_curve)]
    stats["ead"]["ar_decode_seconds_estimate"] = ar_seconds
    stats["ead"]["wall_clock_ratio_to_ar"] = decode_seconds / ar_seconds


def _controller(state: DecodeState) -> EadController:
    small = require_draft(state, "ead")
    settings = state.settings
    ratio = small.info.spec.get("param_count", 1) / max(state.target.info.spec.get("param_count", 1), 1)
    tau = next(t for t in (settings.tau, state.context.bundle_tau, DEFAULT_TAU) if t is not None)
    return EadController(float(tau), settings.window, settings.min_span, state.stats, ratio)


def _catch_up_counted(ctl: EadController, state: DecodeState, runner, tokens: list[int]) -> np.ndarray:
    """Logits for the next token from `runner`, feeding what it has not seen in one chunked pass.

    The very first feed is the prompt's prefill; later feeds of more than the newest token are
    the catch-up a switch costs.
    """
    before = runner.stats.tokens
    logits = next_logits(runner, tokens)
    fed = runner.stats.tokens - before
    if ctl.first_feed:
        ctl.first_feed = False
        state.prefilled = fed
    elif fed > 1:
        ctl.catch_up_tokens += fed
        ctl.catch_up_passes += 1
    return logits


def decode_ead(state: DecodeState) -> Iterator[list[int]]:
    ctl = _controller(state)
    runners = {"small": state.draft, "large": state.target}
    while True:
        tokens = state.tokens
        writer = ctl.active
        logits = _catch_up_counted(ctl, state, runners[writer], tokens)
        ctl.observe(entropy_bits(logits))
        if ctl.decide(len(tokens)) and ctl.active == "large":
            writer = "large"
            logits = _catch_up_counted(ctl, state, runners[writer], tokens)
        token = state.next_token(logits)
        ctl.produced(1, writer)
        yield [token]


def decode_ead_spec(state: DecodeState) -> Iterator[list[int]]:
    """EAD where the large model's stretches run as staged speculative steps.

    Low-entropy stretches: the small model alone, as in EAD. High-entropy stretches: instead of
    the large model decoding token by token, staged steps (runtime/staged.py): the small model
    drafts, n-gram-drafted itself, and the large model verifies, so those stretches are exactly the
    large model's output at a fraction of its passes. Where the small model's measured acceptance
    cannot pay for its passes, a step verifies the n-gram proposal alone, so the large model's
    stretches are never slower than its own decoding by more than a proposal's rejected rows.
    """
    ctl = _controller(state)
    staged = StagedStep(state)
    small, large = state.draft, state.target
    try:
        while True:
            tokens = state.tokens
            if ctl.active == "small":
                logits = _catch_up_counted(ctl, state, small, tokens)
                ctl.observe(entropy_bits(logits))
                if not ctl.decide(len(tokens)):
                    token = state.next_token(logits)
                    ctl.produced(1)
                    yield [token]
                    continue
            before = min(large.common_prefix(tokens), len(tokens) - 1)
            emitted, target_logits = staged()
            caught_up = large.length - before - len(emitted)
            if caught_up > 0:
                ctl.catch_up_tokens += caught_up
                ctl.catch_up_passes += 1
            for row in target_logits[:len(emitted)]:
                ctl.observe(entropy_bits(row))
            ctl.produced(len(emitted))
            ctl.decide(len(tokens) + len(emitted))
            yield emitted
    finally:  # the engine closes the generator before it reads the stats
        staged.publish()
