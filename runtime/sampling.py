"""Sampling settings and the logits → distribution transform shared by every decoding mode.

Speculative acceptance is exact only if the draft's q and the target's p come from the same
transform (Leviathan et al. "standardise" every sampling method into a distribution), so all
modes call `process_logits` here rather than each doing its own top-k/top-p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


class SamplingError(ValueError):
    """An invalid sampling setting (negative temperature, top_p outside (0, 1], ...)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy, as in the OpenAI API
    top_k: int = 0  # 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _stops(self.stop))  # frozen: a list given by a caller becomes a tuple
        temperature, top_p, penalty = (_real(name, getattr(self, name))
                                       for name in ("temperature", "top_p", "repetition_penalty"))
        if not np.isfinite(temperature) or temperature < 0:
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int | np.integer) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (0.0 < top_p <= 1.0):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not np.isfinite(penalty) or penalty <= 0:
            raise SamplingError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int | np.integer)
                                      or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0 (or None), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that float32, the logits' precision, holds it as 0: sampling at a
        temperature approaching 0 approaches the argmax, and dividing by a float32 zero gave NaN rows that
        always drew the last vocabulary id."""
        return np.float32(self.temperature) == 0.0


def _real(name: str, value: object) -> float:
    """A setting that must be a real number: a str, None or bool is named here, not failing inside numpy."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise SamplingError(f"{name} must be a number, got {value!r}")
    return float(value)


def _stops(stop: object) -> tuple[str, ...]:
    """Stop strings as a tuple: one string, a list or tuple of them, or None for none."""
    stops = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise SamplingError(f"stop must be a string or a list of strings, got {stop!r}")
    return tuple(stops)


def apply_repetition_penalty(logits: np.ndarray, previous: Sequence[int] | np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty (as transformers): divide positive logits of seen tokens, multiply negative ones.

    `previous` may be a plain list: without a penalty (the default) it is never converted, which
    saves an array of the whole context per decoded token.
    """
    if penalty == 1.0 or len(previous) == 0:
        return logits
    out = logits.astype(np.float64, copy=True)
    seen = np.unique(previous)
    vals = out[..., seen]
    out[..., seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def process_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Logits [..., V] → probabilities [..., V] (float32) after temperature, top-k and top-p.

    Greedy becomes a one-hot on the argmax, which makes the speculative rules reduce to
    "accept while the draft equals the target's argmax". float32 as the graphs' logits are: float64 rows of a
    49k vocabulary made a verification cost a noticeable share of a target pass; every mode draws from the
    same rows, so the modes' distributions stay identical.
    """
    if params.greedy:  # the argmax of the logits as given: no float64 copy of [rows, vocab]
        probs = np.zeros(np.shape(logits))
        np.put_along_axis(probs, np.asarray(logits).argmax(-1)[..., None], 1.0, axis=-1)
        return probs
    scaled = np.asarray(logits, dtype=np.float32)
    scaled = scaled - scaled.max(-1, keepdims=True)  # before dividing: logits / 1e-38 would overflow to inf - inf
    with np.errstate(over="ignore"):  # a tiny temperature sends the gaps to -inf, probability 0
        scaled /= np.float32(params.temperature)
    if params.top_k and params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[..., -params.top_k][..., None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled, out=scaled)
    probs /= probs.sum(-1, keepdims=True)
    if params.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        cum = np.cumsum(sorted_p, -1)
        keep_sorted = (cum - sorted_p) < params.top_p  # keep the smallest prefix reaching top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token from a 1-D distribution by inverse CDF (one uniform per draw, reproducible)."""
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def entropy_bits(logits: np.ndarray) -> float:
    """Shannon entropy in bits of softmax(logits), before any temperature (EAD's switching signal)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())
