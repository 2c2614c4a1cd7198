"""GGUF round trips: a tiny llama written in each common quantization loads, exports and carries its blocks exactly.

Each file holds one block type for every 2-D weight (or llama.cpp's Q4_K_M mix), a byte-level char tokenizer and
the ChatML template. The fp32 bundle must reproduce the torch model transformers loads from the same file; the int4
bundle must carry every linear whose blocks MatMulNBits can hold, checked tensor by tensor against the weights
transformers dequantized, and say per linear what it did with the others.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from arch_models import CHARS
from conftest import quiet
from gguf_files import Q, write_llama_gguf
from onnx import numpy_helper
from tiny import make_tokenizer_json

from edgespec.export.bundle import ExportOptions
from edgespec.export.cli import export_bundle
from edgespec.export.graph import build_decoder
from edgespec.export.sources import load
from edgespec.quant.gguf_exact import UnsupportedGGUFError, carry_gguf_blocks
from edgespec.runtime.bundle import load_manifest
from edgespec.runtime.engine import Engine

MAX_CONTEXT = 128
Q4_K_M = {"attn_v": Q.Q6_K, "ffn_down": Q.Q6_K, "output": Q.Q6_K}  # llama.cpp's mix, on a two-layer model
CASES = {name: ({}, getattr(Q, name)) for name in
         ("F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")}
CASES["Q4_K_M"] = (Q4_K_M, Q.Q4_K)
NOT_BLOCKS = ("F16", "BF16")  # nothing to carry: int4 re-quantizes them with RTN


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(rope_parameters: dict | None = None):
    """A random llama whose rows are multiples of 256 (k-quant super-blocks), with a separate LM head."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = len(make_tokenizer_json(CHARS)["model"]["vocab"])
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=1,
                                  eos_token_id=2, pad_token_id=0, rope_parameters=rope_parameters)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def torch_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def gguf_files(torch_model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    return {name: write_llama_gguf(root / f"tiny-{name}.gguf", torch_model, types, default, CHARS)
            for name, (types, default) in CASES.items()}


def _nbits_weight(model: onnx.ModelProto, linear: str) -> np.ndarray:
    """The [N, K] weight a MatMulNBits node (default zero point) plus its block-offset term computes with."""
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.name.startswith(linear + "_Q"))
    a = {x.name: x.i for x in node.attribute}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]].reshape(a["N"], -1)
    if a["bits"] == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32) - 8
    else:
        codes = packed.astype(np.float32) - 128
    w = codes.reshape(a["N"], -1, a["block_size"]) * scales[..., None]
    if f"{linear}.block_offsets" in inits:
        w = w + inits[f"{linear}.block_offsets"].T[..., None]
    return w.reshape(a["N"], a["K"])


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_loads_and_fp32_export_matches_its_torch_model(gguf_files, tmp_path, case):
    """transformers dequantizes the file; the fp32 bundle computes what that torch model computes, and keeps the
    file's chat template and special tokens."""
    loaded = load(str(gguf_files[case]))
    assert loaded.spec.architecture == "llama" and loaded.tokenizer.chat_template
    out = export_bundle(str(gguf_files[case]), tmp_path / "fp32", options=ExportOptions(quant="fp32",
                        max_context=MAX_CONTEXT, log=quiet), parity=True, preloaded={str(gguf_files[case]): loaded})
    manifest = load_manifest(out)
    parity = manifest.raw["models"]["target"]["graphs"]["fused"]["parity"]
    assert parity["top1_agreement"] == 1.0 and parity["max_logit_error"] < 1e-3, parity
    assert manifest.tokenizer["eos_token"] == "<|im_end|>" and manifest.tokenizer["chat_template"]


@pytest.mark.parametrize("case", [c for c in CASES if c not in NOT_BLOCKS])
def test_gguf_blocks_carried_exactly_tensor_by_tensor(gguf_files, case):
    loaded = load(str(gguf_files[case]))
    graph = build_decoder(loaded.spec, loaded.weights, loaded.rope(MAX_CONTEXT), MAX_CONTEXT)
    carried, info = carry_gguf_blocks(graph, gguf_files[case], loaded.spec)
    assert info["weights"] == "gguf-exact"
    fp32 = {n.name: numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == n.input[1]))
            for n in graph.graph.node if n.name in info["linears"]}
    for linear, entry in info["linears"].items():
        four_bit = all(t in ("Q4_0", "Q4_1", "Q4_K") for t in entry["gguf_types"])
        size = 16 if "Q6_K" in entry["gguf_types"] else 32
        assert entry["carried"] == f"{4 if four_bit else 8}-bit blocks of {size}", (linear, entry)
        expected = fp32[linear].T  # what transformers dequantized from the file
        np.testing.assert_allclose(_nbits_weight(carried, linear), expected, rtol=0,
                                   atol=1e-6 * np.abs(expected).max(), err_msg=linear)


@pytest.mark.parametrize("case", ["F16", "Q4_K_M", "Q5_1"])
def test_int4_bundle_from_gguf_says_per_linear_what_it_did(gguf_files, tmp_path, case):
    out = export_bundle(str(gguf_files[case]), tmp_path / "int4", options=ExportOptions(quant="int4",
                        max_context=MAX_CONTEXT, log=quiet), parity=True)
    quant = load_manifest(out).target.quantization
    if case in NOT_BLOCKS:
        assert quant["weights"] == "rtn"  # no block to carry: re-quantized, as before
    else:
        assert quant["weights"] == "gguf-exact" and all("carried" in v for v in quant["linears"].values())
        assert quant["linears"]["layers.0.qkv_proj"]["gguf_types"] == [CASES[case][1].name] * 2 + \
            [CASES[case][0].get("attn_v", CASES[case][1]).name]
    assert len(Engine.load(out).generate("def f(x):", max_new_tokens=8, mode="ar").token_ids) == 8


