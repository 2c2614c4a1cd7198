"""mode="auto", the default: lossless, and its stats say which kind of step ran."""

from __future__ import annotations

import pytest

from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import DEFAULT_MODE

PROMPTS = ["def f(x):\n    return x + 1\n\ndef g(x):\n    return", "hello hello hello hello", "The quick brown fox"]


@pytest.fixture(scope="module")
def pair(tiny_pair_bundle) -> Engine:
    return Engine.load(tiny_pair_bundle)


@pytest.fixture(scope="module")
def alone(tiny_bundle) -> Engine:
    return Engine.load(tiny_bundle)


def test_auto_is_the_default_of_the_api(pair):
    assert DEFAULT_MODE == "auto"
    assert pair.generate("hello", max_new_tokens=4).stats["mode"] == "auto"


@pytest.mark.parametrize("which", ["pair", "alone"])
def test_auto_greedy_is_ar_token_for_token(which, request):
    engine = request.getfixturevalue(which)
    for prompt in PROMPTS:
        ar = engine.generate(prompt, max_new_tokens=48, mode="ar")
        auto = engine.generate(prompt, max_new_tokens=48)
        assert auto.token_ids == ar.token_ids, prompt
        kinds = auto.stats["auto"]["steps_by_kind"]
        assert set(kinds) <= ({"ar", "ngram", "spec", "staged"} if which == "pair" else {"ar", "ngram"})
        prefill_passes = int(auto.stats["prefill_tokens"] > 1)  # the prompt's catch-up: one pass (short prompts)
        assert sum(kinds.values()) + prefill_passes == auto.stats["target_passes"]  # one target pass per step


def test_auto_takes_ngram_steps_on_repetitive_text(alone):
    r = alone.generate("a b c d a b c d a b c d a b c d a b c", max_new_tokens=40)
    assert r.stats["auto"]["steps_by_kind"].get("ngram", 0) > 0


def test_auto_with_a_draft_weighs_the_draft_path(pair):
    """With a draft the choice is staged's controller: over a few prompts it takes draft-path steps where
    they are expected to pay, and its stats carry both kinds of step."""
    seen: dict[str, int] = {}
    for prompt in PROMPTS:
        r = pair.generate(prompt, max_new_tokens=48)
        for kind, n in r.stats["auto"]["steps_by_kind"].items():
            seen[kind] = seen.get(kind, 0) + n
        assert r.stats["staged"]["steps_by_kind"] == r.stats["auto"]["steps_by_kind"]
    assert sum(seen.values()) > 0 and set(seen) & {"spec", "staged", "ngram"}, seen
