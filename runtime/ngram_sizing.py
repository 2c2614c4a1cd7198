"""How many tokens of an n-gram proposal the target should verify, by where each token came from.

Measured on our int8 bundle (10 HumanEval and 10 prose prompts, greedy, 128 new tokens; `ngram` mode
proposing with one shared acceptance rate), the chance that the target accepts a proposed token depends
mostly on its source: copied after a 4-token context match 82-93 %, after a 3-token match ~62 %, after
a 2-token match 25-61 %, after a 1-token match 13-22 %; the trigram table's guesses 6-9 %. One rate for
all of them (the geometric model of stats.py) sends the weak guesses to a target whose 2-row pass costs
more than a 1-row pass and cuts the strong copies short. So each source keeps its own rate, learnt during
the generation from a prior (the figures above), and the proposal is cut where the expected tokens per
unit of verify cost peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# The table's guesses: 0.2 for both bands of runtime/ngram.py's `table_source` since the table counts the
# distillation corpus (one "table" rate at a 0.08 prior before; the rates each band learns: docs/speculative.md).
PRIORS = {"ctx4": 0.85, "ctx3": 0.6, "ctx2": 0.5, "ctx1": 0.2, "table": 0.2, "table-hi": 0.2}
PRIOR_WEIGHT = 2.0  # the prior counts as this many proposed tokens


@dataclass
class SourceAcceptance:
    """Per source: tokens that reached verification and tokens accepted."""

    tried: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)

    def rate(self, source: str) -> float:
        prior = PRIORS.get(source, PRIORS["ctx1"])
        return ((self.accepted.get(source, 0) + prior * PRIOR_WEIGHT)
                / (self.tried.get(source, 0) + PRIOR_WEIGHT))

    def best_length(self, sources: list[str], verify_cost: Callable[[int], float]) -> tuple[int, float]:
        """The prefix length k maximising expected tokens per target pass / cost of a (k+1)-row pass,
        and that value (1 / cost of a one-row pass for k = 0).

        Token j is emitted only if every token before it was accepted, so its chance is the product of
        the rates up to j; the target adds one token of its own to every pass.
        """
        best_k, best = 0, 1.0 / verify_cost(1)
        reach = expected = 1.0
        for k, source in enumerate(sources, start=1):
            reach *= self.rate(source)
            expected += reach
            value = expected / verify_cost(k + 1)
            if value > best:
                best_k, best = k, value
        return best_k, best

    def record(self, sources: list[str], accepted: int) -> None:
        """After a target pass over the proposal with these sources, `accepted` of which it kept."""
        for j, source in enumerate(sources[:accepted + 1]):  # tokens after the first rejection were never judged
            self.tried[source] = self.tried.get(source, 0) + 1
            self.accepted[source] = self.accepted.get(source, 0) + int(j < accepted)

    def summary(self) -> dict[str, dict[str, float]]:
        return {s: {"tried": n, "accepted": self.accepted.get(s, 0), "rate": round(self.accepted.get(s, 0) / n, 3)}
                for s, n in sorted(self.tried.items()) if n}
