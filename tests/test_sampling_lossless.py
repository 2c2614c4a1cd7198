"""Speculative sampling keeps exactly the target's distribution: chi-square against the exact law.

On a tiny model with a 5-token vocabulary, the exact distribution of the first three sampled
tokens is computed by enumerating the target's own next-token distributions; thousands of seeded
runs of each mode are then compared with it. Deliberately broken acceptance rules must fail the
same test, which shows the test can fail. The adaptive modes (draft sizes chosen each step) are
checked at temperature 0.8 with top-p 0.9, on an engine where the draft's path pays and reaches
past its depth, with a control whose path cut depends on the drawn tokens' values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import quiet
from scipy.stats import chi2
from tiny import make_tiny_model_dir

import edgespec.runtime.speculative as speculative
import edgespec.runtime.staged as staged
from edgespec.export.bundle import ExportOptions
from edgespec.export.cli import export_bundle
from edgespec.runtime.engine import Engine
from edgespec.runtime.ngram import NgramModel
from edgespec.runtime.sampling import SamplingParams, process_logits, sample
from edgespec.runtime.stats import SpecStats

RUNS = 2500
PROMPT = "ab"
MODE_OPTIONS = {"ar": {}, "spec": {"k": 2}, "staged": {"depth": 2, "path_rule": "argmax"},
                "staged-sample": {"depth": 2, "path_rule": "sample"}, "staged-auto": {"depth": 2}, "ngram": {"k": 2},
                "auto": {}}
TOP_P = {"temperature": 0.8, "top_p": 0.9}
ADAPTIVE = {"spec": {}, "staged": {}, "staged-sample": {"path_rule": "sample"}, "auto": {}}
ADAPTIVE_RUNS = 1500
FLAT_TARGET = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8, 32: 5.0}  # seconds per pass by rows: a made-up machine
CHEAP_DRAFT = {1: 0.1, 4: 0.2, 32: 1.0}


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("chi")
    make_tiny_model_dir(root / "model", chars="ab", layers=2, init_std=0.12)
    bundle = export_bundle(str(root / "model"), root / "bundle", derive_layers=1,
                           options=ExportOptions(quant="fp32", max_context=64, log=quiet), parity=False)
    engine = Engine.load(bundle)
    engine.tokenizer.eos_token_ids = []  # every run yields exactly three tokens
    return engine


def exact_law(engine: Engine, params: SamplingParams) -> dict[tuple[int, int, int], float]:
    """The probability of each first three tokens, from the target's own next-token distributions."""
    runner = engine.target
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