@pytest.mark.parametrize("case", ["Q4_1", "Q4_K_M", "Q8_0"])
def test_int8_bundle_from_gguf_carries_every_block_as_8_bit_exactly(gguf_files, tmp_path, case):
    """--quant int8 rounds nothing a second time either: 4-bit codes are written as 8-bit codes of the same value,
    so every linear computes the file's weights (as transformers dequantized them) in the 8-bit kernel."""
    loaded = load(str(gguf_files[case]))
    out = export_bundle(str(gguf_files[case]), tmp_path / "int8", options=ExportOptions(quant="int8",
                        max_context=MAX_CONTEXT, log=quiet), parity=False, preloaded={str(gguf_files[case]): loaded})
    quant = load_manifest(out).target.quantization
    assert quant["weights"] == "gguf-exact" and quant["linears_by_bits"]["4"] == 0
    size = {"Q4_1": 32, "Q4_K_M": 16, "Q8_0": 32}[case]
    assert quant["linears"]["layers.0.qkv_proj"]["carried"] == f"8-bit blocks of {size}"
    graph = onnx.load(str(out / load_manifest(out).target.graphs["fused"].file))
    fp32 = build_decoder(loaded.spec, loaded.weights, loaded.rope(MAX_CONTEXT), MAX_CONTEXT)
    weights = {n.name: numpy_helper.to_array(next(t for t in fp32.graph.initializer if t.name == n.input[1]))
               for n in fp32.graph.node if n.name in quant["linears"]}
    for linear, expected in weights.items():
        np.testing.assert_allclose(_nbits_weight(graph, linear), expected.T, rtol=0,
                                   atol=1e-6 * np.abs(expected).max(), err_msg=linear)
    assert len(Engine.load(out).generate("def f(x):", max_new_tokens=8, mode="ar").token_ids) == 8


def test_carry_leaves_other_types_to_rtn_and_says_why(torch_model, tmp_path):
    path = write_llama_gguf(tmp_path / "mixed.gguf", torch_model, {"ffn_down": Q.F16}, Q.Q4_K, CHARS)
    loaded = load(str(path))
    graph = build_decoder(loaded.spec, loaded.weights, loaded.rope(MAX_CONTEXT), MAX_CONTEXT)
    carried, info = carry_gguf_blocks(graph, path, loaded.spec)
    assert info["weights"] == "gguf-exact where the blocks allow, rtn elsewhere"
    assert info["linears"]["layers.0.down_proj"] == {"gguf_types": ["F16"], "rtn": "F16 blocks are not carried"}
    assert "carried" in info["linears"]["layers.0.gate_up_proj"]
    left = [n.name for n in carried.graph.node if n.op_type == "MatMul" and n.name.endswith("down_proj")]
    assert left == ["layers.0.down_proj", "layers.1.down_proj"]
    f16 = write_llama_gguf(tmp_path / "f16.gguf", torch_model, {}, Q.F16, CHARS)
    with pytest.raises(UnsupportedGGUFError, match="no linear"):
        carry_gguf_blocks(graph, f16, loaded.spec)


def test_llama3_rope_freqs_tensor_is_applied(tmp_path):
    """llama.cpp stores Llama 3.1+ RoPE scaling as `rope_freqs` divisors, which transformers' GGUF loader drops;
    the export applies them, so the bundle computes what the original llama3-scaled torch model computes."""
    import torch

    from edgespec.export.rope import inverse_frequencies, rope_from_parameters

    params = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
    model = tiny_llama(params)
    base = rope_from_parameters({"rope_type": "default", "rope_theta": 10000.0}, 64, 1024)
    scaled = rope_from_parameters(params, 64, 1024)
    divisors = inverse_frequencies(base, 64)[0] / inverse_frequencies(scaled, 64)[0]  # as convert_hf_to_gguf.py
    path = write_llama_gguf(tmp_path / "llama3.gguf", model, {}, Q.F32, CHARS, extra={"rope_freqs.weight": divisors})
    loaded = load(str(path))
    assert loaded.spec.rope["default"].scaling == "longrope"
    out = export_bundle(str(path), tmp_path / "b", options=ExportOptions(quant="fp32", max_context=512, log=quiet),
                        parity=False, preloaded={str(path): loaded})
    seq = [int(t) for t in np.random.default_rng(0).integers(3, 80, 300)]
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits[0, -1].numpy()
    engine = Engine.load(out)
    np.testing.assert_allclose(engine.target.prefill(seq), ref, atol=1e-3)


def _export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgespec.export.cli", *args], capture_output=True, text=True,
                          timeout=600)


def _assert_refused(proc: subprocess.CompletedProcess, out, needle: str) -> None:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("edge-export")]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_unknown_quantization_type_is_refused(torch_model, tmp_path):
    path = write_llama_gguf(tmp_path / "tq.gguf", torch_model, {"ffn_up": Q.TQ1_0}, Q.Q8_0, CHARS)
    out = tmp_path / "out"
    _assert_refused(_export_cli("--target", str(path), "--out", str(out)), out,
                    "unsupported GGUF quantization type TQ1_0 (tensor blk.0.ffn_up.weight)")


def test_tensor_shapes_that_disagree_with_the_metadata_are_refused(torch_model, tmp_path):
    path = write_llama_gguf(tmp_path / "lie.gguf", torch_model, {}, Q.Q8_0, CHARS, feed_forward_length=1024)
    out = tmp_path / "out"
    _assert_refused(_export_cli("--target", str(path), "--out", str(out)), out,
                    "tensor blk.0.ffn_gate.weight")
