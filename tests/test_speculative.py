"""Speculative and entropy-adaptive modes on tiny real graphs: losslessness and switching behaviour."""

from __future__ import annotations

import json

import pytest

from edgespec.runtime.engine import Engine, ModeError

PROMPTS = ["hello", "def f(x):", "abc abc abc abc", "The quick brown fox"]


@pytest.fixture(scope="module")
def pair(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


@pytest.mark.parametrize("k", [None, 1, 3, 6])
def test_spec_greedy_is_identical_to_ar(pair, k):
    options = {} if k is None else {"k": k}
    for prompt in PROMPTS:
        ar = pair.generate(prompt, max_new_tokens=48)
        spec = pair.generate(prompt, max_new_tokens=48, mode="spec", **options)
        assert spec.token_ids == ar.token_ids, prompt
        assert spec.finish_reason == ar.finish_reason
        if k:
            assert spec.stats["target_passes"] < ar.stats["target_passes"] or spec.stats["speculative"]["accepted"] == 0


@pytest.mark.parametrize("mode, options", [("staged", {}), ("staged", {"depth": 4}), ("staged", {"depth": 8}),
                                           ("ngram", {}), ("ngram", {"k": 6})])
def test_staged_and_ngram_greedy_are_identical_to_ar(pair, mode, options):
    for prompt in PROMPTS + ["ab ab ab ab ab ab ab ab ab ab ab"]:
        ar = pair.generate(prompt, max_new_tokens=48)
        r = pair.generate(prompt, max_new_tokens=48, mode=mode, **options)
        assert r.token_ids == ar.token_ids, (prompt, mode, options)


@pytest.mark.parametrize("mode, options", [("spec", {"k": 4}), ("staged", {"depth": 6}), ("ngram", {"k": 6})])
def test_speculation_stops_at_the_context_end_like_ar(pair, mode, options):
    prompt = "x" * (pair.max_context - 12)
    ar = pair.generate(prompt, max_new_tokens=40)
    spec = pair.generate(prompt, max_new_tokens=40, mode=mode, **options)
    assert ar.finish_reason == spec.finish_reason == "length"
    assert spec.token_ids == ar.token_ids


def test_staged_trees_shrink_to_fit_the_end_of_the_context(tiny_pair_bundle):
    """With an n-gram table the draft's trees carry side branches; near the end of the buffer they used to
    overflow it, which ended a generation 4 tokens before `ar` ("context full"), and a sampled path that
    came back empty crashed its verification (a reshape of no draft rows). Every prompt length up to a full
    buffer now ends where `ar` ends, greedy with `ar`'s tokens."""
    from edgespec.runtime.ngram import NgramModel

    engine = Engine.load(tiny_pair_bundle)
    engine.ngram_model = NgramModel.build([engine.tokenizer.encode("abcabdabeabfxyzxyw" * 4)],
                                          engine.target.vocab_size)
    engine.tokenizer.eos_token_ids = []  # a sampled end of text would stop a run before the context is full
    for length in range(engine.max_context - 14, engine.max_context - 1):
        prompt = "z" * ((length - 3) % 2) + "xyz" + "ab" * ((length - 3) // 2)
        assert len(engine.prompt_tokens(prompt, chat=False)) == length
        ar = engine.generate(prompt, max_new_tokens=20)
        assert length + len(ar.token_ids) == engine.max_context
        for options in ({}, {"temperature": 0.8, "seed": length, "path_rule": "sample"}):
            engine.draft.rollback(0)  # the draft lags the whole prompt, as in a new conversation
            r = engine.generate(prompt, max_new_tokens=20, mode="staged", depth=4, **options)
            assert length + len(r.token_ids) == engine.max_context, (length, options)
            assert r.token_ids == ar.token_ids or options


def test_an_empty_sampled_path_is_verified_as_an_ar_step(pair, monkeypatch):
    """A draft path that comes back empty (no room left in the draft's buffer) used to reach Leviathan's rule
    with no draft rows, a reshape of an empty array; it is a plain target step."""
    from edgespec.runtime.staged import StagedDrafter

    monkeypatch.setattr(StagedDrafter, "path", lambda drafter, depth, sampled=False, reach=0: ([], []))
    r = pair.generate("hello", max_new_tokens=5, mode="staged", depth=3, temperature=0.8, seed=0, path_rule="sample")
    assert len(r.token_ids) == 5 and r.stats["staged"]["steps_by_kind"] == {"ar": 5}


def test_staged_reports_both_stages(pair):
    r = pair.generate("ab ab ab ab ab ab ab", max_new_tokens=40, mode="staged", depth=4)
    assert r.stats["draft_passes"] > 0 and r.stats["staged"]["ngram_proposed"] > 0
    assert set(r.stats["speculative"]["seconds_by_stage"]) >= {"prefill", "draft", "verify"}
    assert r.stats["speculative"]["leviathan_implied_speedup"] > 0


def test_ngram_mode_speeds_up_repetition(pair, monkeypatch):
    """On text the n-gram drafter can predict, ngram commits several tokens per target pass: here the bundle's
    trigram table holds the model's own greedy text, as an export builds it from text the model generates."""
    from edgespec.runtime.ngram import NgramModel

    prompt = "abcdefgh " * 3 + "abcd"
    ar = pair.generate(prompt, max_new_tokens=40)
    assert len(ar.token_ids) > 20
    table = NgramModel.build([pair.prompt_tokens(prompt, chat=False) + ar.token_ids], pair.target.vocab_size)
    monkeypatch.setattr(pair, "ngram_model", table)
    r = pair.generate(prompt, max_new_tokens=40, mode="ngram", k=6)
    assert r.token_ids == ar.token_ids
    assert r.stats["speculative"]["tokens_per_target_pass"] > 2 and 2 * r.stats["target_passes"] < len(ar.token_ids)
    # decode tok/s counts the tokens after the first step's, which may be several here
    first = r.stats["first_chunk_tokens"]
    assert ar.stats["first_chunk_tokens"] == 1 and 1 <= first <= len(r.token_ids)
    decode_seconds = r.stats["seconds"] - r.stats["time_to_first_token"]
    assert r.stats["decode_tokens_per_second"] == pytest.approx((len(r.token_ids) - first) / decode_seconds)
    sized = pair.generate(prompt, max_new_tokens=40, mode="ngram")  # proposals cut by per-source acceptance
    assert sized.token_ids == ar.token_ids
    sources = sized.stats["speculative"]["ngram_sources"]
    assert sources and all(0 <= s["accepted"] <= s["tried"] for s in sources.values())
    spec = sized.stats["speculative"]
    assert sum(s["accepted"] for s in sources.values()) == spec["accepted"]  # every accepted token has a source
    assert spec["accepted"] <= sum(s["tried"] for s in sources.values()) <= spec["drafted"]


def test_decode_speed_counts_the_tokens_after_a_multi_token_first_step(pair, monkeypatch):
    """A mode whose steps commit three tokens: decode tok/s leaves out all three of the first step's."""
    from edgespec.runtime.decoding import ArSettings, decode_ar
    from edgespec.runtime.modes import MODES, Mode

    def three_at_a_time(state):
        ar = decode_ar(state)
        while True:
            yield next(ar) + next(ar) + next(ar)

    monkeypatch.setitem(MODES, "three", Mode(three_at_a_time, ArSettings))
    r = pair.generate("def f(x):", max_new_tokens=12, mode="three")
    assert r.token_ids == pair.generate("def f(x):", max_new_tokens=12).token_ids
    assert r.stats["first_chunk_tokens"] == 3
    decode_seconds = r.stats["seconds"] - r.stats["time_to_first_token"]
    assert r.stats["decode_tokens_per_second"] == pytest.approx((len(r.token_ids) - 3) / decode_seconds)


@pytest.mark.parametrize("mode, options", [("spec", {}), ("spec", {"k": 0}), ("spec", {"k": 3}), ("staged", {}),
                                           ("staged", {"depth": 0}), ("ngram", {}), ("ngram", {"k": 0}),
                                           ("ead-spec", {"tau": 0.0})])
def test_sampling_runs_at_every_draft_size(pair, mode, options):
    """Sampling (temperature > 0) through every mode, including a draft size of zero, reproducible by seed."""
    a = pair.generate("def f(x):", max_new_tokens=30, temperature=0.9, top_p=0.95, seed=11, mode=mode, **options)
    b = pair.generate("def f(x):", max_new_tokens=30, temperature=0.9, top_p=0.95, seed=11, mode=mode, **options)
    assert len(a.token_ids) > 0 and a.token_ids == b.token_ids


def test_spec_stats_are_consistent(pair):
    r = pair.generate("def f(x):", max_new_tokens=40, mode="spec", k=3)
    s = r.stats["speculative"]
    assert s["steps"] == sum(s["accepted_histogram"].values())
    assert sum(n * c for n, c in s["accepted_histogram"].items()) >= len(r.token_ids)
    assert 0.0 <= s["acceptance_rate"] <= 1.0
    assert s["drafted"] == 3 * s["steps"]  # far from the end of the context every step drafts k


def test_modes_needing_a_draft_say_so(tiny_bundle):
    engine = Engine.load(tiny_bundle)
    for mode in ("spec", "staged", "ead", "ead-spec"):
        with pytest.raises(ModeError, match='mode="ngram"'):
            engine.generate("hello", max_new_tokens=4, mode=mode)


def test_ead_tau_zero_is_the_large_model(pair):
    for prompt in PROMPTS:
        ar = pair.generate(prompt, max_new_tokens=40)
        ead = pair.generate(prompt, max_new_tokens=40, mode="ead", tau=0.0)
        assert ead.token_ids == ar.token_ids
        assert ead.stats["ead"]["large_share"] == 1.0


def test_ead_tau_infinite_is_the_small_model(pair):
    for prompt in PROMPTS:
        small = pair.generate(prompt, max_new_tokens=40, mode="ar", model="draft")
        ead = pair.generate(prompt, max_new_tokens=40, mode="ead", tau=float("inf"))
        assert ead.token_ids == small.token_ids
        assert ead.stats["ead"]["large_share"] == 0.0 and ead.stats["ead"]["switches"] == 0


def test_ead_switches_respect_min_span_and_catch_up_once(pair):
    seen = 0
    for tau in (2.0, 3.0, 4.0, 5.0):
        for prompt in PROMPTS:
            r = pair.generate(prompt, max_new_tokens=80, mode="ead", tau=tau, min_span=6)
            log = r.stats["ead"]["switch_log"]
            positions = [s["position"] for s in log]
            assert all(b - a >= 6 for a, b in zip(positions, positions[1:], strict=False)), log
            # every switch costs exactly one catch-up pass of the newly active model, never token by token
            assert r.stats["ead"]["catch_up_passes"] == len(log)
            seen += len(log) > 1
    assert seen > 0, "no setting produced two or more switches; the test did not exercise switching"


def test_ead_catch_up_is_one_pass_per_switch_by_pass_counts(pair):
    """Counted from the runners themselves: each model runs one pass per token it produces, and the small
    model one more per switch up (the step whose entropy sent the token to the large model); switching
    down costs no pass, since the large model writes the token whose entropy triggered it. A catch-up
    fed token by token would add passes. Also checks that every statistic of the issue is reported."""
    seen = 0
    for tau in (2.0, 3.0, 4.0):
        for prompt in PROMPTS:
            r = pair.generate(prompt, max_new_tokens=60, mode="ead", tau=tau, min_span=4)
            ead = r.stats["ead"]
            to_large = sum(s["to"] == "large" for s in ead["switch_log"])
            assert r.stats["target_passes"] == ead["tokens_large"], ead
            assert r.stats["draft_passes"] == ead["tokens_small"] + to_large, ead
            assert ead["tokens_small"] + ead["tokens_large"] == len(r.token_ids)
            assert abs(ead["small_share"] + ead["large_share"] - 1.0) < 1e-12
            ratio = pair.draft.info.spec["param_count"] / pair.target.info.spec["param_count"]
            assert abs(ead["cost_estimate"] - (ead["large_share"] + ead["small_share"] * ratio)) < 1e-12
            assert ead["wall_clock_ratio_to_ar"] > 0 and ead["catch_up_tokens"] >= 2 * ead["catch_up_passes"]
            seen += ead["catch_up_passes"] > 1
    assert seen > 0, "no setting produced two or more catch-ups; the test did not exercise switching"


def _writers(prompt_len: int, n: int, switch_log: list[dict]) -> list[str]:
    """Which model wrote each new token, replayed from the switch log: a switch at a position sends that
    token to the large model in both directions; after a switch down the small model writes from the next."""
    events = {s["position"] - prompt_len: s["to"] for s in switch_log}
    active, writers = "small", []
    for j in range(n):
        if j in events:
            active = events[j]
            writers.append("large")
        else:
            writers.append(active)
    return writers


def test_ead_small_model_writes_only_tokens_it_is_sure_of(pair):
    """window 1, min span 0: every token the small model writes is one where its own entropy is below τ,
    recomputed here teacher-forced; the token whose low large-model entropy triggered a switch down is
    the large model's (before the fix the small model wrote it, whatever its own entropy)."""
    from edgespec.runtime.sampling import entropy_bits

    tau, checked, downs = 4.5, 0, 0
    for prompt in PROMPTS:
        r = pair.generate(prompt, max_new_tokens=60, mode="ead", tau=tau, window=1, min_span=0)
        ids = pair.prompt_tokens(prompt, chat=False)
        writers = _writers(len(ids), len(r.token_ids), r.stats["ead"]["switch_log"])
        assert writers.count("small") == r.stats["ead"]["tokens_small"]
        pair.draft.rollback(0)
        logits = pair.draft.forward(ids + r.token_ids[:-1])[len(ids) - 1:]
        pair.draft.rollback(0)
        for j, writer in enumerate(writers):
            if writer == "small":
                assert entropy_bits(logits[j]) < tau, (prompt, j)
                checked += 1
        downs += sum(s["to"] == "small" for s in r.stats["ead"]["switch_log"])
    assert checked > 10 and downs > 2, (checked, downs, "too few small-model tokens or switches down to exercise it")


def test_ead_spec_large_stretches_are_speculative(pair):
    """In `ead-spec` the large model's stretches run draft-then-verify steps, not one pass per token."""
    for prompt in PROMPTS:
        r = pair.generate(prompt, max_new_tokens=40, mode="ead-spec", tau=0.0, depth=3)
        spec = r.stats["speculative"]
        assert spec["steps"] > 0 and spec["drafted"] == 3 * spec["steps"]
        assert r.stats["target_passes"] == spec["steps"] + r.stats["ead"]["catch_up_passes"]
        assert r.stats["ead"]["large_share"] == 1.0


def test_ead_spec_tau_zero_is_lossless(pair):
    """With tau=0 every stretch is a large-model stretch, run as exact speculation."""
    for prompt in PROMPTS:
        ar = pair.generate(prompt, max_new_tokens=40)
        r = pair.generate(prompt, max_new_tokens=40, mode="ead-spec", tau=0.0)
        assert r.token_ids == ar.token_ids


def test_ead_rejects_bad_options(pair):
    with pytest.raises(ValueError, match="window"):
        pair.generate("hello", max_new_tokens=4, mode="ead", window=0)


def test_quality_measures():
    from edgespec.runtime.quality import rouge_l, token_agreement

    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2, 3, 4], [9, 9]) == 0.0
    assert abs(rouge_l([1, 2, 3, 4], [1, 3, 4]) - 2 * (1.0 * 0.75) / 1.75) < 1e-12
    assert token_agreement([1, 2, 3], [1, 5, 3]) == 2 / 3


