"""Every supported family: a tiny random model with all of the family's features exports and decodes like torch.

For each family (tests/arch_models.py sets every feature in the config: sliding windows shorter than the prompt,
partial rotary, q/k norms, soft-capping, fused projections, layers without RoPE) the fp32 bundle's greedy tokens
equal torch's (or first differ at a proven top-2 tie), `ngram`, `staged`, `spec` and `auto` equal `ar` (`ead` runs),
static NPU graphs and tree passes of the derived draft give torch's and the chains' logits, and config features the
builder does not implement are refused by name.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from arch_models import FAMILY_CONFIGS, WINDOW, make_family_dir
from conftest import quiet
from greedy_check import check_same_or_tie, torch_greedy

from edgespec.export.bundle import ExportOptions
from edgespec.export.cli import export_bundle
from edgespec.export.rope import rope_table
from edgespec.export.sources import load
from edgespec.runtime.bundle import load_manifest
from edgespec.runtime.calibrate import sweep
from edgespec.runtime.engine import Engine
from edgespec.runtime.model import ModelRunner, SessionConfig

FAMILIES = list(FAMILY_CONFIGS)
PROMPT = "def add(a, b):\n    return a"  # 25 tokens: longer than the 6-token windows
NEW_TOKENS = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_dir(root / name, name) for name in FAMILIES}


@pytest.fixture(scope="module")
def loaded(family_dirs) -> dict:
    return {name: load(str(path)) for name, path in family_dirs.items()}


@pytest.fixture(scope="module")
def bundles(family_dirs, loaded, tmp_path_factory) -> dict:
    """fp32 target plus a draft derived from 3 of its 4 layers (so the draft has windowed layers too)."""
    root = tmp_path_factory.mktemp("family-bundles")
    out = {}
    for name, path in family_dirs.items():
        options = ExportOptions(quant="fp32", max_context=128, log=quiet)  # phi3: its original context, short factors
        out[name] = export_bundle(str(path), root / name, options=options, parity=True, derive_layers=3,
                                  ngram_tokens=200, preloaded={str(path): loaded[name]})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_target_and_derived_draft_match_torch(bundles, family):
    """The export's own parity check: teacher-forced fp32 logits of both graphs against their torch models (the
    draft keeps its layers' own windows and RoPE flags)."""
    for role, model in load_manifest(bundles[family]).raw["models"].items():
        parity = model["graphs"]["fused"]["parity"]
        assert parity["top1_agreement"] == 1.0 and parity["max_logit_error"] < 1e-3, (family, role, parity)


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_tables_match_transformers(loaded, family):
    """The tables computed from the config equal transformers' cos/sin (per layer type where they differ)."""
    import torch

    model = loaded[family]
    spec = model.spec
    rotary = model.model.model.rotary_emb
    positions = torch.arange(60)[None]
    for name, rope in spec.rope.items():
        kwargs = {"layer_type": name} if name != "default" else {}
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1, 1, spec.head_dim), positions, **kwargs)
        half = rope.rotary_dim // 2
        table = rope_table(rope, spec.head_dim, 60)
        np.testing.assert_allclose(table.cos[:, :half], cos[0, :, :half].numpy(), atol=2e-6, err_msg=name)
        np.testing.assert_allclose(table.sin[:, :half], sin[0, :, :half].numpy(), atol=2e-6, err_msg=name)


