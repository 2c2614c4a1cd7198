"""mode="auto", the default: each step verifies whichever lossless proposal is expected to commit the most
tokens per unit of this machine's pass cost.

The candidates, weighed before every step from the acceptance measured so far in the generation and the
bundle's cost curves (never from live clocks, so a seeded generation repeats exactly):
- nothing proposed: a plain `ar` step;
- the n-gram drafter's proposal (context lookup and the bundle's trigram table), cut where its tokens'
  sources stop paying: an `ngram` step;
- the draft model's path, grown through n-gram guesses the draft confirms in tree passes: a `staged` step,
  or a `spec` step when no guess held and the draft advanced a token per pass.
The weighing is `staged`'s controller (runtime/staged.py `StagedStep`): the draft's path is taken only when
its expected value, the draft's passes and pending catch-up priced in, beats the n-gram proposal's. Without
a draft only the first two remain. Every step uses an exact acceptance rule, so greedy output is `ar`'s and
sampled output has the target's distribution.

Where the target cannot verify exactly on this machine (an `--ar-only` bundle, or a pass-size check that
found even two-row passes computing apart), every step is an `ar` step and the stats say why: `auto` never
trades exactness for speed behind the user's back.
"""

from __future__ import annotations

from collections.abc import Iterator

from edgespec.runtime.decoding import DecodeState, one_token_steps
from edgespec.runtime.speculative import prefill_target
from edgespec.runtime.staged import DirectNgram, StagedSettings, StagedStep, ngram_drafter
from edgespec.runtime.stats import SpecStats


def decode_auto(state: DecodeState) -> Iterator[list[int]]:
    if not state.context.exact_passes:
        state.stats["auto"] = {"steps_by_kind": {}, "why_ar": "the target cannot verify several tokens per pass "
                               "exactly on this machine (see the pass-size check), so every step is an ar step"}
        yield from _counted(state, one_token_steps(state, state.target))
    elif state.draft is None:
        yield from _ngram_steps(state)
    else:
        yield from _staged_steps(state)


def _counted(state: DecodeState, steps: Iterator[list[int]]) -> Iterator[list[int]]:
    kinds = state.stats["auto"]["steps_by_kind"]
    for chunk in steps:
        kinds["ar"] = kinds.get("ar", 0) + 1
        yield chunk


def _ngram_steps(state: DecodeState) -> Iterator[list[int]]:
    """No draft model: the n-gram proposal when it pays, else a one-token step."""
    stats = SpecStats.attach(state)
    direct = DirectNgram(state, stats, ngram_drafter(state))
    kinds: dict[str, int] = {}
    state.stats["auto"] = {"steps_by_kind": kinds}
    prefill_target(state, stats)
    try:
        while True:
            proposal = direct.propose(min(state.target.capacity, state.target.max_chunk) - 1)
            kind = "ngram" if proposal[0] else "ar"
            kinds[kind] = kinds.get(kind, 0) + 1
            yield direct.step(proposal)[0]
    finally:
        state.stats["speculative"]["ngram_sources"] = direct.sizing.summary()


def _staged_steps(state: DecodeState) -> Iterator[list[int]]:
    step = StagedStep(state, StagedSettings())
    prefill_target(state, step.stats)
    try:
        while True:
            yield step()[0]
    finally:
        step.publish()
        state.stats["auto"] = {"steps_by_kind": state.stats["staged"]["steps_by_kind"]}