def test_large_model_nll_prefers_its_own_output(pair):
    from edgespec.runtime.quality import mean_nll

    prompt = pair.tokenizer.encode("def f(x):")
    own = pair.generate("def f(x):", max_new_tokens=24).token_ids
    small = pair.generate("def f(x):", max_new_tokens=24, mode="ar", model="draft").token_ids
    assert mean_nll(pair.target, prompt, own) < mean_nll(pair.target, prompt, small)


def test_calibrate_ead_writes_tau_and_plot(tiny_pair_bundle, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\ndef f(x):\n")
    plot = tmp_path / "cal.png"
    proc = subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "calibrate-ead", "--bundle", str(bundle),
                           "--prompts", str(prompts), "--quality", "0.8", "--taus", "0,2,3,4,6",
                           "--max-new-tokens", "24", "--plot", str(plot)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ead = json.loads((bundle / "manifest.json").read_text())["runtime"]["ead"]
    assert ead["chosen"]["rouge_l"] >= 0.8 and ead["tau"] in (0, 2, 3, 4, 6)
    assert all(row["rouge_l"] < 0.8 for row in ead["sweep"] if row["tau"] > ead["tau"])
    assert plot.stat().st_size > 1000
    r = Engine.load(bundle).generate("hello", max_new_tokens=8, mode="ead")
    assert r.stats["ead"]["tau"] == ead["tau"]


def test_draft_with_another_vocabulary_is_refused_at_load(tiny_pair_bundle, tmp_path):
    import json
    import shutil

    from edgespec.runtime.bundle import BundleError

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["models"]["draft"]["spec"]["vocab_size"] += 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="vocabulary"):
        Engine.load(bundle)


