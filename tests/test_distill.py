"""Deriving and distilling a draft: the whole path on a tiny model, resuming after a kill, caching."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import quiet

# Fixed work (corpus tokens and steps, no time cap), so the result does not depend on how loaded the machine is;
# fp32 so it does not depend on which precision the machine measures as fast either.
TINY_DISTILL = {"corpus_tokens": 6000, "new_tokens": 48, "gen_batch": 32, "train_batch": 16, "lr": 3e-3,
                "checkpoint_seconds": 2.0, "train_steps": 400, "precision": "fp32"}


def _config(cache: Path, **overrides):
    from edgespec.export.distill import DistillConfig

    return DistillConfig(cache_dir=cache, **{**TINY_DISTILL, **overrides})


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory):
    from tiny import make_tiny_model_dir

    from edgespec.export.sources import load

    return load(str(make_tiny_model_dir(tmp_path_factory.mktemp("distill") / "model", layers=3)))


@pytest.fixture(scope="module")
def distill_cache(tmp_path_factory) -> Path:
    """Shared by the tests that distil with TINY_DISTILL: the second one reuses the cached draft."""
    return tmp_path_factory.mktemp("distill-cache")


def test_distillation_raises_agreement_and_leaves_the_target_alone(tiny_target, distill_cache):
    import torch

    from edgespec.export.derive import derive_draft

    before = {k: v.clone() for k, v in tiny_target.model.state_dict().items()}
    draft, info = derive_draft(tiny_target, 2, _config(distill_cache), log=quiet)
    assert info["layers"] == [0, 2], "a distilled draft keeps the first layers and the last (derive.distilled_layers)"
    # measured on the calibration prompts, which are not in the distillation corpus (12.5% -> 28.1% seen)
    assert info["agreement_after_distillation"] >= info["agreement_before_distillation"] + 0.05, info
    assert info["distillation"]["train_steps"] > 0 and info["distillation"]["corpus_answer_tokens"] > 0
    after = tiny_target.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "distillation must not change the target"
    layer = f"layers.0.{'q_proj'}"
    source = tiny_target.weights[f"layers.{info['layers'][0]}.q_proj"]
    assert not (draft.weights[layer] == source).all(), "the exported draft must carry the distilled weights"
    assert (draft.weights["embed_tokens"] == tiny_target.weights["embed_tokens"]).all()

    again, info2 = derive_draft(tiny_target, 2, _config(distill_cache), log=quiet)
    assert info2["distillation"]["cache"] == "hit", "the second derivation loads the cached weights, no training"
    assert info2["distillation"]["train_steps"] == info["distillation"]["train_steps"]
    assert (again.weights[layer] == draft.weights[layer]).all()


def test_corpus_labels_are_the_targets_own_distributions(tiny_target):
    """The fast generator's top-k, taken in a hook step by step, must be the fp32 target's distribution for the
    very token that follows: a label one step off, or from the bf16 head, would agree at chance level or worse."""
    import torch

    from edgespec.export.distill import CorpusGenerator

    prompts = [[1, 5, 9, 14], [1, 7, 3, 2]]
    ids, mask = torch.tensor(prompts), torch.ones((2, 4), dtype=torch.long)
    torch.manual_seed(0)
    sequences, top_logp, top_ids = CorpusGenerator(tiny_target.model, 8).generate(
        ids, mask, 24, pad=0, sampling={"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0})
    assert top_ids.shape == (2, sequences.shape[1] - 4, 8)
    with torch.no_grad():
        ref = tiny_target.model(sequences).logits[:, 3:-1].float().log_softmax(-1)
    top1 = (top_ids[..., 0] == ref.argmax(-1)).float().mean().item()
    assert top1 >= 0.95, top1
    # bf16 layers on a random tiny model: 0.07 nats apart on average here (a one-step shift agrees at 2 % top-1)
    assert (top_logp - ref.gather(-1, top_ids)).abs().mean().item() < 0.15


def test_gqa_attention_equals_transformers_eager_attention():
    """The corpus generator's attention must compute what transformers' eager path does, padding mask included,
    for one decode row and for a prefill chunk (query heads grouped 3 per key/value head, as in SmolLM2)."""
    import torch
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from edgespec.export.distill import gqa_attention

    torch.manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    for rows in (1, 5):
        query, key, value = torch.randn(2, 9, rows, 16), torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)
        mask = torch.zeros(2, 1, rows, 12)
        mask[0, :, :, :4] = torch.finfo(torch.float32).min  # row 0 is left-padded by 4 tokens
        mask[:, :, :, 12 - rows:] += torch.triu(torch.full((rows, rows), torch.finfo(torch.float32).min), 1)
        ours, _ = gqa_attention(module, query, key, value, mask, scaling=0.25)
        ref, _ = eager_attention_forward(module, query, key, value, mask, scaling=0.25)
        assert ours.shape == ref.shape == (2, rows, 9, 16)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


DISTILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from edgespec.export.derive import derive_draft
from edgespec.export.distill import DistillConfig
from edgespec.export.sources import load
target = load({model!r})
cfg = DistillConfig(cache_dir=Path({cache!r}), **{cfg!r})
draft, info = derive_draft(target, 1, cfg)
print("RESULT", info["distillation"]["train_steps"], info["distillation"]["train_seconds"], flush=True)
"""


