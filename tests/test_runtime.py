"""Runtime core: KV buffer, sampling, stopping, streaming, conversations, dependencies and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgespec.runtime.bundle import ChecksumError, SchemaVersionError
from edgespec.runtime.engine import Engine, PromptError
from edgespec.runtime.sampling import SamplingError, SamplingParams, process_logits


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.load(tiny_bundle)


def test_runtime_imports_no_torch_or_transformers(tiny_bundle):
    code = textwrap.dedent(f"""
        import sys
        from edgespec import Engine
        engine = Engine.load({str(tiny_bundle)!r})
        r = engine.generate("hello", max_new_tokens=8)
        assert len(r.token_ids) > 0
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum", "onnx"))
        print(",".join(heavy))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_peak_memory_is_the_generating_process_own(tiny_bundle):
    """A process started by a bigger one reports its own peak (getrusage's ru_maxrss would carry the parent's)."""
    ballast = np.ones(1 << 28, np.float32)  # 1 GiB touched in this process before the child starts
    code = textwrap.dedent(f"""
        from edgespec import Engine
        print(Engine.load({str(tiny_bundle)!r}).generate("hello", max_new_tokens=8).stats["peak_rss_bytes"])
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    peak = int(proc.stdout.split()[-1])
    assert 20 << 20 < peak < ballast.nbytes // 2, peak


def test_kv_buffer_is_the_same_object_after_100_steps(engine):
    runner = engine.target
    ids_before = [id(a) for a in runner.keys + runner.values]
    ptrs_before = [a.ctypes.data for a in runner.keys + runner.values]
    snapshot = runner.keys[0].copy()
    r = engine.generate("ab", max_new_tokens=100, stop=["\x00never"])
    assert len(r.token_ids) == 100 or r.finish_reason == "stop"
    assert r.stats["target_passes"] >= 100 or r.finish_reason == "stop"
    assert [id(a) for a in runner.keys + runner.values] == ids_before
    assert [a.ctypes.data for a in runner.keys + runner.values] == ptrs_before
    # onnxruntime wrote the new K rows into *our* buffer (IO binding, in place)
    assert not np.array_equal(snapshot[:, :, :100], runner.keys[0][:, :, :100])


def test_a_prefill_chunk_runs_the_lm_head_on_its_last_row_only(engine, tiny_pair_bundle):
    """The graph's logits output holds the rows from `logits_from` on, with the same bits as a full pass's
    (a restricted draft head too), and the next pass sees the same K/V as after a full pass."""
    pair = Engine.load(tiny_pair_bundle)
    tokens = [5, 6, 7, 8, 9, 10, 11]
    for runner in (engine.target, pair.draft):
        assert all(slot.info.tail_logits for slot in runner._slots)
        runner.rollback(0)
        full = runner.forward(tokens).copy()
        runner.rollback(0)
        tail = runner.forward(tokens, last_rows=1)
        assert tail.shape == (1, full.shape[1]) and np.array_equal(tail[0], full[-1])
        assert runner._slots[0].logits_width == 1  # the bound output buffer is one row: the head ran on one
        runner.rollback(0)
        assert np.array_equal(runner.prefill(tokens), full[-1])
        after_tail = runner.forward([12])[0].copy()  # the K/V the tail-only pass wrote are a full pass's
        runner.rollback(0)
        runner.forward(tokens)
        assert np.array_equal(runner.forward([12])[0], after_tail)
        runner.rollback(0)


def test_greedy_is_deterministic_and_temperature_zero_is_greedy(engine):
    a = engine.generate("hello world", max_new_tokens=20)
    b = engine.generate("hello world", max_new_tokens=20, temperature=0.0, seed=123)
    assert a.token_ids == b.token_ids


def test_seeded_sampling_is_reproducible(engine):
    kw = dict(max_new_tokens=30, temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = engine.generate("abc", **kw)
    b = engine.generate("abc", **kw)
    c = engine.generate("abc", **{**kw, "seed": 8})
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_finish_reasons(engine):
    r = engine.generate("hello", max_new_tokens=5)
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    full = engine.generate("hello", max_new_tokens=30, temperature=1.0, seed=3)
    stop = full.text[3:5]
    r = engine.generate("hello", max_new_tokens=30, temperature=1.0, seed=3, stop=[stop])
    assert r.finish_reason == "stop" and stop not in r.text and full.text.startswith(r.text)


def test_eos_stops_generation(tiny_bundle):
    """The engine stops at any of the bundle's EOS ids: declare the first greedy token one to force it."""
    engine = Engine.load(tiny_bundle)
    first = engine.generate("hello", max_new_tokens=3).token_ids[0]
    engine.tokenizer.eos_token_ids.append(first)
    r = engine.generate("hello", max_new_tokens=10)
    assert r.finish_reason == "stop" and r.token_ids == [first]


def test_context_full_stops_with_length(engine):
    """A full context ends the text at exactly max_context tokens; the buffer holds all but the last (its last
    slot is never used, docs/speculative.md), since the last token is never fed."""
    prompt = "a" * (engine.max_context - 10)
    r = engine.generate(prompt, max_new_tokens=50)
    assert r.finish_reason == "length"
    assert "context full" in r.message
    assert r.stats["prompt_tokens"] + len(r.token_ids) == engine.max_context
    assert engine.target.length == engine.max_context - 1


def test_streaming_pieces_join_to_the_text(engine):
    pieces = list(engine.stream("hello", max_new_tokens=25, temperature=1.0, seed=1))
    full = engine.generate("hello", max_new_tokens=25, temperature=1.0, seed=1)
    assert "".join(pieces) == full.text
    assert len(pieces) > 1


@pytest.fixture(scope="module")
def byte_level_bundle(tmp_path_factory):
    """A tiny model whose tokenizer is byte-level BPE, like SmolLM2's: characters outside its training text
    take one token per UTF-8 byte."""
    from conftest import quiet
    from tiny import make_byte_level_tokenizer_json, make_tiny_model_dir

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    root = tmp_path_factory.mktemp("byte-level")
    texts = ["def f(x):\n    return x + 1\n", "hello world, the quick brown fox"] * 20
    tokenizer = make_byte_level_tokenizer_json(texts)
    model = make_tiny_model_dir(root / "model", tokenizer=tokenizer)
    return export_bundle(str(model), root / "bundle", options=ExportOptions(quant="fp32", max_context=128, log=quiet),
                         parity=False)


def test_streaming_never_splits_a_character(byte_level_bundle, monkeypatch):
    """Multi-byte characters span several byte-level tokens; the engine's stream hands out whole characters
    only, and its pieces join to the text. A scripted mode commits the text's tokens one per step."""
    from edgespec.runtime.modes import MODES, Mode

    engine = Engine.load(byte_level_bundle)
    text = "naïve café — 世界 🌍🚀 ok"
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text)  # characters do span tokens

    def scripted(state):
        yield from ([token] for token in ids)

    monkeypatch.setitem(MODES, "scripted", Mode(scripted))
    pieces = list(engine.stream("hello", max_new_tokens=len(ids), mode="scripted"))
    assert "".join(pieces) == text and all("\ufffd" not in piece for piece in pieces)
    assert len(pieces) < len(ids)  # a character's first bytes waited for the rest