def test_family_features_are_read_from_the_config(loaded):
    specs = {name: m.spec for name, m in loaded.items()}
    assert specs["mistral"].layer_windows == [WINDOW] * 4 and specs["phi3"].layer_windows == [WINDOW] * 4
    assert specs["qwen2"].layer_windows == [0, WINDOW, WINDOW, WINDOW] and specs["qwen2"].attention_bias
    assert specs["qwen3"].qk_norm and specs["gemma3_text"].qk_norm and not specs["gemma2"].qk_norm
    assert specs["smollm3"].layer_rope == ["default", None, "default", None]
    assert specs["smollm3"].layer_windows == [0, WINDOW, 0, WINDOW]
    assert specs["llama"].rope["default"].scaling == "llama3" and specs["llama"].attention_output_bias
    assert specs["phi3"].rope["default"].scaling == "longrope" and specs["phi3"].rope["default"].rotary_dim == 8
    assert specs["qwen3"].rope["default"].scaling == "yarn" and specs["qwen3"].rope["default"].attention_factor > 1
    gemma = specs["gemma3_text"]
    assert gemma.layer_rope == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert gemma.rope["full_attention"].scaling == "linear" and gemma.rope["sliding_attention"].theta == 10000.0
    assert gemma.sandwich_norms and gemma.activation == "gelu_tanh" and gemma.embedding_scale == 8.0
    assert gemma.attention_scale == pytest.approx(24 ** -0.5) and gemma.final_logit_softcap == 20.0
    assert specs["gemma2"].attention_softcap == 5.0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_torch_and_every_mode_matches_ar(loaded, bundles, family):
    engine = Engine.load(bundles[family])
    ids = engine.prompt_tokens(PROMPT, chat=False)
    expected, expected_logits = torch_greedy(loaded[family], ids, NEW_TOKENS)
    got = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, mode="ar").token_ids

    def runtime_logits(j):
        engine.target.rollback(0)
        return engine.target.prefill(ids + got[:j])

    ok, why = check_same_or_tie(expected, expected_logits, got, runtime_logits)
    assert ok, f"{family}: {why}"
    for mode, settings in (("ngram", {}), ("staged", {"depth": 3}), ("spec", {"k": 3}), ("auto", {})):
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, mode=mode, **settings)
        assert result.token_ids == got, (family, mode)
    assert engine.ngram_model is not None  # the bundle's trigram table, from text the model wrote
    assert len(engine.generate(PROMPT, max_new_tokens=8, mode="ead").token_ids) == 8  # lossy: it runs
    rows = sweep(engine, [PROMPT], taus=(0.0, 1e9), max_new_tokens=8, chat=False)  # EAD calibration's sweep
    assert rows[0]["rouge_l"] == 1.0 and rows[0]["large_share"] == 1.0  # tau 0: the large model writes every token
    assert rows[1]["large_share"] < 1.0  # an unreachable entropy bound: the small model writes


@pytest.mark.parametrize("family", FAMILIES)
def test_draft_tree_pass_equals_its_chains_past_the_window(bundles, family):
    """Tree passes of a windowed draft: each node sees the window of its own position (not of its slot)."""
    manifest = load_manifest(bundles[family])
    runner = ModelRunner.open(manifest, "draft", SessionConfig(cache_optimized=False))
    assert any(runner.info.spec["layer_windows"]) == any(manifest.target.spec["layer_windows"])
    runner.forward(list(range(5, 19)))  # 14 committed tokens: the windows cut into them
    tokens, parents, depth = [11, 12, 13, 15, 16], [-1, 0, 0, 1, 3], [0, 1, 1, 2, 3]
    mask = np.zeros((5, 5), bool)
    for i in range(5):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    start = runner.length
    tree = runner.forward(tokens, positions=np.array(depth) + start, mask=mask).copy()
    for chain, nodes in (([11, 12, 15, 16], [0, 1, 3, 4]), ([11, 13], [0, 2])):
        runner.rollback(start)
        np.testing.assert_allclose(tree[nodes], runner.forward(chain), atol=1e-5, err_msg=family)
    runner.rollback(start)
    runner.forward(tokens, positions=np.array(depth) + start, mask=mask)
    runner.keep(start, [0, 1, 3, 4])
    after_tree = runner.forward([30]).copy()
    runner.rollback(start)
    runner.forward([11, 12, 15, 16])
    np.testing.assert_allclose(after_tree, runner.forward([30]), atol=1e-5, err_msg=family)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_graphs_match_torch(family_dirs, loaded, tmp_path, family):
    """NPU graphs (plain operators: windows in the bias, RoPE by hand, GELU from Tanh) give torch's logits."""
    import torch

    path = family_dirs[family]
    options = ExportOptions(quant="fp32", max_context=64, device="npu", static_chunk=8, log=quiet)
    bundle = export_bundle(str(path), tmp_path / "npu", options=options, parity=False,
                           preloaded={str(path): loaded[family]})
    seq = [int(t) for t in np.random.default_rng(0).integers(3, 80, 37)]
    with torch.no_grad():
        ref = loaded[family].model(torch.tensor([seq])).logits[0].numpy()
    for graph in ("static-8", "static-1"):
        runner = ModelRunner.open(load_manifest(bundle), "target", SessionConfig(cache_optimized=False), graph=graph)
        got = np.concatenate([runner.forward(seq[i:i + runner.max_chunk]).copy()
                              for i in range(0, len(seq), runner.max_chunk)])
        np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=f"{family} {graph}")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_exports_run(family_dirs, loaded, tmp_path, family):
    """int4 and w8a8 (SmoothQuant scales folded into the norms before each linear, Gemma's too) export and decode;
    w8a8 still agrees with torch on most teacher-forced positions of these wide random models (chance: 1/84)."""
    path = family_dirs[family]
    for quant, floor in (("int4", 0.0), ("w8a8", 0.5)):
        options = ExportOptions(quant=quant, max_context=128, log=quiet)
        bundle = export_bundle(str(path), tmp_path / quant, options=options, parity=True,
                               preloaded={str(path): loaded[family]})
        parity = load_manifest(bundle).raw["models"]["target"]["graphs"]["fused"]["parity"]
        assert parity["top1_agreement"] >= floor, (family, quant, parity)
        assert len(Engine.load(bundle).generate(PROMPT, max_new_tokens=6, mode="ar").token_ids) == 6