def test_adaptive_size_follows_acceptance_and_cost():
    from edgespec.runtime.stats import SpecStats, expected_tokens

    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    flat = {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 1.5}
    good = SpecStats(out={}, accepted=90, rejections=10, target_curve=flat)
    bad = SpecStats(out={}, accepted=0, rejections=50, target_curve=flat)
    assert good.choose_k(12, draft_seconds=0.1, target_seconds=1.0) >= 4
    assert bad.choose_k(12, draft_seconds=0.3, target_seconds=1.0) == 0
    steep = SpecStats(out={}, accepted=90, rejections=10, target_curve={1: 1.0, 2: 1.4, 4: 2.0, 8: 3.4, 16: 5.5})
    assert steep.choose_k(12, 0.1, 1.0) < good.choose_k(12, 0.1, 1.0)
    picks = [bad.choose_k(12, 0.3, 1.0) for _ in range(40)]
    assert picks.count(1) == 2 and set(picks) == {0, 1}  # a probe every 16 idle steps
    gaps = []
    for accepted in (0, 0, 1, 0, 1):  # every probe doubles the wait up to 128, accepted or not
        waited = 1
        while bad.choose_k(12, 0.3, 1.0) == 0:
            waited += 1
        gaps.append(waited)
        bad.record_step(drafted=1, accepted=accepted, target_tokens=2)
    assert gaps[1:] == [32, 64, 128, 128] and bad.gap == 128
    bad.record_step(drafted=3, accepted=3, target_tokens=4)  # a step that drafted because drafting paid
    assert bad.gap == 16
    weak_prior = SpecStats(out={}, prior_alpha=0.1, target_curve=flat)  # export said: this draft cannot pay
    first_probe = next(i for i in range(1, 200) if weak_prior.choose_k(12, 0.3, 1.0))
    assert first_probe == 128