def _check_second_turn(bundle, max_new_tokens: int, expect_full_reuse: bool) -> None:
    engine = Engine.load(bundle)
    chat = engine.chat()
    chat.send("Hi! My name is Ada.", max_new_tokens=max_new_tokens)
    turn1_tokens = list(chat.tokens)
    r2 = chat.send("What is my name?", max_new_tokens=max_new_tokens)
    full_prompt = engine.tokenizer.encode(engine.tokenizer.render_chat(chat.messages[:-1]))
    common = 0
    while common < min(len(full_prompt), len(turn1_tokens)) and full_prompt[common] == turn1_tokens[common]:
        common += 1
    if expect_full_reuse:  # the model's own tokens are the canonical tokenization of its reply
        assert common == len(turn1_tokens)
    assert r2.stats["reused_tokens"] == common
    # the KV held turn 1 minus its last token (sampled, never fed); only the rest is prefilled
    assert r2.stats["prefill_tokens"] == len(full_prompt) - min(common, len(turn1_tokens) - 1)
    fresh = Engine.load(bundle).generate(chat.messages[:-1], max_new_tokens=max_new_tokens)
    assert fresh.token_ids == r2.token_ids and fresh.text == r2.text


def test_multi_turn_reuses_the_kv_of_the_common_prefix(tiny_bundle):
    _check_second_turn(tiny_bundle, 12, expect_full_reuse=False)