def test_longrope_long_factors_beyond_the_original_context(family_dirs, loaded, tmp_path):
    """A buffer longer than Phi-3's original context takes the long factors, as transformers does for such a
    sequence (a torch pass over 150 tokens), and the manifest says which set it took."""
    import torch

    path = family_dirs["phi3"]
    bundle = export_bundle(str(path), tmp_path / "phi3-long", options=ExportOptions(quant="fp32", max_context=256,
                                                                                    log=quiet),
                           parity=False, preloaded={str(path): loaded["phi3"]})
    manifest = load_manifest(bundle)
    assert "long factors" in manifest.raw["models"]["target"]["rope_notes"][0]
    seq = [int(t) for t in np.random.default_rng(1).integers(3, 80, 150)]
    with torch.no_grad():
        ref = loaded["phi3"].model(torch.tensor([seq])).logits[0].numpy()
    runner = ModelRunner.open(manifest, "target", SessionConfig(cache_optimized=False))
    np.testing.assert_allclose(runner.prefill(seq), ref[-1], atol=1e-4)


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec.export.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _assert_refused(proc: subprocess.CompletedProcess, out, needle: str) -> None:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("edge-export")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize("family, config, needle", [
    ("gemma3_text", {"attn_logit_softcapping": 50.0}, "unsupported: attention logit soft-capping"),
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}},
     "unsupported: RoPE scaling 'dynamic'"),
    ("llama", {"mlp_bias": True}, "unsupported: MLP biases"),
])
def test_unsupported_config_feature_is_refused_by_name(tmp_path, family, config, needle):
    path = make_family_dir(tmp_path / family, family, **config)
    out = tmp_path / "out"
    _assert_refused(_export_cli("--target", str(path), "--out", str(out)), out, needle)


@pytest.mark.parametrize("config, needle", [
    ({"model_type": "qwen3_moe"}, "the closest supported family is qwen3, which lacks mixture-of-experts MLP"),
    ({"model_type": "olmo", "clip_qkv": 8.0}, "which lacks what the config fields clip_qkv set"),  # by config fields
])
def test_unsupported_model_type_names_the_closest_family(tmp_path, config, needle):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 32,
                                                   "num_attention_heads": 2, **config}))
    out = tmp_path / "out"
    _assert_refused(_export_cli("--target", str(model), "--out", str(out)), out, needle)


def test_list_architectures():
    proc = _export_cli("--list-architectures")
    assert proc.returncode == 0, proc.stderr
    for family in FAMILIES:
        assert f"\n  {family} " in proc.stdout
    assert "longrope" in proc.stdout and "qwen3_moe" in proc.stdout