@pytest.fixture(scope="module")
def exact(engine) -> dict[tuple[int, int, int], float]:
    return exact_law(engine, SamplingParams(temperature=1.0))


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory) -> Engine:
    """A pair whose draft agrees with the target on most tokens (its second layer's output projections damped,
    the draft is the first layer), so paths are accepted far enough for a value-dependent cut to show, on a
    made-up machine where the draft's path pays (a cheap draft, target passes a little dearer per row). Its
    n-gram table is built from the draft's own greedy text, as an export builds it: the draft confirms the
    table's guesses, so deterministic paths reach past their depth."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("chi-adaptive")
    model_dir = make_tiny_model_dir(root / "model", chars="ab", layers=2, init_std=0.12)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.startswith("model.layers.1.") and name.endswith(("o_proj.weight", "down_proj.weight")):
                weight.mul_(0.3)
    model.save_pretrained(model_dir)
    bundle = export_bundle(str(model_dir), root / "bundle", derive_layers=1,
                           options=ExportOptions(quant="fp32", max_context=64, log=quiet), parity=False)
    adaptive = Engine.load(bundle)
    adaptive.tokenizer.eos_token_ids = []
    adaptive.draft_agreement = 0.7
    adaptive.cost_curves = {"target": FLAT_TARGET, "draft": CHEAP_DRAFT}
    texts = [adaptive.prompt_tokens(p, chat=False) + adaptive.generate(p, max_new_tokens=20, model="draft",
                                                                       mode="ar").token_ids
             for p in ("a", "b", "ab", "ba", "abab")]
    adaptive.ngram_model = NgramModel.build(texts, adaptive.target.vocab_size)
    return adaptive


@pytest.fixture(scope="module")
def exact_top_p(adaptive) -> dict[tuple[int, int, int], float]:
    return exact_law(adaptive, SamplingParams(**TOP_P))


class PathLengths:
    """Each draft path the target verifies: whether it was drawn from the draft, its depth and its length."""

    def __init__(self, monkeypatch):
        self.paths: list[tuple[bool, int, int]] = []
        self.depth = 0
        path, verify = staged.StagedDrafter.path, staged._verify

        def recorded_path(drafter, depth, sampled=False, reach=0):
            self.depth = depth
            return path(drafter, depth, sampled, reach)

        def recorded_verify(state, stats, proposal, q=None, rule=None):
            if rule is not None:  # a path step (an n-gram step passes no rule)
                self.paths.append((rule.sampled, self.depth, len(proposal)))
            return verify(state, stats, proposal, q, rule)

        monkeypatch.setattr(staged.StagedDrafter, "path", recorded_path)
        monkeypatch.setattr(staged, "_verify", recorded_verify)

    def past_depth(self, sampled: bool) -> int:
        return sum(1 for s, depth, n in self.paths if s == sampled and n > depth)


def chi_square_p(engine: Engine, law: dict, mode: str, options: dict | None = None, runs: int = RUNS,
                 **sampling) -> float:
    """The p-value of `runs` seeded generations of `mode` against `law` (sampling at temperature 1 by default)."""
    counts: dict[tuple, int] = {}
    options = MODE_OPTIONS[mode] if options is None else options
    for seed in range(runs):
        r = engine.generate(PROMPT, max_new_tokens=3, seed=seed, mode=mode.split("-")[0], **options,
                            **(sampling or {"temperature": 1.0}))
        counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
    observed, expected, rare_o, rare_e = [], [], 0, 0.0
    for key, prob in law.items():  # pool cells expected fewer than 5 times
        if prob * runs >= 5:
            observed.append(counts.get(key, 0))
            expected.append(prob * runs)
        else:
            rare_o += counts.get(key, 0)
            rare_e += prob * runs
    if rare_e == 0.0 and rare_o:  # a sequence top-p rules out was generated
        return 0.0
    if rare_e > 0.0:
        observed.append(rare_o)
        expected.append(rare_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    return float(chi2.sf(stat, len(observed) - 1))


@pytest.mark.parametrize("mode", list(MODE_OPTIONS))
def test_first_three_tokens_follow_the_target_law(engine, exact, mode):
    assert chi_square_p(engine, exact, mode) > 1e-3


@pytest.mark.parametrize("mode", list(ADAPTIVE))
def test_adaptive_modes_follow_the_target_law_under_top_p(adaptive, exact_top_p, mode, monkeypatch):
    """Draft sizes chosen each step from acceptance so far; staged's deterministic (argmax) paths reach past
    their depth where the draft confirmed the table's guesses (asserted: else the cut is never exercised),
    while paths drawn from the draft are verified at their depth."""
    lengths = PathLengths(monkeypatch)
    assert chi_square_p(adaptive, exact_top_p, mode, ADAPTIVE[mode], ADAPTIVE_RUNS, **TOP_P) > 1e-3
    if mode == "spec":
        return
    assert lengths.past_depth(sampled=False) > ADAPTIVE_RUNS // 2 or mode == "staged-sample"
    assert lengths.past_depth(sampled=True) == 0
    assert sum(1 for sampled, _, _ in lengths.paths if sampled) > ADAPTIVE_RUNS // 2


def test_a_value_dependent_path_cut_is_detected(adaptive, exact_top_p, monkeypatch):
    """The negative control of the path cut: sampled paths reach past their depth as deterministic ones do,
    and are verified up to their last draw that matched an n-gram guess (the draw after it, which no guess
    confirmed, is dropped), so whether a token past the depth is verified depends on its own value."""
    path = staged.StagedDrafter.path

    def reaching(drafter, depth, sampled=False, reach=0):  # as far as a deterministic path may reach
        return path(drafter, depth, sampled, reach=max(reach, SpecStats.k_max))

    monkeypatch.setattr(staged.StagedDrafter, "path", reaching)
    monkeypatch.setattr(staged.StagedStep, "_cut", lambda step, tokens, depth, spent: len(tokens) - 1)
    lengths = PathLengths(monkeypatch)
    assert chi_square_p(adaptive, exact_top_p, "staged", ADAPTIVE["staged-sample"], ADAPTIVE_RUNS, **TOP_P) < 1e-6
    assert lengths.past_depth(sampled=True) > ADAPTIVE_RUNS // 20  # in 5 % of the runs at least


def _broken_chain_rule(proposal, q, p, rng):
    """Resamples a rejected position from p instead of the residual max(0, p - q)."""
    for i, x in enumerate(proposal):
        if rng.random() < min(1.0, p[i, x] / q[i, x]):
            continue
        return i, sample(p[i], rng)
    return len(proposal), sample(p[len(proposal)], rng)


def test_broken_chain_rule_is_detected(engine, exact, monkeypatch):
    """The broken rule biases `spec`, and `staged`, whose sampled draft paths the same rule verifies."""
    monkeypatch.setattr(speculative, "verify_chain_sampling", _broken_chain_rule)
    assert chi_square_p(engine, exact, "spec") < 1e-6
    assert chi_square_p(engine, exact, "staged-sample") < 1e-6


def test_broken_deterministic_rule_is_detected(engine, exact, monkeypatch):
    """Resampling after a rejected proposal without removing it from p over-weights proposed tokens."""
    def broken(proposal, p, rng, greedy):
        for i, x in enumerate(proposal):
            if rng.random() < p[i, x]:
                continue
            return i, sample(p[i], rng)
        return len(proposal), sample(p[len(proposal)], rng)

    monkeypatch.setattr(speculative, "verify_deterministic", broken)
    assert chi_square_p(engine, exact, "ngram") < 1e-6
    assert chi_square_p(engine, exact, "staged") < 1e-6  # the draft's argmax paths


def test_exact_law_is_not_trivial(exact):
    """The test is only meaningful if the target's law is far from uniform and from a point mass."""
    probs = np.array(list(exact.values()))
    assert probs.max() < 0.5 and (probs > 1e-3).sum() > 10
