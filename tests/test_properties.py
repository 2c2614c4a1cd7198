"""Property-based tests (hypothesis) over sampling settings and prompt text: whatever a caller passes ends in a
correct result or in one of the runtime's own errors, and greedy speculation equals `ar` on any text."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from edgespec.runtime.engine import Engine, PromptError
from edgespec.runtime.modes import SettingError
from edgespec.runtime.sampling import SamplingError, SamplingParams, process_logits

RUNTIME_ERRORS = (SamplingError, SettingError, PromptError)
SPECIALS = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "</s>", "<s>", "\x00", "\ufffd", "\u202e", "🙂", "\r\n"]

# Any value a caller might put in a numeric setting: ordinary, extreme, non-finite, or not a number at all.
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**12), 10**12),
                    st.sampled_from([0, 1e-300, 1e-45, 5e-324, 1e300, -0.0]), st.none(), st.booleans(),
                    st.text(max_size=3))
prompt_text = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS)), max_size=8).map("".join)
slow_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


@given(temperature=numbers, top_k=numbers, top_p=numbers, penalty=numbers, seed=numbers)
@settings(max_examples=400, deadline=None)
def test_sampling_settings_are_refused_by_name_or_give_a_distribution(temperature, top_k, top_p, penalty, seed):
    try:
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                                seed=seed)
    except SamplingError as e:
        assert str(e)
        return
    logits = np.random.default_rng(0).normal(0, 4, size=(3, 50)).astype(np.float32)
    probs = process_logits(logits, params)
    assert np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    assert (probs[np.arange(3), logits.argmax(-1)] > 0).all()  # the most likely token is never cut
    if params.top_k:
        assert ((probs > 0).sum(-1) <= max(params.top_k, 1)).all()


@given(text=prompt_text, chat=st.booleans(), temperature=st.one_of(st.just(0.0), st.floats(1e-30, 5.0)),
       top_p=st.floats(0.05, 1.0), mode=st.sampled_from(["ar", "spec", "staged", "ngram", "auto", "ead"]),
       max_new_tokens=st.integers(1, 12), seed=st.integers(0, 2**32))
@slow_settings
def test_any_prompt_and_valid_settings_give_a_result_within_the_limits(pair, text, chat, temperature, top_p, mode,
                                                                       max_new_tokens, seed):
    try:
        r = pair.generate(text, max_new_tokens=max_new_tokens, mode=mode, chat=chat, temperature=temperature,
                          top_p=top_p, seed=seed)
    except PromptError:  # only a prompt with no text in it is refused
        assert not text.strip() or not pair.tokenizer.encode(text)
        return
    assert 1 <= len(r.token_ids) <= max_new_tokens
    assert all(0 <= t < pair.manifest.target.vocab_size for t in r.token_ids)
    assert r.finish_reason in ("stop", "length")
    assert r.finish_reason == "stop" or len(r.token_ids) == max_new_tokens


@given(text=prompt_text, mode=st.sampled_from(["spec", "staged", "ngram", "auto"]), max_new_tokens=st.integers(1, 24))
@slow_settings
def test_greedy_speculation_equals_ar_on_any_text(pair, text, mode, max_new_tokens):
    if not text.strip():  # refused as empty (tests/test_bad_input.py)
        return
    ar = pair.generate(text, max_new_tokens=max_new_tokens, mode="ar")
    assert pair.generate(text, max_new_tokens=max_new_tokens, mode=mode).token_ids == ar.token_ids


@given(text=prompt_text)
@slow_settings
def test_streamed_text_is_the_generated_text(pair, text):
    if not text.strip():  # refused as empty (tests/test_bad_input.py)
        return
    whole = pair.generate(text, max_new_tokens=16, mode="staged")
    assert "".join(pair.stream(text, max_new_tokens=16, mode="staged")) == whole.text


@given(name=st.text(min_size=1, max_size=16).filter(str.isidentifier), value=numbers)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_setting_name_and_value_is_a_result_or_a_named_error(pair, name, value):
    try:
        r = pair.generate("def f(x):", max_new_tokens=2, mode="staged", **{name: value})
    except RUNTIME_ERRORS as e:
        assert str(e)
        return
    assert 1 <= len(r.token_ids) <= 2


def test_the_property_strategies_reach_the_extremes():
    """The strategies above draw the values the issue names (tiny positive temperature, NaN, infinity), so the
    properties cover them rather than only ordinary numbers."""
    for wanted in (math.isnan, math.isinf, lambda x: 0 < x < 1e-38, lambda x: x < 0):
        find(numbers, lambda x, wanted=wanted: isinstance(x, float) and wanted(x))  # NoSuchExample if never drawn