@pytest.mark.slow
def test_multi_turn_prefills_only_the_new_turn(default_fp32):
    _check_second_turn(default_fp32, 40, expect_full_reuse=True)


def test_process_logits_top_k_top_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = process_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.75))
    np.testing.assert_allclose(p, [0.625, 0.375, 0, 0])
    p = process_logits(logits, SamplingParams(temperature=0.0))
    np.testing.assert_array_equal(p, [1, 0, 0, 0])


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-40, 1e-38, 1e-30, 1e-8])
def test_a_tiny_temperature_samples_the_argmax(engine, temperature):
    """Temperatures that float32 holds as 0 (below ~7e-46) are greedy; larger tiny ones divide the gaps to the
    largest logit, so no row overflows to inf - inf. Both used to give NaN rows, which drew the last id."""
    logits = np.array([[1.0, 50.0, 3.0, -20.0], [7.0, -3.0, 6.5, 7.0 - 1e-5]], np.float32)
    p = process_logits(logits, SamplingParams(temperature=temperature, top_p=0.9, top_k=3))
    np.testing.assert_array_equal(p, [[0, 1, 0, 0], [1, 0, 0, 0]])
    greedy = engine.generate("hello", max_new_tokens=8)
    assert engine.generate("hello", max_new_tokens=8, temperature=temperature, seed=1).token_ids == greedy.token_ids


@pytest.mark.parametrize("kwargs, needle", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty")])
def test_invalid_sampling_settings(engine, kwargs, needle):
    with pytest.raises(SamplingError, match=needle):
        engine.generate("hello", max_new_tokens=2, **kwargs)


def test_empty_and_too_long_prompts(engine):
    with pytest.raises(PromptError, match="empty"):
        engine.generate("   ", max_new_tokens=2)
    with pytest.raises(PromptError, match="context"):
        engine.generate("a" * (engine.max_context + 5), max_new_tokens=2)


def test_changed_byte_is_detected(tiny_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad, ignore=shutil.ignore_patterns("cache"))
    data = bad / "target" / "fused.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="fused.onnx.data"):
        Engine.load(bad)


def test_newer_schema_is_refused(tiny_bundle, tmp_path):
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad, ignore=shutil.ignore_patterns("cache"))
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaVersionError, match="newer"):
        Engine.load(bad)


@pytest.mark.parametrize("args, needle", [
    (["--prompt", ""], "empty"), (["--prompt", "hi", "--top-p", "2"], "top_p"),
    (["--prompt", "hi", "--temperature", "-0.5"], "temperature"), (["--prompt", "a" * 400], "context")])
def test_cli_bad_input_one_line_exit_2(tiny_bundle, args, needle):
    proc = subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle", str(tiny_bundle),
                           *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgespec: error:") and needle in lines[0], proc.stderr


def test_cli_json_output(tiny_bundle):
    proc = subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle", str(tiny_bundle),
                           "--prompt", "hello", "--max-new-tokens", "7", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "token_ids", "finish_reason", "stats"}
    assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length"
    assert out["stats"]["tokens_per_second"] > 0


def test_cli_bundle_errors(tiny_bundle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle",
                           str(tmp_path / "none"), "--prompt", "x"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "bundle directory not found" in proc.stderr


def _stops_spinning(runner) -> bool:
    options = runner._slots[0].session.get_session_options()
    try:
        return options.get_session_config_entry("session.force_spinning_stop") == "1"
    except RuntimeError:  # the key was never set: onnxruntime's default, workers keep spinning between passes
        return False


def test_a_lone_target_keeps_spinning_and_a_pair_stops(tiny_bundle, tiny_pair_bundle):
    """Two sessions on two cores must not spin into each other's passes; one session alone should not pay
    the pool's wake-up at every pass (docs/benchmarks.md, one-off section on spinning)."""
    assert not _stops_spinning(Engine.load(tiny_bundle).target)
    pair = Engine.load(tiny_pair_bundle)
    assert _stops_spinning(pair.target) and _stops_spinning(pair.draft)
    assert not _stops_spinning(Engine.load(tiny_pair_bundle, load_draft=False).target)
