"""Which model wrote each token a decoding step commits: what the chat page colours and the server reports.

A mode yields one chunk per step. In a verified step (`spec`, `ngram`, `staged`, `auto` and the large model's
stretches of `ead-spec`) every token but the last is an accepted proposal and the last is the target's own token
(its correction, or the bonus token after a fully accepted proposal). Who proposed is read from the counters the
modes publish in their live stats as they step, so the modes need no extra bookkeeping: `staged` (and `auto` with a
draft, which steps like it) records a step in `stats["speculative"]` only when the draft's path was verified (its
direct n-gram steps count apart); `auto` without a draft proposes n-grams only; EAD counts the small model's tokens
in `stats["ead"]`. A mode registered from outside gets no origins (None).
"""

from __future__ import annotations

from typing import Any

TARGET, DRAFT, NGRAM, SMALL = "target", "draft", "ngram", "small"

ORIGINS = {
    TARGET: "the target model's own token (a correction, or every token of ar and of EAD's large model)",
    DRAFT: "proposed by the draft model, accepted by the target",
    NGRAM: "proposed by the n-gram drafter, accepted by the target",
    SMALL: "written by the small (draft) model alone, unverified (EAD's confident stretches)",
}

_VERIFIED = ("spec", "ngram", "staged", "ead-spec", "auto")


class OriginTracker:
    """Per generation: called after each step with the mode's whole chunk and its live stats."""

    def __init__(self, mode: str, settings: Any = None, has_draft: bool = True):
        self.mode, self.has_draft = mode, has_draft
        self.draft_alone = mode == "ar" and getattr(settings, "model", "target") == "draft"
        self.path_steps = 0
        self.small_tokens = 0

    def __call__(self, chunk: list[int], stats: dict) -> list[str | None]:
        """The origin of each token of `chunk` (a cut chunk keeps its first tokens' origins)."""
        path_steps = stats.get("speculative", {}).get("steps", 0)
        small_tokens = stats.get("ead", {}).get("tokens_small", 0)
        new_path, new_small = path_steps - self.path_steps, small_tokens - self.small_tokens
        self.path_steps, self.small_tokens = path_steps, small_tokens
        n = len(chunk)
        if self.mode == "ar":
            return [SMALL if self.draft_alone else TARGET] * n
        if self.mode in ("ead", "ead-spec") and new_small:
            return [SMALL] * n
        if self.mode == "ead":
            return [TARGET] * n
        if self.mode not in _VERIFIED:
            return [None] * n
        drafted = self.mode == "spec" or (new_path and self.has_draft and self.mode != "ngram")
        proposer = DRAFT if drafted else NGRAM
        return [proposer] * (n - 1) + [TARGET]
