"""Speculation statistics and the adaptive choice of draft size they feed.

Acceptance α is estimated online (maximum likelihood for a truncated geometric: accepted /
(accepted + rejections)); the draft cost c and the verify cost curve are measured. The draft
size that maximises Leviathan's expected speedup S = E[tokens] / (k·c + c_verify(k+1)) is
chosen each step, so the size follows the text (code runs long, prose short).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgespec.runtime.costs import interpolate


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per target pass when k drafts are each accepted with probability alpha (plus the target's own)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1 - alpha ** (k + 1)) / (1 - alpha)


@dataclass
class SpecStats:
    """Counters that also live, as plain values, in the result's `stats` dict."""

    out: dict
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    target_tokens: int = 0
    cost: float = 0.0  # the steps' target passes in units of a one-token pass (priced by the cost curve)
    histogram: dict[int, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    prior_alpha: float = 0.6
    prior_weight: float = 4.0
    target_curve: dict[int, float] | None = None
    draft_cost: float | None = None  # seconds of one draft pass
    k_max: int = 12
    probe_every: int = 16
    probe_every_max: int = 128
    idle: int = 0
    probe_gap: int = 0  # current gap between probes: probe_every, doubled after each probe that fails
    probing: bool = False
    prior_checked: bool = False
    verify_costs: dict[int, float] = field(default_factory=dict, repr=False)  # k -> verify_cost(k), memoised

    @staticmethod
    def attach(state) -> SpecStats:
        stats = SpecStats(out=state.stats, target_curve=state.context.target_cost_curve or None)
        if state.context.prior_alpha is not None:
            stats.prior_alpha = float(state.context.prior_alpha)
        state.stats["speculative"] = {}
        return stats

    @property
    def alpha(self) -> float:
        """Per-token acceptance, smoothed towards a prior so the first steps are not extreme."""
        return ((self.accepted + self.prior_alpha * self.prior_weight)
                / (self.accepted + self.rejections + self.prior_weight))

    def add_time(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def record_step(self, drafted: int, accepted: int, target_tokens: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.rejections += int(accepted < drafted)
        self.target_tokens += target_tokens
        self.cost += self.verify_cost(target_tokens)
        if self.probing:  # every probe waits twice as long for the next one, accepted or not: one token
            self._back_off()  # is weak evidence, and a probe pays the draft's catch-up over the whole gap
        elif drafted:  # drafting paid by itself: once it stops paying, probe again soon
            self.probe_gap = self.probe_every
        emitted = accepted + 1
        self.histogram[emitted] = self.histogram.get(emitted, 0) + 1
        self.publish()

    @property
    def realized_value(self) -> float | None:
        """Tokens committed per unit of target cost over the steps so far (None before the first)."""
        return (self.accepted + self.steps) / self.cost if self.steps else None

    def skip_probe(self) -> None:
        """A probe judged not worth its price: the next is considered after twice the wait, as after a taken one."""
        self._back_off()

    def _back_off(self) -> None:
        self.probing = False
        self.probe_gap = min(2 * self.gap, self.probe_every_max)

    def choose_k(self, limit: int, draft_seconds: float | None = None, target_seconds: float | None = None) -> int:
        """Draft length maximising expected speedup given measured acceptance and costs.

        When drafting does not pay, a step still drafts one token after `probe_every` idle steps, so
        that the acceptance estimate can recover when the text becomes predictable again. Each probe
        doubles the wait (up to `probe_every_max`) until drafting pays by itself again: a probe costs
        the draft's catch-up over every token since the last one, and one accepted token does not
        make drafting pay (timing each pass: probes reset by single accepted tokens cost `staged` ~8 %
        of its time on 4 HumanEval prompts with our 39 %-agreement draft, for 15 drafted steps in 311;
        docs/benchmarks.md has the side-by-side ratios after the change). When the prior
        alone (the draft's agreement measured at export) already says drafting does not pay, the wait
        starts at `probe_every_max`: the first probe's catch-up is the draft's whole prompt prefill.
        """
        return self.choose(limit, draft_seconds, target_seconds)[0]

    def choose(self, limit: int, draft_seconds: float | None = None,
               target_seconds: float | None = None) -> tuple[int, float]:
        """`choose_k`'s length and its expected tokens per unit of target cost (draft passes priced in),
        so a caller can weigh it against another proposal (staged: the n-gram proposal on its own)."""
        k, value = self._best_k(limit, draft_seconds, target_seconds)
        if not self.prior_checked:
            self.prior_checked = True
            if k == 0 and self.accepted + self.rejections == 0:
                self.probe_gap = self.probe_every_max
        self.idle = 0 if k else self.idle + 1
        if k == 0 and self.idle >= self.gap and limit >= 1:
            self.idle = 0
            self.probing = True
            return 1, self.value(1, self.draft_cost_ratio(draft_seconds, target_seconds), self.alpha)
        return k, value

    @property
    def gap(self) -> int:
        return self.probe_gap or self.probe_every

    def _best_k(self, limit: int, draft_seconds: float | None, target_seconds: float | None) -> tuple[int, float]:
        c = self.draft_cost_ratio(draft_seconds, target_seconds)
        alpha = self.alpha
        best_k, best = 0, 1.0 / self.verify_cost(1)
        for k in range(1, min(self.k_max, limit) + 1):
            s = self.value(k, c, alpha)
            if s > best:
                best_k, best = k, s
        return best_k, best

    def value(self, k: int, c: float, alpha: float) -> float:
        """Expected tokens per unit of target cost of drafting k tokens at acceptance alpha and draft cost ratio c."""
        return expected_tokens(alpha, k) / (k * c + self.verify_cost(k + 1))

    def draft_cost_ratio(self, draft_seconds: float | None, target_seconds: float | None) -> float:
        if draft_seconds is not None and target_seconds:
            return draft_seconds / target_seconds
        return 0.25

    def verify_cost(self, k: int) -> float:
        """Cost of a k-token target pass relative to a 1-token pass (1.0 when unmeasured).

        Memoised: choose_k asks for every k at every step, and interpolating the curve each time showed up
        in profiles of decoding."""
        cost = self.verify_costs.get(k)
        if cost is None:
            if not self.target_curve:
                cost = 1.0 + 0.05 * (k - 1)
            else:
                cost = interpolate(self.target_curve, k) / interpolate(self.target_curve, 1)
            self.verify_costs[k] = cost
        return cost

    def publish(self) -> None:
        steps = max(self.steps, 1)
        mean = (self.accepted + self.steps) / steps
        c = self.out.get("draft_cost_ratio", 0.0) or 0.0
        k_mean = self.drafted / steps
        implied = expected_tokens(self.alpha, round(k_mean)) / (k_mean * c + self.verify_cost(round(k_mean) + 1))
        self.out["speculative"] = {
            "steps": self.steps, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "alpha_estimate": self.alpha, "tokens_per_target_pass": mean,
            "accepted_histogram": dict(sorted(self.histogram.items())),
            "seconds_by_stage": dict(self.seconds), "mean_draft_length": k_mean,
            "leviathan_implied_speedup": implied,
        }