def test_cost_curve_extrapolates_past_its_largest_measured_pass():
    """Catch-up chunks reach 128 tokens while the curve is measured to 32: pricing them as 32 understated them 4x."""
    from edgespec.runtime.costs import interpolate

    curve = {1: 1.0, 16: 2.6, 32: 4.2}
    assert interpolate(curve, 24) == pytest.approx(3.4)
    assert interpolate(curve, 128) == pytest.approx(4.2 + 0.1 * 96)
    assert interpolate({1: 2.0}, 8) == 2.0


def test_cost_curve_fit_pools_a_noisy_dip_and_keeps_a_monotone_curve():
    from edgespec.runtime.costs import monotone

    fitted = monotone({1: 14.9, 2: 12.0, 4: 16.4, 8: 16.0, 16: 19.0})
    assert list(fitted.values()) == pytest.approx([13.45, 13.45, 16.2, 16.2, 19.0])
    curve = {1: 1.0, 2: 1.1, 8: 2.0}
    assert monotone(curve) == curve


def test_cost_curves_are_measured_together_and_cached(tiny_pair_bundle, tmp_path):
    """Both models' curves come from one interleaved measurement (their ratios drive the sizing) and are
    cached once per bundle, with the draft's passes each following a target pass as when drafting."""
    import shutil

    from edgespec.runtime.costs import CURVE_FORMAT, measure_cost_curves

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    engine = Engine.load(bundle)
    engine.target.prefill([5, 6, 7])
    passes = engine.target.stats.passes
    curves = measure_cost_curves(engine.target, engine.draft, sizes=(1, 4), rounds=2)
    assert {role: set(c) for role, c in curves.items()} == {"target": {1, 4}, "draft": {1, 4}}
    assert all(v > 0 for c in curves.values() for v in c.values())
    # the prefix, then 3 rounds (1 warm-up) of 2 own passes and one before each of the 2 draft passes
    assert engine.target.stats.passes - passes == 1 + 3 * (2 + 2)
    assert engine.target.length == 0 and engine.draft.length == 0  # both re-fed by the next generation
    engine.generate("ab ab ab", max_new_tokens=8, mode="staged")
    cached = list((bundle / "cache").glob(f"cost-curves.v{CURVE_FORMAT}.target-*+-draft-*.json"))
    assert len(cached) == 1 and set(json.loads(cached[0].read_text())["data"]) == {"target", "draft"}
    assert Engine.load(bundle).measure_costs() == engine.cost_curves  # read back, not measured again


