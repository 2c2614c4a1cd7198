"""The load-time check that the target computes a row alike whatever its pass holds (runtime/selfcheck.py)."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from edgespec.runtime.bundle import load_manifest, sha256_file
from edgespec.runtime.decoding import MAX_PROPOSAL
from edgespec.runtime.engine import Engine, ModeError
from edgespec.runtime.machine import cpu_description, isa_summary
from edgespec.runtime.model import ModelRunner, SessionConfig
from edgespec.runtime.selfcheck import MAX_ROWS, SHORT_SIZES, check_runner, pass_size_mismatches


def _copy(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("cache"))
    return out


def test_check_passes_on_our_graph_and_is_kept_in_the_bundle_cache(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    engine = Engine.load(bundle)
    ar = engine.generate("def f(x):", max_new_tokens=20)
    assert engine.pass_check["mismatched"] == [] and engine.pass_check["max_rows"] == MAX_ROWS
    assert engine.pass_check["checked"] == [k for k in SHORT_SIZES if k < 256 - 16 - 2]
    assert set(range(2, MAX_PROPOSAL + 2)) <= set(engine.pass_check["checked"])  # every verify pass a mode runs
    assert engine.target.max_chunk == MAX_ROWS
    (cached,) = (bundle / "cache").glob("pass-check.target-*.json")
    assert json.loads(cached.read_text())["data"] == engine.pass_check
    # The verdict is read back from the cache: a machine that found 16-row passes safe but not 17 caps passes at 16.
    capped_verdict = {"input_rows": 1, "checked": list(range(2, 18)), "mismatched": [17], "max_rows": 16}
    cached.write_text(json.dumps({"sha256": _digest(capped_verdict), "data": capped_verdict}))
    capped = Engine.load(bundle)
    again = capped.generate("def f(x):", max_new_tokens=20)
    assert capped.target.max_chunk == 16 and again.token_ids == ar.token_ids
    assert capped.generate("def f(x):", max_new_tokens=20, mode="ngram").token_ids == ar.token_ids
    cached.write_text('{"checked": [2], "mismat')  # a truncated verdict is checked again, not trusted or fatal
    assert Engine.load(bundle).generate("def f(x):", max_new_tokens=20).token_ids == ar.token_ids
    assert json.loads(cached.read_text())["data"]["max_rows"] == MAX_ROWS
    # An altered verdict that is still well-formed JSON fails its checksum and is checked again, not trusted.
    altered = cached.read_text().replace(f'"max_rows": {MAX_ROWS}', '"max_rows": 16')
    assert altered != cached.read_text()
    cached.write_text(altered)
    assert Engine.load(bundle).check_pass_sizes()["max_rows"] == MAX_ROWS


def _digest(data) -> str:
    """The checksum runtime/cache.py keeps beside an entry's data, written here by hand to plant an entry."""
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


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
    assert engine.pass_check["mismatched"] == [2] and engine.pass_check["max_rows"] == 1
    for mode in ("ngram", "spec", "staged"):
        with pytest.raises(ModeError, match="cannot reproduce"):
            engine.generate("def f(x):", max_new_tokens=8, mode=mode)


def test_the_cache_key_names_this_cpu(tiny_bundle, tmp_path):
    """A verdict holds only for the CPU that made it (kernels differ between AVX2, AVX-512 and AMX): a bundle
    copied to another machine checks again instead of trusting the export machine's verdict."""
    from edgespec.runtime.machine import cpu_tag

    bundle = _copy(tiny_bundle, tmp_path)
    engine = Engine.load(bundle)
    engine.check_pass_sizes()
    (cached,) = (bundle / "cache").glob("pass-check.target-*.json")
    assert f"-cpu{cpu_tag()}-" in cached.name
    foreign = cached.with_name(cached.name.replace(f"-cpu{cpu_tag()}-", "-cpu0000000000-"))
    cached.rename(foreign)
    Engine.load(bundle).check_pass_sizes()
    assert cached.is_file()  # checked again under this CPU's key


@pytest.fixture(scope="module")
def tiny_int4_bundle(tiny_dir, tmp_path_factory):
    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    return export_bundle(str(tiny_dir), tmp_path_factory.mktemp("int4") / "b",
                         options=ExportOptions(quant="int4", max_context=256, log=quiet), parity=False)


def test_int4_passes_are_padded_where_this_cpu_needs_it(tiny_int4_bundle, tmp_path):
    """4-bit MatMulNBits computes a one-row pass apart from wider passes on AVX2 CPUs without VNNI (two or
    more rows agree with each other); the check then pads every pass to two rows, and speculation equals `ar`.
    On CPUs whose one-row kernel agrees it pads nothing. Either way the chosen padding must pass the check."""
    runner = ModelRunner.open(load_manifest(tiny_int4_bundle), "target", SessionConfig(cache_optimized=False))
    verdict = check_runner(runner)
    print(isa_summary(), cpu_description(), verdict)
    assert verdict["mismatched"] == [] and verdict["max_rows"] == MAX_ROWS
    assert runner.input_rows == verdict["input_rows"]
    assert pass_size_mismatches(runner)[1] == []
    runner.pad_passes(1)
    unpadded = pass_size_mismatches(runner)[1]
    assert (verdict["input_rows"] == 2) == bool(unpadded)  # padding only where one-row passes disagree
    flags = set(cpu_description()[1])
    if "avx2" in flags and not flags & {"avx512f", "avx_vnni"}:  # measured on AVX2-only AMD EPYC: always
        assert verdict["input_rows"] == 2 and unpadded == [2]
    engine = Engine.load(_copy(tiny_int4_bundle, tmp_path))
    prompt = "def reverse(s):"
    ar = engine.generate(prompt, max_new_tokens=40)
    for mode in ("ngram",):
        assert engine.generate(prompt, max_new_tokens=40, mode=mode).token_ids == ar.token_ids
    assert engine.target.input_rows == verdict["input_rows"]


def test_a_static_shape_target_is_checked_and_refused_for_lossless_modes_where_it_fails(tiny_dir, tmp_path):
    """NPU bundles run a one-token pass and a k-token pass through different fixed-shape graphs, so rounding
    may differ between them (it does on our CPUs) and capping cannot remove that. Where the check finds it, the
    lossless modes refuse (saying what to use instead) and `auto` runs ar steps; where it passes, they equal `ar`."""
    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    options = ExportOptions(quant="fp32", device="npu", static_chunk=8, max_context=128, log=quiet)
    bundle = export_bundle(str(tiny_dir), tmp_path / "npu", derive_layers=1, parity=False, options=options)
    engine = Engine.load(bundle, device="cpu")
    ar = engine.generate("def f(x):", max_new_tokens=20, mode="ar")
    check = engine.pass_check
    assert not engine.target.fused and engine.target.max_chunk == 8
    assert check["checked"] == list(range(2, min(check["mismatched"] or [8]) + 1))
    auto = engine.generate("def f(x):", max_new_tokens=20)
    assert auto.token_ids == ar.token_ids
    if check["mismatched"]:
        assert not engine.exact_passes
        for mode in ("spec", "staged", "ngram", "ead-spec"):
            with pytest.raises(ModeError, match=r'cannot reproduce.*static-shape \(NPU\).*mode="auto"'):
                engine.generate("def f(x):", max_new_tokens=20, mode=mode)
        assert set(auto.stats["auto"]["steps_by_kind"]) == {"ar"} and "pass-size check" in auto.stats["auto"]["why_ar"]
    else:
        assert engine.exact_passes
        assert engine.generate("def f(x):", max_new_tokens=20, mode="staged").token_ids == ar.token_ids
