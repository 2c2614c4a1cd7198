"""The bundle cache (runtime/cache.py): entries are named by what they depend on and checked before use."""

from __future__ import annotations

import shutil

from edgespec.runtime.engine import Engine


def _copy(bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("cache"))
    return out


def _generate(bundle) -> tuple[str, list[int]]:
    engine = Engine.load(bundle)
    return engine.target.load_info["cache"], engine.generate("def f(x):", max_new_tokens=12, mode="ar").token_ids


def test_optimized_graphs_are_reused_only_while_their_digests_match(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    state, ids = _generate(bundle)
    assert state == "written"
    (graph,) = (bundle / "cache").glob("optimized.target_fused-*.onnx")
    weights, sums = graph.with_name(graph.name + ".data"), graph.with_name(graph.name + ".sha256")
    assert weights.is_file() and sums.is_file()
    assert _generate(bundle) == ("hit", ids)
    data = bytearray(weights.read_bytes())  # a damaged copy is optimized again, not loaded
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    assert _generate(bundle) == ("written", ids)
    assert _generate(bundle) == ("hit", ids)
    sums.unlink()  # a copy whose digests were never written was never finished
    assert _generate(bundle) == ("written", ids)


def test_measurements_name_the_machine_facts_they_depend_on(tiny_pair_bundle, tmp_path):
    from edgespec.runtime.machine import cpu_tag

    bundle = _copy(tiny_pair_bundle, tmp_path)
    engine = Engine.load(bundle, threads=1)
    engine.generate("def f(x):", max_new_tokens=4)  # the default mode measures pass costs and checks pass sizes
    names = sorted(p.name for p in (bundle / "cache").glob("*.json"))
    assert [n.split(".")[0] for n in names] == ["cost-curves", "pass-check"]
    for name in names:
        assert f"-t1-cpu{cpu_tag()}" in name and name.count("target-") == 1
    assert "-draft-" in names[0] and "-ort" in names[1]