FLAT_TARGET = {1: 1.0, 2: 1.1, 4: 1.3, 8: 1.8, 32: 5.0}  # seconds per pass by rows: a made-up machine
CHEAP_DRAFT = {1: 0.1, 4: 0.2, 32: 1.0}


def _staged_step(pair, prompt_len: int, new_tokens: int, prior_alpha: float):
    import numpy as np

    from edgespec.runtime.decoding import DecodeContext, DecodeState
    from edgespec.runtime.sampling import SamplingParams
    from edgespec.runtime.staged import StagedSettings, StagedStep

    pair.target.rollback(0)
    pair.draft.rollback(0)
    tokens = [3 + i % 7 for i in range(prompt_len)]
    context = DecodeContext(prior_alpha=prior_alpha, draft_cost_curve=CHEAP_DRAFT, target_cost_curve=FLAT_TARGET)
    state = DecodeState(pair.target, pair.draft, tokens, SamplingParams(), np.random.default_rng(0),
                        StagedSettings(), context, end=prompt_len + new_tokens)
    return StagedStep(state)


def test_staged_prices_the_drafts_pending_catch_up(pair):
    """A path worth 1.2 tokens per target pass against a direct 1.0 is taken only if the draft's catch-up
    (here the whole 200-token prompt, ~5.8 target passes: 75 tokens in a pass of their own, 124 riding along
    a 4-row tree pass) can be spread over enough tokens still to come."""
    from edgespec.runtime.decoding import catch_up

    short = _staged_step(pair, 200, 16, prior_alpha=0.5)
    assert short.stage2.catch_up_price() == pytest.approx(5.77, abs=0.01)
    assert not short._path_pays(1.2, 1.0, 0.2, 1.0)
    long = _staged_step(pair, 200, 56, prior_alpha=0.5)
    assert long._path_pays(1.2, 1.0, 0.2, 1.0)
    catch_up(short.state.draft, short.state.tokens, keep_last=1)
    assert short.stage2.catch_up_price() == 0.0 and short._path_pays(1.2, 1.0, 0.2, 1.0)