def test_killed_distillation_resumes_from_its_checkpoint(tiny_target, tmp_path):
    cfg = {**TINY_DISTILL, "train_steps": 600, "checkpoint_seconds": 1.0}
    script = DISTILL_SCRIPT.format(tests=str(Path(__file__).parent), model=tiny_target.source, cache=str(tmp_path),
                                   cfg=cfg)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 900  # generous for a loaded CI machine: the loop ends as soon as a checkpoint exists
    while not list(tmp_path.glob("*.ckpt.safetensors")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    checkpoints = list(tmp_path.glob("*.ckpt.safetensors"))
    assert checkpoints and not list(tmp_path.glob("*.draft.safetensors")), "killed before the end, after a checkpoint"
    from safetensors import safe_open

    with safe_open(str(checkpoints[0]), framework="pt") as f:
        saved = json.loads(f.metadata()["state"])
    assert saved["step"] > 0

    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming at step {saved['step']}" in out.stdout + out.stderr
    steps = int(next(line for line in out.stdout.splitlines() if line.startswith("RESULT")).split()[1])
    assert steps > saved["step"] and steps == cfg["train_steps"], "the resumed run finishes the fixed step count"
    assert list(tmp_path.glob("*.draft.safetensors"))
    assert not list(tmp_path.glob("*.ckpt.safetensors")), "the checkpoint is removed once the final weights exist"


def test_draft_trained_through_a_restricted_head_is_lossless(tiny_target, distill_cache, tmp_path):
    import numpy as np

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle
    from edgespec.export.distill import Corpus, corpus_file
    from edgespec.runtime.engine import Engine
    from edgespec.runtime.model import UNLISTED

    # keep_draft: on this tiny model a one-row pass costs mostly overhead, so even a good draft may measure as
    # unable to pay and would be left out (test_a_distilled_draft_that_cannot_pay_is_left_out)
    bundle = export_bundle(tiny_target.source, tmp_path / "bundle", preloaded={tiny_target.source: tiny_target},
                           derive_layers=2, distill=_config(distill_cache, head_tokens=64), ngram_tokens=40,
                           options=ExportOptions(quant="fp32", max_context=256, log=quiet), parity=True,
                           keep_draft=True)
    engine = Engine.load(bundle)
    derived = engine.manifest.raw["models"]["draft"]["extra"]["derived"]
    # the n-gram table also counts the distillation corpus: every trigram context of the target's text is in it
    corpus = Corpus.load(corpus_file(_config(distill_cache), derived["distillation"]["corpus_key"]))
    sequences = [corpus.sequence(i).tolist() for i in range(len(corpus.offsets) - 1)]
    table_info = engine.manifest.raw["ngram"]
    assert table_info["corpus_tokens"] == sum(map(len, sequences)) > 1000 and table_info["tokens"] >= 40
    vocab = engine.target.vocab_size
    contexts = {s[i - 2] * vocab + s[i - 1] for s in sequences for i in range(2, len(s))}
    assert contexts <= set(engine.ngram_model.tri_keys.tolist())
    # a new training setting trains again but reuses the corpus that the first test generated
    assert derived["distillation"]["cache"] == "written" and derived["distillation"]["train_steps"] > 0
    assert list(distill_cache.glob(f"{derived['distillation']['corpus_key']}.corpus.npz"))
    assert len(list(distill_cache.glob("*.corpus.npz"))) == 1
    # measured with the 64-token head it runs with. Two layers, not one: a one-layer cut of this random 3-layer
    # model stays near chance whatever the head (held-out 5.2 % -> 6.3 % with it, 7.3 % without; 2 layers:
    # 12.5 % -> 27.1 %, transformers 5.24 / torch 2.13), so it could not show that training through the head works
    assert derived["agreement_after_distillation"] >= derived["agreement_before_distillation"] + 0.05, derived
    head = engine.draft.head_ids
    assert head is not None and len(head) == 64
    assert engine.manifest.raw["models"]["draft"]["graphs"]["fused"]["outputs"][0]["shape"][-1] == 64
    logits = engine.draft.forward([5, 6, 7]).copy()
    outside = np.setdiff1d(np.arange(engine.draft.vocab_size), head)
    assert (logits[:, outside] == UNLISTED).all() and np.isfinite(logits[:, head]).all()
    assert (logits[:, head] > UNLISTED).all()
    for prompt in ("def add(a, b):", "Hello there"):
        ar = engine.generate(prompt, max_new_tokens=40, mode="ar").token_ids
        for mode in ("spec", "staged"):
            assert engine.generate(prompt, max_new_tokens=40, mode=mode).token_ids == ar, mode


def test_manifest_records_agreement_and_cost_ratio(tiny_pair_bundle):
    from edgespec.runtime.bundle import load_manifest

    measured = load_manifest(tiny_pair_bundle).raw["models"]["draft"]["measured"]
    assert 0.0 <= measured["agreement"] <= 1.0
    assert 0.0 < measured["cost_ratio"] < 5.0 and measured["draft_pass_ms"] > 0 and measured["target_pass_ms"] > 0


def test_a_given_draft_that_cannot_pay_is_warned_about(tiny_dir, tmp_path):
    from tiny import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=7)  # same tokenizer, unrelated weights
    out = subprocess.run([sys.executable, "-m", "edgespec.export.cli", "--target", str(tiny_dir), "--draft", str(other),
                          "--quant", "fp32", "--max-context", "128", "--no-parity", "--ngram-tokens", "0",
                          "--out", str(tmp_path / "bundle")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warning = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("warning: the draft agrees")]
    assert warning and "cannot pay" in warning[0]


def test_cache_key_follows_the_work_and_the_precision_not_the_time_cap():
    """The key is the work's value, not its spelling, and not the cap: work a cap cut short is never stored as a
    finished draft, only as a checkpoint that the next export (capped or not) continues."""
    from edgespec.export.distill import DistillConfig, cache_key

    def key(**settings):
        return cache_key("w", DistillConfig(**settings).key_fields())

    assert key(minutes=12) == key(minutes=12.0) == key(minutes=6) == key()
    assert key(train_steps=580) == key() != key(train_steps=290) != key(corpus_tokens=70_000)
    assert key(precision="bf16") != key(precision="fp32")  # a corpus and draft made in bf16 are not fp32's
    corpus = DistillConfig(precision="bf16").corpus_fields()
    assert "precision" in corpus and "train_steps" not in corpus and "minutes" not in corpus


def test_precision_choice_follows_the_measured_speed():
    """bf16 only when its matmul is clearly faster than fp32's; the real measurement's choice is the rule's."""
    import torch

    from edgespec.export.distill import choose_precision, measured_precision

    assert choose_precision(bf16_seconds=1.0, fp32_seconds=2.0) == "bf16"
    assert choose_precision(bf16_seconds=2.0, fp32_seconds=1.0) == "fp32"
    assert choose_precision(bf16_seconds=0.95, fp32_seconds=1.0) == "fp32", "a near tie goes to fp32"
    logged: list[str] = []
    fast_bf16 = measured_precision(logged.append, timer=lambda dtype: 1e-3 if dtype == torch.bfloat16 else 4e-3)
    slow_bf16 = measured_precision(logged.append, timer=lambda dtype: 4e-2 if dtype == torch.bfloat16 else 1e-3)
    assert (fast_bf16.precision, slow_bf16.precision) == ("bf16", "fp32")
    assert "1.00 ms in bf16 and 4.00 ms in fp32" in logged[0] and "capability" in logged[0]
    real = measured_precision(logged.append)  # this machine's own matmuls
    assert real.bf16_seconds > 0 and real.fp32_seconds > 0 and real.threads == torch.get_num_threads()
    assert real.precision == choose_precision(real.bf16_seconds, real.fp32_seconds)
    assert real.capability == torch.backends.cpu.get_cpu_capability() and real.capability in logged[-1]


def _student(tiny_target, layers):
    from edgespec.export.derive import student_from_layers

    return student_from_layers(tiny_target, layers).model


def test_the_tiny_distillation_runs_in_the_precision_the_measurement_picks(tiny_target, tmp_path, monkeypatch):
    """With precision left to the measurement, the corpus and the training follow the faster matmul, and the two
    precisions make two corpora (two cache keys)."""
    import torch

    from edgespec.export import distill as distill_module

    made: list[str] = []
    generator = distill_module.CorpusGenerator

    def recording_generator(model, top_k, precision):
        made.append(precision)
        return generator(model, top_k, precision)

    monkeypatch.setattr(distill_module, "CorpusGenerator", recording_generator)
    work = {"corpus_tokens": 200, "train_steps": 2, "precision": None}
    infos = {}
    for faster in ("bf16", "fp32"):
        timings = {torch.bfloat16: 1e-3 if faster == "bf16" else 5e-3, torch.float32: 2e-3}
        monkeypatch.setattr(distill_module, "matmul_seconds", lambda dtype, t=timings: t[dtype])
        infos[faster] = distill_module.distill(tiny_target.model, tiny_target.tokenizer, _student(tiny_target, [0, 2]),
                                               [0, 2], _config(tmp_path, **work), log=quiet)
    assert infos["bf16"]["precision"] == "bf16" and infos["fp32"]["precision"] == "fp32"
    assert made == ["bf16", "fp32"], "each corpus was generated in the chosen precision"
    assert infos["bf16"]["corpus_key"] != infos["fp32"]["corpus_key"]
    assert len(list(tmp_path.glob("*.corpus.npz"))) == 2


class SlowClock:
    """A clock that advances `step` seconds every time it is read: a machine far slower than any real one."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_fixed_work_runs_every_step_however_slow_the_clock_and_a_cap_cuts_it_short_with_a_warning(tiny_target,
                                                                                                   tmp_path):
    from edgespec.export.distill import distill

    logged: list[str] = []
    work = {"corpus_tokens": 300, "train_steps": 7}
    info = distill(tiny_target.model, tiny_target.tokenizer, _student(tiny_target, [0, 2]), [0, 2],
                   _config(tmp_path, **work), log=logged.append, clock=SlowClock(600.0))
    assert info["train_steps"] == 7 and info["complete"] and info["cache"] == "written"
    assert info["corpus_answer_tokens"] >= 300
    assert not [line for line in logged if line.startswith("warning")], "no cap: nothing to warn about"

    # a one-minute cap on a clock that reads 5 s later every time: the corpus is cached, training stops early
    logged.clear()
    capped = _config(tmp_path, **{**work, "train_steps": 12}, minutes=1)
    info = distill(tiny_target.model, tiny_target.tokenizer, _student(tiny_target, [0, 2]), [0, 2], capped,
                   log=logged.append, clock=SlowClock(5.0))
    assert 0 < info["train_steps"] < 12 and not info["complete"] and info["cache"] == "partial"
    warnings = [line for line in logged if line.startswith("warning")]
    assert len(warnings) == 1, logged
    assert "--distill-minutes 1 cut the distillation short" in warnings[0]
    assert f"{info['train_steps']} of 12 training steps" in warnings[0] and "of 300 corpus answer tokens" in warnings[0]
    assert not list(tmp_path.glob(f"{info['cache_key']}.draft.safetensors")), "cut-short work is no finished draft"

    # the next export without the cap continues that work and finishes it
    logged.clear()
    done = distill(tiny_target.model, tiny_target.tokenizer, _student(tiny_target, [0, 2]), [0, 2],
                   _config(tmp_path, **{**work, "train_steps": 12}), log=logged.append)
    assert f"distill: resuming at step {info['train_steps']}" in "\n".join(logged)
    assert done["train_steps"] == 12 and done["complete"] and done["cache_key"] == info["cache_key"]


def test_a_distilled_draft_that_cannot_pay_is_left_out(tiny_target, tmp_path):
    """One layer of the tiny model, not trained (0 steps), agrees near chance while costing a large share of a
    target pass: the bundle ships without it, says so in one line, and still decodes (`ar`, `ngram`)."""
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle
    from edgespec.runtime.decoding import ModeError
    from edgespec.runtime.engine import Engine

    useless = _config(tmp_path / "cache", corpus_tokens=200, train_steps=0)
    logged: list[str] = []
    bundle = export_bundle(tiny_target.source, tmp_path / "bundle", preloaded={tiny_target.source: tiny_target},
                           derive_layers=1, distill=useless, ngram_tokens=40, parity=False,
                           options=ExportOptions(quant="fp32", max_context=256, log=logged.append))
    lines = [line for line in logged if line.startswith("draft left out")]
    assert len(lines) == 1, logged
    engine = Engine.load(bundle)
    dropped = engine.manifest.raw["draft_dropped"]["measured"]
    assert dropped["agreement"] <= dropped["cost_ratio"] and not dropped["can_pay"]
    assert f"{dropped['agreement']:.1%}" in lines[0] and f"{dropped['cost_ratio']:.2f}" in lines[0]
    assert engine.draft is None and "draft" not in engine.manifest.raw["models"]
    assert not (bundle / "draft").exists() and not any(f.startswith("draft/") for f in engine.manifest.files)
    ar = engine.generate("def add(a, b):", max_new_tokens=24, mode="ar").token_ids
    assert engine.generate("def add(a, b):", max_new_tokens=24, mode="ngram").token_ids == ar
    for mode in ("spec", "staged"):
        with pytest.raises(ModeError, match="needs a bundle with a draft model"):
            engine.generate("def add(a, b):", max_new_tokens=8, mode=mode)

    kept = export_bundle(tiny_target.source, tmp_path / "kept", preloaded={tiny_target.source: tiny_target},
                         derive_layers=1, distill=useless, ngram_tokens=0, parity=False, keep_draft=True,
                         options=ExportOptions(quant="fp32", max_context=256, log=quiet))
    measured = Engine.load(kept).manifest.raw["models"]["draft"]["measured"]
    assert not measured["can_pay"], "the same draft, kept on request"


def test_training_batches_cover_each_sequence_once_per_epoch_with_little_padding():
    import numpy as np

    from edgespec.export.distill import Corpus, batch_rows

    rng = np.random.default_rng(0)
    lengths = rng.integers(66, 245, 203)  # the default corpus's spread of sequence lengths
    corpus = Corpus.empty(2)
    corpus.extend([np.zeros(n, np.int64) for n in lengths], [1] * len(lengths),
                  [np.zeros((n - 1, 2), np.int32) for n in lengths],
                  [np.zeros((n - 1, 2), np.float16) for n in lengths])
    per_epoch = len(lengths) // 8

    def padding(batches):  # padded tokens / real tokens of right-padded batches
        return np.mean([lengths[b].max() * len(b) / lengths[b].sum() for b in batches]) - 1

    epoch = [batch_rows(corpus, 8, step, seed=3) for step in range(per_epoch)]
    seen = np.concatenate(epoch)
    assert len(seen) == len(set(seen.tolist())) == per_epoch * 8  # no sequence twice within an epoch
    assert not np.array_equal(np.concatenate([batch_rows(corpus, 8, per_epoch + s, 3) for s in range(per_epoch)]), seen)
    assert np.array_equal(batch_rows(corpus, 8, 17, 3), epoch[17])  # a resumed run draws the same batches
    uniform = [rng.choice(len(lengths), 8, replace=False) for _ in range(per_epoch)]
    assert padding(epoch) < 0.15 and padding(uniform) > 0.3, (padding(epoch), padding(uniform))


def test_ngram_text_falls_back_to_generated_text_when_the_cached_corpus_is_gone_or_corrupt(tmp_path):
    """A cached draft outlives its corpus if a user prunes the cache: the export goes on, says so, and builds the
    table from generated text alone instead of failing or reading half a file."""
    import numpy as np

    from edgespec.export.cli import _distillation_text
    from edgespec.export.distill import Corpus, DistillConfig, corpus_file

    config = DistillConfig(cache_dir=tmp_path)
    info = {"distillation": {"corpus_key": "k"}}
    corpus = Corpus.empty(2)
    corpus.extend([np.array([5, 6, 7, 8]), np.array([9, 10, 11])], [1, 2],
                  [np.zeros((3, 2), np.int32), np.zeros((1, 2), np.int32)],
                  [np.zeros((3, 2), np.float16), np.zeros((1, 2), np.float16)])
    corpus.save(corpus_file(config, "k"))
    logged: list[str] = []
    assert _distillation_text(info, config, logged.append) == [[5, 6, 7, 8], [9, 10, 11]] and not logged
    path = corpus_file(config, "k")
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-write by something else than edge-export
    assert _distillation_text(info, config, logged.append) == []
    assert len(logged) == 1 and "unreadable" in logged[0] and str(path) in logged[0]
    path.unlink()
    assert _distillation_text(info, config, logged.append) == []
    assert len(logged) == 2 and "is gone" in logged[1]
    assert _distillation_text(None, config, logged.append) == [] and len(logged) == 2  # no distilled draft: no text
