"""Greedy speculation on the real model (int8 and W8A8 bundles) gives token ids identical to `ar`."""

from __future__ import annotations

import pytest
from humaneval_prompts import humaneval_prompts

from edgespec.runtime.engine import Engine
from edgespec.runtime.selfcheck import MAX_ROWS


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["default_int8", "default_w8a8"])
def test_humaneval_subset_spec_staged_ngram_identical_to_ar(bundle, request):
    engine = Engine.load(request.getfixturevalue(bundle))
    assert engine.draft is not None and engine.ngram_model is not None
    prompts = humaneval_prompts()
    assert len(prompts) == 164
    for i, prompt in enumerate(prompts[:6]):
        ar = engine.generate(prompt, max_new_tokens=128, chat=True)
        for mode, options in (("spec", {}), ("spec", {"k": 4}), ("staged", {"depth": 6}), ("ngram", {})):
            r = engine.generate(prompt, max_new_tokens=128, chat=True, mode=mode, **options)
            assert r.token_ids == ar.token_ids, f"prompt {i}, {mode} {options}"
    assert engine.pass_check["mismatched"] == [] and engine.pass_check["max_rows"] == MAX_ROWS