def test_staged_probes_only_when_the_drafts_agreement_could_beat_the_direct_steps(pair):
    weak = _staged_step(pair, 40, 200, prior_alpha=0.5)
    weak.direct_stats.record_step(drafted=3, accepted=3, target_tokens=4)  # direct steps realise 4 / 1.3
    weak.stats.probing, gap = True, weak.stats.gap
    assert not weak._path_pays(0.5, 1.0, 0.2, 1.0)
    assert weak.probes_skipped == 1 and not weak.stats.probing and weak.stats.gap == 2 * gap
    good = _staged_step(pair, 40, 200, prior_alpha=0.9)  # 1.9 tokens per 1.3 passes beats a direct 1.0
    good.stats.probing = True
    assert good._path_pays(0.5, 1.0, 0.2, 1.0) and good.probes_skipped == 0


def _engine_measuring(bundle, agreement: float, draft_curve: dict[int, float]) -> Engine:
    """An engine whose draft agreement (measured at export) and pass costs (measured here) are made up:
    internals the engine hands its modes, which no generate() keyword can set."""
    engine = Engine.load(bundle)
    engine.draft_agreement = agreement
    engine.cost_curves = {"target": FLAT_TARGET, "draft": draft_curve}
    return engine


def test_staged_drafts_from_the_first_step_only_with_a_draft_that_pays(pair, tiny_pair_bundle):
    prompt = "The quick brown fox"
    ar = pair.generate(prompt, max_new_tokens=32)
    good = _engine_measuring(tiny_pair_bundle, 0.95, CHEAP_DRAFT).generate(prompt, max_new_tokens=32, mode="staged")
    weak = _engine_measuring(tiny_pair_bundle, 0.05, {1: 0.9, 4: 1.2, 32: 6.0}).generate(
        prompt, max_new_tokens=32, mode="staged")
    assert good.token_ids == weak.token_ids == ar.token_ids
    assert good.stats["staged"]["draft_path_steps"] > 0 and good.stats["draft_passes"] > 0
    assert weak.stats["staged"]["draft_path_steps"] == 0 and weak.stats["draft_passes"] == 0


