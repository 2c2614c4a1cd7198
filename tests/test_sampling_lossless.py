"""Speculative sampling keeps exactly the target's distribution: chi-square against the exact law.

On a tiny model with a 5-token vocabulary, the exact distribution of the first three sampled
tokens is computed by enumerating the target's own next-token distributions; thousands of seeded
runs of each mode are then compared with it. Deliberately broken acceptance rules must fail the
same test, which shows the test can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import quiet
from scipy.stats import chi2
from tiny import make_tiny_model_dir

import edgespec.runtime.accept as accept
import edgespec.runtime.staged as staged
from edgespec.export.bundle import ExportOptions
from edgespec.export.cli import export_bundle
from edgespec.runtime.engine import Engine
from edgespec.runtime.sampling import SamplingParams, process_logits, sample

RUNS = 2500
PROMPT = "ab"
MODE_OPTIONS = {"ar": {}, "spec": {"k": 2}, "staged": {"depth": 2, "path_rule": "argmax"},
                "staged-sample": {"depth": 2, "path_rule": "sample"}, "staged-auto": {"depth": 2}, "ngram": {"k": 2},
                "auto": {}}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("chi")
    make_tiny_model_dir(root / "model", chars="ab", layers=2, init_std=0.12)
    bundle = export_bundle(str(root / "model"), root / "bundle", derive_layers=1,
                           options=ExportOptions(quant="fp32", max_context=64, log=quiet), parity=False)
    engine = Engine.load(bundle)
    engine.tokenizer.eos_token_ids = []  # every run yields exactly three tokens
    return engine


@pytest.fixture(scope="module")
def exact(engine) -> dict[tuple[int, int, int], float]:
    runner, params = engine.target, SamplingParams(temperature=1.0)
    ids = engine.prompt_tokens(PROMPT, chat=False)

    def probs(context):
        runner.rollback(0)
        return process_logits(runner.prefill(context), params)

    law = {}
    p1 = probs(ids)
    for a in range(runner.vocab_size):
        p2 = probs(ids + [a])
        for b in range(runner.vocab_size):
            p3 = probs(ids + [a, b])
            for c in range(runner.vocab_size):
                law[(a, b, c)] = p1[a] * p2[b] * p3[c]
    assert abs(sum(law.values()) - 1.0) < 1e-6  # float32 rows, each summing to 1 within ~1e-7
    return law


def chi_square_p(engine: Engine, law: dict, mode: str) -> float:
    counts: dict[tuple, int] = {}
    for seed in range(RUNS):
        r = engine.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=seed, mode=mode.split("-")[0],
                            **MODE_OPTIONS[mode])
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    observed, expected, rare_o, rare_e = [], [], 0, 0.0
    for key, prob in law.items():  # pool cells expected fewer than 5 times
        if prob * RUNS >= 5:
            observed.append(counts.get(key, 0))
            expected.append(prob * RUNS)
        else:
            rare_o += counts.get(key, 0)
            rare_e += prob * RUNS
    observed.append(rare_o)
    expected.append(rare_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return float(chi2.sf(stat, len(observed) - 1))


@pytest.mark.parametrize("mode", list(MODE_OPTIONS))
def test_first_three_tokens_follow_the_target_law(engine, exact, mode):
    assert chi_square_p(engine, exact, mode) > 1e-3


def _broken_chain_rule(proposal, q, p, rng):
    """Resamples a rejected position from p instead of the residual max(0, p - q)."""
    for i, x in enumerate(proposal):
        if rng.random() < min(1.0, p[i, x] / q[i, x]):
            continue
        return i, sample(p[i], rng)
    return len(proposal), sample(p[len(proposal)], rng)


def test_broken_chain_rule_is_detected(engine, exact, monkeypatch):
    """The broken rule biases `spec`, and `staged`, whose sampled draft paths the same rule verifies."""
    monkeypatch.setattr(accept, "verify_chain_sampling", _broken_chain_rule)
    assert chi_square_p(engine, exact, "spec") < 1e-6
    monkeypatch.setattr(staged, "verify_chain_sampling", _broken_chain_rule)
    assert chi_square_p(engine, exact, "staged-sample") < 1e-6


def test_broken_deterministic_rule_is_detected(engine, exact, monkeypatch):
    """Resampling after a rejected proposal without removing it from p over-weights proposed tokens."""
    def broken(proposal, p, rng, greedy):
        for i, x in enumerate(proposal):
            if rng.random() < p[i, x]:
                continue
            return i, sample(p[i], rng)
        return len(proposal), sample(p[len(proposal)], rng)

    monkeypatch.setattr(staged, "verify_deterministic", broken)
    assert chi_square_p(engine, exact, "ngram") < 1e-6
    assert chi_square_p(engine, exact, "staged") < 1e-6  # the draft's argmax paths


def test_exact_law_is_not_trivial(exact):
    """The test is only meaningful if the target's law is far from uniform and from a point mass."""
    probs = np.array(list(exact.values()))
    assert probs.max() < 0.5 and (probs > 1e-3).sum() > 10
