"""Execution-provider detection and placement.

Three layers: the rules (pure functions over provider names, checked on made-up machines such as a
phone with the QNN plugin or a Mac with CoreML), the real onnxruntime of this environment (which
offers only the CPU provider), and OpenVINO for real when its provider is installed (the
onnxruntime-openvino build; see the skip reason).
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgespec.devices.detect import Available, detect
from edgespec.devices.placement import (
    Candidate,
    DevicePlacementError,
    classes_served,
    node_assignment,
    open_session,
    order,
    parse_device,
    plan,
    resolve_options,
)
from edgespec.devices.registry import ENTRIES, FUSED, REGISTRY, STATIC
from edgespec.devices.report import describe, render_text
from edgespec.runtime.bundle import load_manifest
from edgespec.runtime.cli import devices

CPU = "CPUExecutionProvider"
PLAIN = Available("1.32.0", ("AzureExecutionProvider", CPU), hardware={CPU: ("CPU",)})
PHONE_QNN = Available("1.32.0", ("XnnpackExecutionProvider", CPU), plugins={"QNNExecutionProvider": "onnxruntime_qnn"},
                      hardware={CPU: ("CPU",), "QNNExecutionProvider": ("GPU", "NPU")})
MAC = Available("1.32.0", ("CoreMLExecutionProvider", CPU), hardware={CPU: ("CPU",)})
INTEL_OV_PLUGIN = Available("1.32.0", (CPU,), plugins={"OpenVINOExecutionProvider": "onnxruntime_ep_openvino"},
                            hardware={CPU: ("CPU",), "OpenVINOExecutionProvider": ("CPU", "GPU", "NPU")})
AMD_OV_PLUGIN = Available("1.32.0", (CPU,), plugins={"OpenVINOExecutionProvider": "onnxruntime_ep_openvino"},
                          hardware={CPU: ("CPU",), "OpenVINOExecutionProvider": ()})
OV_BUILD = Available("1.24.1", ("OpenVINOExecutionProvider", CPU),
                     hardware={CPU: ("CPU",), "OpenVINOExecutionProvider": ("CPU",)})
WINDOWS_GPU = Available("1.32.0", ("DmlExecutionProvider", "CUDAExecutionProvider", CPU), hardware={CPU: ("CPU",)})

HAS_OPENVINO_CPU = "openvino-cpu" in classes_served(detect())["cpu"]
needs_openvino = pytest.mark.skipif(
    not HAS_OPENVINO_CPU, reason="OpenVINO CPU is not available: run in an environment with onnxruntime-openvino "
                                 "(the onnxruntime-ep-openvino plugin offers no device on non-Intel CPUs)")


@pytest.mark.parametrize("machine, device, variants, key, variant", [
    (PHONE_QNN, "npu", [STATIC], "qnn-htp", STATIC),
    (PHONE_QNN, "gpu", [STATIC], "qnn-gpu", STATIC),
    (PHONE_QNN, "auto", [STATIC], "qnn-htp", STATIC),
    (PHONE_QNN, "npu", [FUSED], "xnnpack", FUSED),  # QNN cannot run contrib ops: a CPU bundle stays on the CPU
    (PHONE_QNN, "auto", [FUSED], "xnnpack", FUSED),
    (PHONE_QNN, "cpu", [STATIC], "xnnpack", STATIC),
    (MAC, "npu", [STATIC], "coreml-ane", STATIC),
    (MAC, "gpu", [STATIC], "coreml-gpu", STATIC),
    (MAC, "npu", [FUSED], "default-cpu", FUSED),
    (INTEL_OV_PLUGIN, "npu", [STATIC], "openvino-npu", STATIC),
    (INTEL_OV_PLUGIN, "gpu", [STATIC], "openvino-gpu", STATIC),
    (INTEL_OV_PLUGIN, "cpu", [FUSED], "default-cpu", FUSED),  # OpenVINO would leave attention to the CPU
    (INTEL_OV_PLUGIN, "cpu", [FUSED, STATIC], "openvino-cpu", STATIC),  # it takes a static graph whole
    (INTEL_OV_PLUGIN, "openvino-cpu", [FUSED], "default-cpu", FUSED),
    (AMD_OV_PLUGIN, "cpu", [FUSED], "default-cpu", FUSED),  # registered, but it enumerated no device
    (OV_BUILD, "npu", [STATIC], "openvino-cpu", STATIC),  # OpenVINO lists only its CPU: no NPU entry
    (WINDOWS_GPU, "gpu", [FUSED], "directml", FUSED),
    (WINDOWS_GPU, "auto", [FUSED], "directml", FUSED),
    (WINDOWS_GPU, "gpu", [STATIC], "default-cpu", STATIC),  # DirectML/CUDA entries take fused graphs only
    (PLAIN, "gpu", [FUSED], "default-cpu", FUSED),
    (PLAIN, "openvino-cpu", [FUSED], "default-cpu", FUSED),
    (PLAIN, "CPU", [STATIC], "default-cpu", STATIC),
])
def test_first_candidate_on_made_up_machines(machine, device, variants, key, variant):
    placement = plan(device, machine, {"target": variants})["target"]
    assert (placement.first.key, placement.first.variant) == (key, variant)
    assert placement.candidates[-1].key == "default-cpu"  # without strict, everything ends on the CPU provider
    assert all(machine.has(c.provider) for c in placement.candidates)


@pytest.mark.parametrize("machine, device, variants, needle", [
    (PLAIN, "npu", [FUSED], "npu: none"),
    (PHONE_QNN, "npu", [FUSED], "needs a static graph; the target has fused"),
    (AMD_OV_PLUGIN, "openvino-cpu", [STATIC], "found no CPU here (it has no device)"),
    (OV_BUILD, "openvino-cpu", [FUSED], "needs a static graph; the target has fused"),
    (MAC, "gpu", [FUSED], "CoreMLExecutionProvider"),
])
def test_strict_plan_refuses_with_what_is_available(machine, device, variants, needle):
    with pytest.raises(DevicePlacementError) as err:
        plan(device, machine, {"target": variants}, strict=True)
    assert needle in str(err.value)
    assert "Available here: onnxruntime" in str(err.value)


@pytest.mark.parametrize("machine, device, variants, key, full_offload", [
    (PHONE_QNN, "npu", [STATIC], "qnn-htp", True),
    (PLAIN, "cpu", [FUSED], "default-cpu", False),
    (PLAIN, "default-cpu", [FUSED], "default-cpu", False),
    (OV_BUILD, "cpu", [STATIC], "openvino-cpu", False),  # the CPU class may leave nodes to the CPU provider
    (OV_BUILD, "openvino-cpu", [STATIC], "openvino-cpu", True),  # naming the provider asks for all of the graph
])
def test_strict_plan_has_one_candidate(machine, device, variants, key, full_offload):
    placement = plan(device, machine, {"target": variants}, strict=True)["target"]
    assert [(c.key, c.full_offload) for c in placement.candidates] == [(key, full_offload)]


def test_draft_and_target_are_placed_independently():
    placements = plan({"target": "cpu", "draft": "npu"}, PHONE_QNN, {"target": [FUSED], "draft": [STATIC]})
    assert placements["target"].first.key == "xnnpack"
    assert placements["draft"].first.key == "qnn-htp"
    assert set(plan("auto", PLAIN, [FUSED])) == {"target", "draft"}
    assert set(plan({"draft": "gpu"}, PLAIN, {"draft": [FUSED]})) == {"draft"}


def test_order_rules():
    for request in ("npu", "gpu"):
        chain = [e.key for e in order(request, strict=False)]
        assert chain[:len(REGISTRY[request])] == [e.key for e in REGISTRY[request]]
        assert chain[len(REGISTRY[request]):] == [e.key for e in REGISTRY["cpu"]]
        assert {e.device_class for e in order(request, strict=True)} == {request}
    auto = [e.key for e in order("auto", strict=False)]
    assert auto == [e.key for c in ("npu", "gpu", "cpu") for e in REGISTRY[c]]
    assert [e.key for e in order("openvino-cpu", strict=True)] == ["openvino-cpu"]
    assert [e.key for e in order("openvino-cpu", strict=False)] == ["openvino-cpu", "xnnpack", "default-cpu"]


def test_registry_variants_match_what_providers_can_run():
    for entry in ENTRIES.values():
        assert set(entry.variants) <= {FUSED, STATIC} and entry.variants
        if entry.static_shapes or entry.device_class == "npu":
            assert entry.variants == (STATIC,), entry.key  # NPUs need fixed shapes and plain operators
    # only these implement GroupQueryAttention/RotaryEmbedding/MatMulNBits among the GPU providers
    assert {e.key for e in REGISTRY["gpu"] if FUSED in e.variants} == {"webgpu", "directml", "cuda"}
    assert "NnapiExecutionProvider" not in {e.provider for e in ENTRIES.values()}  # deprecated in Android 15
    assert REGISTRY["cpu"][-1].provider == CPU


@pytest.mark.parametrize("device", ["tpu", {"verifier": "cpu"}, {"target": "quantum"}, 3])
def test_bad_device_is_a_clear_error(device):
    with pytest.raises(ValueError, match="device"):
        parse_device(device)


def test_bad_graph_variants_are_clear_errors():
    with pytest.raises(ValueError, match="no graphs"):
        plan("cpu", PLAIN, {"target": []})
    with pytest.raises(ValueError, match="roles"):
        plan("cpu", PLAIN, {"verifier": [FUSED]})


def test_resolve_options(tmp_path):
    assert resolve_options(ENTRIES["xnnpack"], threads=4) == {"intra_op_num_threads": "4"}
    builtin = resolve_options(ENTRIES["openvino-cpu"], threads=2, cache_dir=tmp_path)
    assert builtin == {"device_type": "CPU", "num_of_threads": "2", "cache_dir": str(tmp_path / "openvino-cpu")}
    assert (tmp_path / "openvino-cpu").is_dir()
    plugin = resolve_options(ENTRIES["openvino-npu"], threads=2, plugin=True)
    assert "device_type" not in plugin  # the chosen OrtEpDevice selects the NPU
    assert resolve_options(ENTRIES["qnn-htp"], threads=2, cache_dir=tmp_path)["backend_type"] == "htp"


# --- the real onnxruntime of this environment ---

def test_detect_reports_what_onnxruntime_offers():
    available = detect()
    assert available.builtin == tuple(ort.get_available_providers())
    assert available.onnxruntime == ort.__version__
    assert "CPU" in available.hardware[CPU]
    assert {d.ep_name for d in ort.get_ep_devices()} <= set(available.hardware)
    assert json.loads(json.dumps(available.to_json()))["builtin"] == list(available.builtin)


@pytest.mark.parametrize("request_", ["auto", "cpu", "npu", "gpu"])
def test_plan_against_the_real_provider_list(request_):
    available = detect()
    placement = plan(request_, available, {"target": [FUSED]})["target"]
    served = sum(classes_served(available).values(), [])
    usable = [e.key for e in order(request_, strict=False) if e.key in served and FUSED in e.variants]
    assert [c.key for c in placement.candidates] == usable
    assert placement.candidates[-1].provider == CPU
    assert {c.provider for c in placement.candidates} <= set(ort.get_available_providers())


@pytest.fixture
def small_graph(tmp_path):
    """y = relu(x @ w): plain operators every provider runs."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10 - 0.5
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Relu", ["m"], ["y"])], "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path / "small.onnx"
    onnx.save(model, str(path))
    return path, w


