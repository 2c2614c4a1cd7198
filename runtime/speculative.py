"""Chain speculative decoding (`spec`): the draft proposes k tokens, the target checks them in one pass.

Both models keep their own fixed-size KV buffer; a rejection rolls each back by moving its
write index. With greedy settings the accepted prefix is exactly what the target would have
produced alone; with sampling, Leviathan's rule keeps the target's distribution exactly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgespec.runtime.accept import verify_chain_sampling, verify_deterministic
from edgespec.runtime.decoding import DecodeState, ModeError, catch_up, check_size
from edgespec.runtime.sampling import apply_repetition_penalty, process_logits, sample
from edgespec.runtime.stats import SpecStats


@dataclass(frozen=True)
class SpecSettings:
    """k: draft tokens per step (default: chosen each step from measured acceptance and pass costs)."""

    k: int | None = None

    def __post_init__(self) -> None:
        check_size("k", self.k)


def require_draft(state: DecodeState, mode: str):
    if state.draft is None:
        raise ModeError(f'mode="{mode}" needs a bundle with a draft model; this bundle has none. '
                        f'Use mode="ngram" (model-free speculation) or export with --draft / --derive-draft')
    return state.draft


def distributions(state: DecodeState, logits: np.ndarray, tails: list[list[int]]) -> np.ndarray:
    """Per-row probabilities after repetition penalty (row i's context: the committed tokens plus
    `tails[i]`) and sampling settings. Contexts are only built when a penalty needs them: copying the
    whole context per row cost more than the verification itself.

    Greedy returns the (penalised) logits themselves: every greedy rule only reads a row's argmax,
    which they share with the one-hot distribution (building that one-hot took ~75 us per step under cProfile).
    """
    if state.params.repetition_penalty != 1.0:
        logits = np.stack([apply_repetition_penalty(row, state.tokens + tail, state.params.repetition_penalty)
                           for row, tail in zip(logits, tails, strict=True)])
    if state.params.greedy:
        return logits
    return process_logits(logits, state.params)


class RowDistributions:
    """`distributions` row by row, each row computed when first read (`rows[i]` or `rows[i, token]`): the
    acceptance rules read rows only up to the first rejection and a tree walk only the nodes it visits, while
    with sampling every row of a 49k vocabulary is normalized and a verification or stage-2 tree holds up
    to 15 rows."""

    def __init__(self, state: DecodeState, logits: np.ndarray, tails: list[list[int]]):
        self.state, self.logits, self.tails = state, logits, tails
        self.rows: dict[int, np.ndarray] = {}

    def __getitem__(self, key: int | tuple[int, int]):
        i, *rest = key if isinstance(key, tuple) else (key,)
        row = self.rows.get(i)
        if row is None:
            row = self.rows[i] = distributions(self.state, self.logits[i:i + 1], [self.tails[i]])[0]
        return row[rest[0]] if rest else row


def chain_step(state: DecodeState, stats: SpecStats) -> list[int]:
    """One draft-then-verify step; returns the committed tokens.

    On entry both models hold (a prefix of) `state.tokens` without its last token; on return the
    target holds the committed prefix and the draft at most that, so the next step can start.
    """
    target, draft = state.target, state.draft
    tokens = state.tokens
    catch_up(target, tokens, keep_last=1)
    k_fixed = state.settings.k
    k = int(k_fixed) if k_fixed is not None else stats.choose_k(target.capacity - 1, *_pass_seconds(state))
    k = max(0, min(k, target.capacity - 1, target.max_chunk - 1, draft.capacity - 1))
    t_draft = time.perf_counter()
    if k:  # with nothing to draft the draft stays behind and catches up in one pass later
        catch_up(draft, tokens, keep_last=1)
    proposal, q_rows = [], []
    feed = tokens[-1]
    for _ in range(k):
        logits = draft.forward([feed])[-1]
        q = distributions(state, logits[None], [proposal])[0]
        feed = int(np.argmax(q)) if state.params.greedy else sample(q, state.rng)
        proposal.append(feed)
        q_rows.append(q)
    stats.add_time("draft", time.perf_counter() - t_draft)
    n, nxt, _, _ = verify(state, stats, proposal, q_rows, sampled=not state.params.greedy)
    draft.rollback(min(draft.length, target.length))
    return proposal[:n] + [nxt]


def verify(state: DecodeState, stats: SpecStats, proposal: list[int], q: list[np.ndarray] | None = None,
           sampled: bool = False) -> tuple[int, int, RowDistributions, np.ndarray]:
    """The one verification every speculative mode runs: a target pass over the pending token plus `proposal`,
    the exact acceptance rule (runtime/accept.py), and the target rolled back to the accepted prefix plus one.

    `sampled`: the proposal was drawn from the draft distributions `q` (Leviathan's rule); otherwise it was
    chosen deterministically (a draft's argmax, n-gram or context lookup: the deterministic-proposal rule, which
    needs no q). Returns (tokens accepted, the token after them, the target's rows, its logits)."""
    target, tokens = state.target, state.tokens
    t0 = time.perf_counter()
    start = target.length
    logits = target.forward([tokens[-1]] + proposal)
    p = RowDistributions(state, logits, [proposal[:i] for i in range(len(proposal) + 1)])
    if sampled and proposal:  # an empty proposal (nothing to draft) is an ar step
        n, nxt = verify_chain_sampling(np.asarray(proposal, np.int64), np.asarray(q).reshape(len(proposal), -1),
                                       p, state.rng)
    else:
        n, nxt = verify_deterministic(proposal, p, state.rng, state.params.greedy)
    target.rollback(start + 1 + n)
    stats.add_time("verify", time.perf_counter() - t0)
    stats.record_step(drafted=len(proposal), accepted=n, target_tokens=len(proposal) + 1)
    return n, nxt, p, logits


def _pass_seconds(state: DecodeState) -> tuple[float | None, float | None]:
    """One-token pass seconds of the draft and the target, from the cached cost curves (deterministic)."""
    draft, target = state.context.draft_cost_curve, state.context.target_cost_curve
    return (draft[1] if draft else None), (target[1] if target else None)


def prefill_target(state: DecodeState, stats: SpecStats) -> None:
    """Feed the target what it does not hold of the committed text but the last token, which the first
    verify pass feeds (counted as prefilled)."""
    t0 = time.perf_counter()
    fed = state.target.stats.tokens
    catch_up(state.target, state.tokens, keep_last=1)
    state.prefilled = state.target.stats.tokens - fed + 1
    stats.add_time("prefill", time.perf_counter() - t0)


def decode_spec(state: DecodeState) -> Iterator[list[int]]:
    require_draft(state, "spec")
    stats = SpecStats.attach(state)
    prefill_target(state, stats)
    while True:
        yield chain_step(state, stats)