def test_a_lagging_draft_catches_up_in_its_first_tree_pass(pair):
    """The tokens the draft missed ride along its first tree pass: one draft pass, and the KV and the path
    it leaves are those of a separate catch-up followed by the tree pass."""
    import numpy as np

    step = _staged_step(pair, 40, 16, prior_alpha=0.9)
    draft = step.state.draft
    passes = draft.stats.passes
    path, _ = step.stage2.path(1)
    assert draft.stats.passes - passes == 1 and draft.length == 40 and step.stage2.lag() == 0
    fused = [k[:, :, :40].copy() for k in draft.keys]
    draft.rollback(0)
    alone = draft.prefill(step.state.tokens)
    assert path == [int(np.argmax(alone))]
    assert all(np.allclose(a, k[:, :, :40], atol=1e-5) for a, k in zip(fused, draft.keys, strict=True))


def test_path_rule_follows_the_better_exact_acceptance(pair):
    """Sampling: the draft's path is its argmax or a draw from it, whichever the target accepted more of so far
    (both acceptances are exact at each verified position); a fixed rule is selectable, a wrong one refused."""
    import numpy as np

    from edgespec.runtime.staged import ProposalRule

    rule = ProposalRule()
    assert not rule.sampled  # argmax until a draw has been seen to do better
    rule.record(np.array([[0.4, 0.35, 0.25]]), [np.array([0.3, 0.4, 0.3])], 1)  # p(argmax q) 0.35, sum min 0.9
    assert rule.sampled
    rule.record(np.array([[0.95, 0.03, 0.02]]), [np.array([0.5, 0.25, 0.25])], 1)  # 0.95 against 0.55
    assert (rule.argmax, rule.drawn) == pytest.approx((1.3, 1.45)) and rule.sampled
    rule.record(np.array([[0.9, 0.05, 0.05], [0.2, 0.2, 0.6]]), [np.array([0.2, 0.5, 0.3])] * 2, 1)  # row 2 unseen
    assert (rule.argmax, rule.drawn) == pytest.approx((1.35, 1.75))
    assert ProposalRule("sample").sampled and not ProposalRule("argmax").sampled
    with pytest.raises(ValueError, match="path_rule"):
        pair.generate("hello", max_new_tokens=4, mode="staged", temperature=0.8, path_rule="best")