@pytest.mark.skipif(bool(classes_served(detect())["npu"]), reason="this machine has an NPU provider")
def test_strict_npu_here_is_an_error_listing_what_is_available():
    with pytest.raises(DevicePlacementError) as err:
        plan("npu", detect(), {"target": [FUSED]}, strict=True)
    message = str(err.value)
    assert "strict placement on 'npu'" in message
    assert f"onnxruntime {ort.__version__} offers" in message and CPU in message
    assert "qnn-htp: QNNExecutionProvider is not in this onnxruntime (plugin package onnxruntime-qnn)" in message


@pytest.mark.skipif(bool(classes_served(detect())["npu"]), reason="this machine has an NPU provider")
def test_npu_without_strict_falls_back_with_one_line_and_runs(small_graph, caplog):
    path, w = small_graph
    placement = plan("npu", detect(), {"target": [FUSED]})["target"]
    with caplog.at_level(logging.INFO, logger="edgespec.devices"):
        session, used = open_session(path, "target", placement)
    warnings = [r for r in caplog.records if r.name == "edgespec.devices" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    line = warnings[0].getMessage()
    assert "\n" not in line and "device 'npu' fell back to" in line and "qnn-htp:" in line
    assert used.entry.device_class == "cpu" and used.provider in session.get_providers()
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], np.maximum(x @ w, 0), rtol=1e-6, atol=1e-6)


