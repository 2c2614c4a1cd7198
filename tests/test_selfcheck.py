"""The load-time check that the target computes a row alike whatever its pass holds (runtime/selfcheck.py)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgespec.runtime.bundle import sha256_file
from edgespec.runtime.engine import Engine, ModeError
from edgespec.runtime.selfcheck import safe_rows


def _copy(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("cache"))
    return out


def test_check_passes_on_our_graph_and_is_kept_in_the_bundle_cache(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    engine = Engine.load(bundle)
    ar = engine.generate("def f(x):", max_new_tokens=20)
    assert engine.pass_check["mismatched"] == [] and engine.pass_check["max_rows"] == 128
    assert 2 in engine.pass_check["checked"] and 128 in engine.pass_check["checked"]
    (cached,) = (bundle / "cache").glob("pass-check.target-*.json")
    assert json.loads(cached.read_text()) == engine.pass_check
    # The verdict is read back from the cache: a machine that found 16-row passes safe but not 24 caps passes at 16.
    cached.write_text(json.dumps({"checked": [2, 16, 24], "mismatched": [24], "max_rows": 16}))
    capped = Engine.load(bundle)
    again = capped.generate("def f(x):", max_new_tokens=20)
    assert capped.target.max_chunk == 16 and again.token_ids == ar.token_ids
    assert capped.generate("def f(x):", max_new_tokens=20, mode="ngram").token_ids == ar.token_ids
    cached.write_text('{"checked": [2], "mismat')  # a truncated verdict is checked again, not trusted or fatal
    assert Engine.load(bundle).generate("def f(x):", max_new_tokens=20).token_ids == ar.token_ids
    assert json.loads(cached.read_text())["max_rows"] == 128


def test_a_target_whose_rows_depend_on_the_pass_is_refused_for_speculation(tiny_bundle, tmp_path):
    """Per-tensor dynamic int8 (onnxruntime's own quantizer) scales a pass's activations by its largest
    value, so a row's logits depend on the other rows: exactly what the check must catch."""
    bundle = _copy(tiny_bundle, tmp_path)
    graph = bundle / "target" / "fused.onnx"
    quantize_dynamic(graph, tmp_path / "q.onnx", per_channel=False, weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    onnx.save(onnx.load(tmp_path / "q.onnx"), graph, save_as_external_data=True, location="fused.onnx.data")
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in ("target/fused.onnx", "target/fused.onnx.data"):
        manifest["files"][rel] = sha256_file(bundle / rel)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    engine = Engine.load(bundle)
    assert engine.generate("def f(x):", max_new_tokens=8).token_ids  # plain decoding still works
    assert 2 in engine.pass_check["mismatched"] and engine.pass_check["max_rows"] == 1
    for mode in ("ngram", "spec", "staged"):
        with pytest.raises(ModeError, match="cannot reproduce"):
            engine.generate("def f(x):", max_new_tokens=8, mode=mode)


def test_safe_rows_stops_below_the_first_disagreeing_size():
    assert safe_rows([2, 8, 16, 32], [], 128) == 128
    assert safe_rows([2, 8, 16, 32], [16, 32], 128) == 8
    assert safe_rows([2, 8, 16, 32], [2], 128) == 1


def test_a_static_shape_target_is_checked_reported_and_not_capped(tiny_dir, tmp_path, caplog):
    """NPU bundles run a one-token pass and a k-token pass through different fixed-shape graphs, so rounding
    may differ between them (it does on our CPUs); capping cannot remove that, so it is reported instead."""
    import logging

    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    options = ExportOptions(quant="fp32", device="npu", static_chunk=8, max_context=128, log=quiet)
    bundle = export_bundle(str(tiny_dir), tmp_path / "npu", derive_layers=1, parity=False, options=options)
    engine = Engine.load(bundle, device="cpu")
    with caplog.at_level(logging.WARNING, logger="edgespec.runtime"):
        ar = engine.generate("def f(x):", max_new_tokens=20)
    check = engine.pass_check
    assert not engine.target.fused and engine.target.max_chunk == 8 and check["checked"] == [2, 3, 4, 5, 8]
    warned = [r for r in caplog.records if "static target graphs" in r.getMessage()]
    assert len(warned) == (1 if check["mismatched"] else 0)
    staged = engine.generate("def f(x):", max_new_tokens=20, mode="staged")
    assert staged.stats["pass_size_invariant"] == (not check["mismatched"])
    assert staged.token_ids == ar.token_ids  # equal here: no near-tie in these 20 tokens
