"""Staged speculative decoding (Spector & Ré) and model-free `ngram` speculation.

`staged`: stage 2 — the n-gram drafter (context lookup + trigram table) proposes a small tree
that the draft model checks in ONE tree-masked pass, keeping the rows of the path it agrees
with (a gather of KV rows, no re-run), so the draft advances several tokens per pass; stage 1 —
the target verifies the draft's path in one pass.

Why the target verifies the draft's best path and not a wider tree: on CPU the verify cost grows
steeply with rows for int4 (runtime/costs.py measures it), and, measured on our graphs, rows of a tree's side
branches do not reproduce the target's chain logits bit for bit (0.5-0.6 logits apart with int4
accuracy-level-4 kernels, see docs/speculative.md), so accepting from them would break the
guarantee that greedy output equals `ar`. Path rows are bitwise equal to a plain pass.

Every rule is exact: greedy accepts while the proposal equals the target's argmax. With sampling the
draft's path is either its argmax at each node, checked by the deterministic-proposal rule of
runtime/accept.py (accepted with probability p(x)), or drawn from the draft (at each tree node a token is
sampled from q and the walk goes on only if it is a child already computed), checked by Leviathan's rule
(accepted with probability sum min(p, q)); `ProposalRule` picks between them. N-gram proposals verified
directly use the deterministic rule, which needs no draft probabilities.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgespec.runtime.costs import interpolate
from edgespec.runtime.decoding import DecodeState, catch_up, check_size
from edgespec.runtime.ngram import ContextLookup, NgramDrafter
from edgespec.runtime.ngram_sizing import SourceAcceptance
from edgespec.runtime.sampling import sample
from edgespec.runtime.speculative import RowDistributions, prefill_target, require_draft, verify
from edgespec.runtime.stats import SpecStats, expected_tokens
from edgespec.runtime.tree import DraftTree


@dataclass(frozen=True)
class NgramSettings:
    """k: tokens proposed per step (default: the proposal is cut where its tokens' sources stop paying)."""

    k: int | None = None

    def __post_init__(self) -> None:
        check_size("k", self.k)


@dataclass(frozen=True)
class StagedSettings:
    """depth: the draft's path tokens per step (default: chosen each step; 0: n-gram proposals only);
    path_rule: with sampling, the path is the draft's "argmax", a "sample" from it, or ("auto") whichever the
    target has accepted more of; ngram_width: n-gram alternatives beside the first guess in a draft tree."""

    depth: int | None = None
    path_rule: str = "auto"
    ngram_width: int = 2

    def __post_init__(self) -> None:
        check_size("depth", self.depth)
        check_size("ngram_width", self.ngram_width, optional=False, most=16)
        if self.path_rule not in ("auto", "argmax", "sample"):
            raise ValueError(f"path_rule must be 'auto', 'argmax' or 'sample', got {self.path_rule!r}")


def ngram_drafter(state: DecodeState) -> NgramDrafter:
    """The n-gram drafter over the committed text and the bundle's trigram table."""
    return NgramDrafter(ContextLookup(state.tokens), state.context.ngram_model)


def _verify(state: DecodeState, stats: SpecStats, proposal: list[int], q: list[np.ndarray] | None = None,
            rule: ProposalRule | None = None) -> tuple[list[int], np.ndarray]:
    """`verify` (runtime/speculative.py), telling the path rule how each verified position fared; returns the
    accepted prefix plus one more token, and the target's logits for each of them."""
    n, nxt, p, logits = verify(state, stats, proposal, q, sampled=rule is not None and rule.sampled)
    if rule is not None:
        rule.record(p, q, min(n + 1, len(proposal)))
    return proposal[:n] + [nxt], logits[:n + 1]


def decode_ngram(state: DecodeState) -> Iterator[list[int]]:
    """Model-free speculation: the n-gram drafter proposes straight to the target."""
    stats = SpecStats.attach(state)
    direct = DirectNgram(state, stats, ngram_drafter(state), state.settings.k)
    prefill_target(state, stats)
    try:
        while True:
            limit = min(state.target.capacity, state.target.max_chunk) - 1
            yield direct.step(direct.propose(limit))[0]
    finally:
        state.stats["speculative"]["ngram_sources"] = direct.sizing.summary()


class DirectNgram:
    """The n-gram proposal verified by the target straight away, cut to the length its sources pay for
    (runtime/ngram_sizing.py); a `fixed` size proposes up to that many tokens uncut, for experiments."""

    def __init__(self, state: DecodeState, stats: SpecStats, drafter: NgramDrafter, fixed: int | None = None):
        self.state, self.stats, self.drafter = state, stats, drafter
        self.sizing = SourceAcceptance()
        self.fixed = fixed

    def propose(self, limit: int) -> tuple[list[int], list[str], float]:
        """Tokens, their sources, and the expected tokens per unit of target cost of verifying them."""
        t0 = time.perf_counter()
        if self.fixed is not None:
            tokens, sources = self.drafter.propose_sourced([], max(0, min(int(self.fixed), limit)))
            value = 0.0
        else:
            tokens, sources = self.drafter.propose_sourced([], max(0, min(self.stats.k_max, limit)))
            k, value = self.sizing.best_length(sources, self.stats.verify_cost)
            tokens, sources = tokens[:k], sources[:k]
        self.stats.add_time("draft", time.perf_counter() - t0)
        return tokens, sources, value

    def step(self, proposal: tuple[list[int], list[str], float]) -> tuple[list[int], np.ndarray]:
        tokens, sources, _ = proposal
        emitted = _verify(self.state, self.stats, tokens)
        self.sizing.record(sources, len(emitted[0]) - 1)
        return emitted


class ProposalRule:
    """Sampling only: whether the draft's path is its argmax or a sample from it. A peaked draft's argmax
    often matches where the target's mass is (p(x) high), while a spread-out pair of distributions agrees
    more in sum min(p, q) (w8a8 pair, T=0.8, 8 prompts: tokens accepted per path step 0.40 with the argmax
    against 0.50 sampled on HumanEval, 0.30 against 0.33 on prose). Both acceptances are known exactly at
    every verified position, whichever rule ran, so the path follows the better running sum. The choice
    reads past steps only, so each step stays exact."""

    def __init__(self, fixed: str = "auto"):
        self.fixed = None if fixed == "auto" else fixed
        self.argmax = self.drawn = 0.0

    @property
    def sampled(self) -> bool:
        if self.fixed is not None:
            return self.fixed == "sample"
        return self.drawn > self.argmax

    def record(self, p: np.ndarray, q: list[np.ndarray], positions: int) -> None:
        """Positions 0..positions-1 of a verified path: the target's p and the draft's q share their context."""
        for i in range(positions):
            self.argmax += float(p[i, int(np.argmax(q[i]))])
            self.drawn += float(np.minimum(p[i], q[i]).sum())


class StagedDrafter:
    """Stage 2: grow the draft model's path, several tokens per draft pass."""

    def __init__(self, state: DecodeState, stats: SpecStats, drafter: NgramDrafter, width: int):
        self.state, self.stats, self.drafter = state, stats, drafter
        self.width = width
        self.ngram_proposed = self.ngram_accepted = 0
        self.curve = state.context.draft_cost_curve
        self.tree_seconds = 0.0  # the draft's tree passes so far, priced by its cost curve
        self.catch_up_seconds = 0.0  # its catch-up passes, priced the same way

    def lag(self) -> int:
        """Committed tokens the draft has not seen (the pending one aside)."""
        tokens = self.state.tokens
        return len(tokens) - 1 - min(self.state.draft.common_prefix(tokens), len(tokens) - 1)

    def lag_split(self, tree_rows: int) -> tuple[int, int]:
        """The pending catch-up as (tokens fed in chunks of their own, tokens riding along the first tree pass).

        The draft graph takes a tree mask, so the tokens it missed during direct steps and its first tree
        share one pass: a switch from direct steps to a path costs one draft pass, not two (the draft made
        1.6 passes per path token on w8a8 HumanEval, one path token per step, when they were apart)."""
        lag = self.lag()
        along = min(lag, max(0, self.state.draft.max_chunk - tree_rows))
        return lag - along, along

    def catch_up_price(self, tree_rows: int | None = None) -> float:
        """Seconds the draft's pending catch-up adds, by its cost curve: chunks of their own as `prefill`
        feeds them, plus what the tokens riding along add to a first tree pass of `tree_rows` (a typical one
        when not given)."""
        if not self.curve:
            return 0.0
        tree_rows = tree_rows or 2 + self.width  # root, one n-gram guess, the side branches
        own, along = self.lag_split(tree_rows)
        chunk = self.state.draft.max_chunk
        alone = sum(interpolate(self.curve, min(chunk, own - start)) for start in range(0, own, chunk))
        return alone + interpolate(self.curve, along + tree_rows) - interpolate(self.curve, tree_rows)

    def room(self, lagging: int) -> int:
        """Tree rows the draft's next pass can hold beside `lagging` catch-up rows: at most its largest pass, and
        one free slot short of its buffer (a one-row pass writes a padding row's K/V too), so that near the end
        of the context the tree shrinks instead of the pass overflowing (which ended generation early)."""
        draft = self.state.draft
        return min(draft.capacity - 1, draft.max_chunk) - lagging

    def tree(self, pending: int, path: list[int], want: int, rows: int) -> tuple[DraftTree, list[int], list[int]]:
        """A draft tree of at most `rows` nodes rooted at `pending`: up to `want` chained n-gram guesses after
        `path` and side branches beside the first; returns it with the guesses and their nodes."""
        guess = self.drafter.propose(path, max(0, min(want, rows - 1 - self.width)))
        tree = DraftTree.rooted(pending)
        chain = tree.add_chain(0, guess)
        side = min(self.width, rows - len(tree.tokens))
        for alt in self.drafter.alternatives(path, guess[0] if guess else None, side):
            tree.add(0, alt)
        return tree, guess, chain

    def path(self, depth: int, sampled: bool = False, reach: int = 0) -> tuple[list[int], list[np.ndarray]]:
        """The draft's continuation of `state.tokens` (draft KV kept in step): its argmax, or drawn from it if
        `sampled`; with sampling settings also the draft's distribution at each token.

        Draft passes run until the path holds `depth` tokens; n-gram guesses may reach further, up to `reach`
        tokens in all: where the draft agrees with them in its last pass, the path holds more than `depth`
        tokens for no further draft pass."""
        draft, tokens, greedy = self.state.draft, self.state.tokens, self.state.params.greedy
        path: list[int] = []
        q_rows: list[np.ndarray] = []
        pending = tokens[-1]
        first = True
        while len(path) < depth and self.room(0) >= 1:
            want = max(depth, reach - 1) - len(path)
            tree, guess, chain = self.tree(pending, path, want, self.room(0))
            lagging: list[int] = []
            if first:
                first = False
                self.catch_up_seconds += self.catch_up_price(len(tree.tokens))
                along = self.lag_split(len(tree.tokens))[1]
                catch_up(draft, tokens, keep_last=1 + along)
                lagging = tokens[draft.length:len(tokens) - 1]
                if self.room(len(lagging)) < 1:
                    break
                if len(tree.tokens) > self.room(len(lagging)):  # near the end of the buffer: a smaller tree
                    tree, guess, chain = self.tree(pending, path, want, self.room(len(lagging)))
            rows = len(tree.tokens)
            start = draft.length
            positions, mask = tree.behind(len(lagging), start)
            logits = draft.forward(lagging + tree.tokens, positions=positions, mask=mask, last_rows=rows)[-rows:]
            if self.curve:
                self.tree_seconds += interpolate(self.curve, rows)
            q = RowDistributions(self.state, logits, [path] * rows)
            if sampled:
                kept, nxt = tree.walk(lambda node, q=q: sample(q[node], self.state.rng))
            else:
                kept, nxt = tree.walk(lambda node, q=q: int(np.argmax(q[node])))
            if not greedy:
                q_rows += [q[node] for node in kept]  # the token after each kept node was chosen there
            draft.keep(start, list(range(len(lagging))) + [len(lagging) + i for i in kept])
            matched = [tree.tokens[i] for i in kept[1:]]
            self.ngram_proposed += len(guess)
            self.ngram_accepted += sum(1 for i in kept[1:] if i in chain)
            path += matched + [nxt]
            pending = nxt
        end = max(depth, reach)
        return path[:end], q_rows[:end]


class StagedStep:
    """One staged step at a time: the target verifies either the draft's path (stage 2 feeding stage 1) or,
    when the measured acceptance and costs say the draft model cannot pay for its passes, the n-gram
    proposal straight away (the stage below it), so a weak draft costs little more than `ngram`."""

    def __init__(self, state: DecodeState, settings: StagedSettings | None = None):
        require_draft(state, "staged")
        settings = settings or state.settings
        self.state = state
        self.stats = SpecStats.attach(state)
        self.direct_stats = SpecStats(out={}, target_curve=self.stats.target_curve)
        self.drafter = ngram_drafter(state)
        self.direct = DirectNgram(state, self.direct_stats, self.drafter)
        self.stage2 = StagedDrafter(state, self.stats, self.drafter, settings.ngram_width)
        self.fixed = settings.depth
        self.draft_tokens = 0
        self.draft_passes_before = state.draft.stats.passes
        self.probes_skipped = 0
        self.rule = ProposalRule(settings.path_rule)
        self.kinds: dict[str, int] = {}  # steps by what they verified: "ar", "ngram", "spec", "staged"

    def __call__(self) -> tuple[list[int], np.ndarray]:
        """Commit the next tokens; returns them and the target's logits for each."""
        state, stats = self.state, self.stats
        catch_up(state.target, state.tokens, keep_last=1)
        limit = min(state.target.capacity, state.target.max_chunk, state.draft.capacity) - 1
        if self.fixed is not None:
            depth = max(0, min(int(self.fixed), limit))
            return self._path(depth, depth) if depth else self._direct(self.direct.propose(limit))
        draft_s, target_s = _path_token_seconds(state, self.stage2.tree_seconds, self.draft_tokens)
        depth, path_value = stats.choose(limit, draft_s, target_s)
        direct = self.direct.propose(limit)
        if depth and self._path_pays(path_value, direct[2], draft_s, target_s):
            return self._path(min(depth, limit), min(limit, stats.k_max), stats.draft_cost_ratio(draft_s, target_s))
        return self._direct(direct)

    def _direct(self, proposal: tuple[list[int], list[str], float]) -> tuple[list[int], np.ndarray]:
        """Verify the n-gram proposal alone (an `ngram` step; with nothing proposed, an `ar` step)."""
        self._count("ngram" if proposal[0] else "ar")
        return self.direct.step(proposal)

    def _count(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def _path_pays(self, path_value: float, direct_value: float, draft_s: float | None,
                   target_s: float | None) -> bool:
        """Whether the draft's path, its pending catch-up included, beats the n-gram proposal.

        A catch-up (the draft feeding every token it missed during direct steps; before the first path, the
        whole prompt) is paid once for all the path steps that follow, so it is spread over the tokens still
        to come. (Averaged into the draft's cost per path token instead, the prompt prefill made drafting look
        four times dearer for the rest of the text, while forced probes still paid their catch-ups.)
        A probe asks whether the text has come back to the draft's export-time agreement: it is taken only
        if drafting at that agreement, catch-up included, would beat what the direct steps are realising.
        """
        stats = self.stats
        per_token = self.stage2.catch_up_price() / target_s / self.state.remaining if target_s else 0.0
        if not stats.probing:
            return 1.0 / (1.0 / path_value + per_token) > direct_value
        c = stats.draft_cost_ratio(draft_s, target_s)
        hoped = 1.0 / (1.0 / stats.value(1, c, max(stats.prior_alpha, stats.alpha)) + per_token)
        if hoped > max(direct_value, self.direct_stats.realized_value or 0.0):
            return True
        stats.skip_probe()
        self.probes_skipped += 1
        return False

    def _path(self, depth: int, reach: int, draft_cost: float = 0.0) -> tuple[list[int], np.ndarray]:
        """Verify the draft's path: `depth` tokens or, for a deterministic path, up to `reach` where the draft
        confirmed n-gram guesses beyond it (`_cut`).

        A path drawn from the draft is verified at `depth` tokens, fixed before drawing. Past `depth` a path
        holds a token only where the draws before it matched n-gram guesses, and a cut among those lengths
        can keep a token exactly when it matched a guess itself; Leviathan's rule is exact only for tokens
        verified whatever their value (a token g kept only when drawn is emitted with probability
        p(g)(2 - q(g)) where p(g) < q(g): docs/speculative.md). A deterministic path (greedy, the draft's
        argmax) holds no draw, so any cut keeps its rule exact."""
        t0 = time.perf_counter()
        rule = None if self.state.params.greedy else self.rule
        sampled = rule is not None and rule.sampled
        passes, guessed = self.state.draft.stats.passes, self.stage2.ngram_accepted
        path, q = self.stage2.path(depth, sampled=sampled, reach=depth if sampled else reach)
        self._count(("staged" if self.stage2.ngram_accepted > guessed else "spec") if path else "ar")
        if len(path) > depth:
            k = self._cut(path, depth, (self.state.draft.stats.passes - passes) * draft_cost)
            path, q = path[:k], q[:k]
        self.stats.add_time("draft", time.perf_counter() - t0)
        self.draft_tokens += len(path)
        emitted = _verify(self.state, self.stats, path, q, rule)
        self.state.draft.rollback(min(self.state.draft.length, self.state.target.length))
        return emitted

    def _cut(self, path: list[int], depth: int, spent: float) -> int:
        """Tokens of a deterministic path longer than `depth` to verify: where the expected tokens per unit of
        cost peak, `spent` (its draft passes, in target passes) priced in."""
        alpha, cost = self.stats.alpha, self.stats.verify_cost
        return max(range(depth, len(path) + 1), key=lambda k: expected_tokens(alpha, k) / (spent + cost(k + 1)))

    def publish(self) -> None:
        """Write the staged stats into the result; called once when decoding ends, not per step."""
        stage2 = self.stage2
        self.state.stats["staged"] = {
            "ngram_proposed": stage2.ngram_proposed, "ngram_accepted_by_draft": stage2.ngram_accepted,
            "stage2_acceptance": stage2.ngram_accepted / max(stage2.ngram_proposed, 1),
            "draft_passes_per_path_token":
                (self.state.draft.stats.passes - self.draft_passes_before) / max(self.draft_tokens, 1),
            "draft_path_steps": self.stats.steps, "ngram_direct_steps": self.direct_stats.steps,
            "probes_skipped": self.probes_skipped,
            "path_rule_acceptance": {"argmax": self.rule.argmax, "sample": self.rule.drawn},
            "draft_seconds_priced": {"tree": stage2.tree_seconds, "catch_up": stage2.catch_up_seconds},
            "ngram_direct": self.direct_stats.out.get("speculative", {}),
            "ngram_sources": self.direct.sizing.summary(), "steps_by_kind": dict(sorted(self.kinds.items()))}
        _merge_histograms(self.state.stats["speculative"], self.direct_stats)


def decode_staged(state: DecodeState) -> Iterator[list[int]]:
    step = StagedStep(state)
    prefill_target(state, step.stats)
    try:
        while True:
            yield step()[0]
    finally:  # the engine closes the generator before it reads the stats
        step.publish()


def _merge_histograms(out: dict, direct: SpecStats) -> None:
    """Accepted-per-pass histogram and tokens per target pass over both kinds of steps."""
    merged = dict(out.get("accepted_histogram", {}))
    for emitted, count in direct.histogram.items():
        merged[emitted] = merged.get(emitted, 0) + count
    out["accepted_histogram_all_steps"] = dict(sorted(merged.items()))
    steps = sum(merged.values())
    out["tokens_per_target_pass_all_steps"] = sum(k * v for k, v in merged.items()) / steps if steps else 0.0


def _path_token_seconds(state: DecodeState, draft_seconds: float,
                        path_tokens: int) -> tuple[float | None, float | None]:
    """Draft seconds per path token (tree passes only: catch-ups are priced when pending) and target
    seconds per pass, by the cached cost curves. Curves, not clocks, keep the choice reproducible."""
    draft, target = state.context.draft_cost_curve, state.context.target_cost_curve
    if not draft or not target:
        return None, None
    per_token = draft_seconds / path_tokens if path_tokens else interpolate(draft, 4)
    return per_token, target[1]