def test_auto_on_the_cpu_logs_nothing(small_graph, caplog):
    with caplog.at_level(logging.INFO, logger="edgespec.devices"):
        open_session(small_graph[0], "target", plan("cpu", detect(), {"target": [FUSED]})["target"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_each_candidate_gets_its_graph_variant(small_graph):
    path, _ = small_graph
    placement = plan("default-cpu", detect(), {"target": [STATIC]})["target"]
    session, used = open_session({STATIC: path}, "target", placement)
    assert used.variant == STATIC and session.get_inputs()[0].name == "x"
    assert node_assignment(session) == {CPU: {"MatMul": 1, "Relu": 1}}


def test_a_graph_no_provider_can_open_is_an_error(tmp_path):
    graph = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="example.nowhere")], "bad",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("example.nowhere", 1)])
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    with pytest.raises(DevicePlacementError, match="target: no provider could open the graph .*default-cpu"):
        open_session(path, "target", plan("cpu", detect(), {"target": [FUSED]})["target"])
    with pytest.raises(DevicePlacementError, match="default-cpu .* cannot run bad.onnx"):
        open_session(path, "target", Candidate(ENTRIES["default-cpu"], FUSED), strict=True)


# --- the report and `edgespec devices` ---

@pytest.fixture(scope="module")
def npu_bundle(tiny_dir, tmp_path_factory):
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    out = tmp_path_factory.mktemp("devices") / "tiny-static"
    options = ExportOptions(quant="fp32", max_context=64, device="npu", static_chunk=4, log=lambda _: None)
    return export_bundle(str(tiny_dir), out, options=options, parity=False)


