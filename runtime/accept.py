"""Exact acceptance rules for speculative verification.

Both rules keep the output distributed exactly as sampling from the target p alone:
- `verify_chain_sampling` (Leviathan et al.): proposals sampled from a draft q; accept with
  min(1, p/q), resample the first rejection from norm(max(0, p − q)), bonus token if all pass.
- `verify_deterministic` for proposals chosen deterministically (argmax of a draft, n-gram or
  context lookup; EAGLE's rule with q = δ): accept x with probability P(x); on rejection set
  P(x) = 0, renormalise and sample from that residual. With greedy settings p is one-hot, so
  both reduce to "accept while the proposal equals the target's argmax".
"""

from __future__ import annotations

import numpy as np

from edgespec.runtime.sampling import sample


def verify_chain_sampling(proposal: np.ndarray, q: np.ndarray, p: np.ndarray,
                          rng: np.random.Generator) -> tuple[int, int]:
    """Leviathan's rule over a chain. q: [k, V] draft probs, p: [k+1, V] target probs; returns (n accepted, next)."""
    k = len(proposal)
    for i in range(k):
        x = int(proposal[i])
        if q[i, x] <= 0.0:
            raise ValueError("a proposed token has zero draft probability: it cannot have been sampled from q")
        if rng.random() < min(1.0, p[i, x] / q[i, x]):
            continue
        residual = np.maximum(p[i] - q[i], 0.0)
        total = residual.sum()
        return i, sample(residual / total if total > 0 else p[i], rng)
    return k, sample(p[k], rng)


def verify_deterministic(proposal: list[int], p: np.ndarray, rng: np.random.Generator | None,
                         greedy: bool) -> tuple[int, int]:
    """Accept deterministic proposals against target probs p [k+1, V]; returns (n accepted, next token)."""
    k = len(proposal)
    for i in range(k):
        x = proposal[i]
        if greedy:
            target = int(np.argmax(p[i]))
            if target == x:
                continue
            return i, target
        if rng.random() < p[i, x]:
            continue
        residual = p[i].copy()
        residual[x] = 0.0
        total = residual.sum()
        return i, sample(residual / total, rng) if total > 0 else x
    return k, int(np.argmax(p[k])) if greedy else sample(p[k], rng)