def test_describe_a_fused_bundle_here(tiny_bundle):
    info = describe(load_manifest(tiny_bundle, verify=False))
    assert json.loads(json.dumps(info)) == info
    cpu = next(p for p in info["providers"] if p["name"] == CPU)
    assert cpu["serves"] == ["default-cpu"] and "CPU" in cpu["hardware"]
    target = info["bundle"]["models"]["target"]
    assert target["graphs"] == {"fused": {"variant": FUSED, "chunk": None}}
    assert target["placement"]["cpu"]["graphs"] == ["fused"] and not target["placement"]["cpu"]["fallback"]
    assert target["placement"]["npu"]["device_class"] == "cpu"
    assert target["placement"]["npu"]["fallback"] is not bool(classes_served(detect())["npu"])
    text = render_text(info)
    cpu_choice = target["placement"]["cpu"]
    assert "--device npu" in text and f"{cpu_choice['key']} ({cpu_choice['provider']}), fused graph" in text


def test_describe_a_static_bundle_on_a_phone(npu_bundle):
    info = describe(load_manifest(npu_bundle, verify=False), PHONE_QNN)
    placement = info["bundle"]["models"]["target"]["placement"]
    assert placement["npu"] == {**placement["npu"], "key": "qnn-htp", "variant": STATIC,
                                "graphs": ["static-1", "static-4"], "fallback": False}
    assert placement["cpu"]["key"] == "xnnpack"
    assert info["classes"] == {"npu": ["qnn-htp"], "gpu": ["qnn-gpu"], "cpu": ["xnnpack", "default-cpu"]}


def test_cli_json(tiny_bundle, capsys):
    assert devices(argparse.Namespace(json=True, bundle=str(tiny_bundle))) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["onnxruntime"] == ort.__version__ and "target" in info["bundle"]["models"]


# --- OpenVINO for real ---

@pytest.fixture(scope="module")
def tiny_graphs(tiny_dir, tmp_path_factory):
    """The tiny model's fused graph and a static graph with chunk 4, fp32, 64-slot KV buffer."""
    from edgespec.export.graph import build_decoder
    from edgespec.export.sources import load

    loaded = load(str(tiny_dir))
    root = tmp_path_factory.mktemp("graphs")
    paths = {}
    for variant, chunk in ((FUSED, None), (STATIC, 4)):
        paths[variant] = root / f"{variant}.onnx"
        onnx.save(build_decoder(loaded.spec, loaded.weights, loaded.rope(64), 64, variant, chunk), str(paths[variant]))
    return paths, loaded.spec


def _greedy(session, spec, chunk, prompt, steps, max_context=64):
    """Prompt then greedy steps against a preallocated KV buffer (docs/kv-interface.md); returns tokens, logits."""
    shape = (1, spec.num_kv_heads, max_context, spec.head_dim)
    kv = [np.zeros(shape, np.float32) for _ in range(2 * spec.num_layers)]
    length, tokens, rows = 0, list(prompt), []
    for step in range(steps + 1):
        new = tokens if step == 0 else tokens[-1:]
        n, width = len(new), chunk or len(new)
        ids = np.array(new + [0] * (width - n), np.int64)[None]
        pos = np.concatenate([np.arange(length, length + n), np.full(width - n, length + n - 1)])[None]
        mask = np.eye(width, dtype=bool)
        mask[:n, :n] = np.tri(n, dtype=bool)
        feeds = {"input_ids": ids, "position_ids": pos.astype(np.int64), "attention_mask": mask,
                 "past_length": np.array([length], np.int64)}
        if any(i.name == "logits_from" for i in session.get_inputs()):  # fused graphs: logits for every row
            feeds["logits_from"] = np.array([0], np.int64)
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        news = []
        for i, buf in enumerate(kv):
            name = f"{'key' if i % 2 == 0 else 'value'}.{i // 2}"
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            binding.bind_ortvalue_input("past_" + name, value)
            if chunk is None:
                binding.bind_ortvalue_output("present_" + name, value)
            else:
                news.append(np.zeros(shape[:2] + (width, shape[3]), np.float32))
                binding.bind_ortvalue_output("new_" + name, ort.OrtValue.ortvalue_from_numpy(news[-1]))
        logits = np.zeros((1, width, spec.vocab_size), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        session.run_with_iobinding(binding)
        for buf, rows_new in zip(kv, news, strict=False):
            buf[:, :, length:length + n] = rows_new[:, :, :n]
        length += n
        rows.append(logits[0, n - 1].copy())
        tokens.append(int(np.argmax(logits[0, n - 1])))
    return tokens[len(prompt):], np.stack(rows)


PROMPT = [5, 17, 33, 8]


@needs_openvino
def test_draft_on_openvino_target_on_cpu_agree(tiny_graphs, tmp_path, caplog):
    paths, spec = tiny_graphs
    placements = plan({"target": "default-cpu", "draft": "openvino-cpu"}, detect(), [FUSED, STATIC], strict=True)
    with caplog.at_level(logging.INFO, logger="edgespec.devices"):
        target, t_used = open_session(paths, "target", placements["target"])
        draft, d_used = open_session(paths, "draft", placements["draft"], cache_dir=tmp_path)
    assert not caplog.records  # both where asked, nothing left behind
    assert (t_used.key, t_used.variant, d_used.key, d_used.variant) == ("default-cpu", FUSED, "openvino-cpu", STATIC)
    assert d_used.full_offload and set(node_assignment(draft)) == {"OpenVINOExecutionProvider"}
    assert list((tmp_path / "openvino-cpu").iterdir())  # OpenVINO's compiled blob
    t_tokens, t_logits = _greedy(target, spec, None, PROMPT, 12)
    d_tokens, d_logits = _greedy(draft, spec, 4, PROMPT, 12)
    assert t_tokens == d_tokens
    np.testing.assert_allclose(d_logits, t_logits, atol=1e-4)


@needs_openvino
def test_openvino_leaves_attention_to_the_cpu_and_strict_refuses_that(tiny_graphs, caplog):
    paths, spec = tiny_graphs
    with caplog.at_level(logging.INFO, logger="edgespec.devices"):
        session, _ = open_session(paths[FUSED], "draft", Candidate(ENTRIES["openvino-cpu"], FUSED))
    assigned = node_assignment(session)
    assert assigned[CPU] == {"GroupQueryAttention": spec.num_layers}  # it also rotates q and k
    assert "MatMul" in assigned["OpenVINOExecutionProvider"]
    assert any("GroupQueryAttention x2" in r.getMessage() for r in caplog.records)
    reference, _ = open_session(paths[FUSED], "target", Candidate(ENTRIES["default-cpu"], FUSED))
    np.testing.assert_allclose(_greedy(session, spec, None, PROMPT, 8)[1], _greedy(reference, spec, None, PROMPT, 8)[1],
                               atol=1e-4)
    with pytest.raises(DevicePlacementError, match="cannot take the whole graph"):
        open_session(paths[FUSED], "draft", Candidate(ENTRIES["openvino-cpu"], FUSED, full_offload=True))


@needs_openvino
def test_staged_is_lossless_with_the_draft_on_openvino(tiny_dir, tmp_path):
    """Cross-provider placement through the Engine: draft graphs on OpenVINO, target on the default CPU provider.
    Where the static target's one-row and k-row graphs round apart (the pass-size check), `staged` refuses instead
    (tests/test_selfcheck.py) and the draft runs alone on OpenVINO."""
    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle
    from edgespec.runtime.engine import Engine, ModeError

    options = ExportOptions(quant="fp32", device="npu", static_chunk=8, max_context=128, log=quiet)
    bundle = export_bundle(str(tiny_dir), tmp_path / "npu", derive_layers=1, parity=False, options=options)
    engine = Engine.load(bundle, device={"target": "default-cpu", "draft": "openvino-cpu"}, strict=True)
    assert engine.draft.load_info["provider"] == "openvino-cpu"
    assert engine.target.load_info["provider"] == "default-cpu"
    for prompt in ("hello", "def f(x):", "ab ab ab ab ab"):
        ar = engine.generate(prompt, max_new_tokens=30, mode="ar")
        if not engine.exact_passes:
            with pytest.raises(ModeError, match="static-shape"):
                engine.generate(prompt, max_new_tokens=30, mode="staged")
            assert engine.generate(prompt, max_new_tokens=30, mode="ar", model="draft").stats["draft_passes"] > 0
            continue
        for options in ({}, {"depth": 4}):
            r = engine.generate(prompt, max_new_tokens=30, mode="staged", **options)
            assert r.token_ids == ar.token_ids
            assert r.stats["draft_passes"] > 0 or not options
