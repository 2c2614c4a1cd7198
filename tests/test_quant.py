"""edgespec.quant on tiny models: op types, logits against fp32, GGUF blocks carried exactly, batch consistency."""

from __future__ import annotations

import gguf
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from tiny import make_tiny_model_dir

from edgespec.export.graph import build_decoder
from edgespec.export.sources import load
from edgespec.quant.embedding import dequantize_q8, q8_blocks, quantize_embedding
from edgespec.quant.fp16 import to_fp16
from edgespec.quant.gguf_exact import UnsupportedGGUFError, carry_gguf_blocks
from edgespec.quant.qdq import MASK_FLOOR, calibration_feeds, quantize_qdq
from edgespec.quant.rowwise import quantize_rowwise
from edgespec.quant.smooth import activation_maxima, smooth_weights
from edgespec.quant.weight_only import quantize_weight_only, quantized_linear_names

MAX_CONTEXT = 64
CHUNK = 4
Q = gguf.GGMLQuantizationType
# llama.cpp tensor -> (canonical weight, block type); attn q/k/v mix all three types in one qkv_proj
GGUF_LAYOUT = {"attn_q": ("q_proj", Q.Q4_0), "attn_k": ("k_proj", Q.Q4_1), "attn_v": ("v_proj", Q.Q8_0),
               "attn_output": ("o_proj", Q.Q4_1), "ffn_gate": ("gate_proj", Q.Q4_0),
               "ffn_up": ("up_proj", Q.Q4_1), "ffn_down": ("down_proj", Q.Q4_1)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """transformers' own small initialisation: activations of the size weight quantizers are made for."""
    return load(str(make_tiny_model_dir(tmp_path_factory.mktemp("quant") / "model", init_std=None, embed_scale=8.0)))


@pytest.fixture(scope="module")
def fused(tiny) -> onnx.ModelProto:
    return build_decoder(tiny.spec, tiny.weights, tiny.rope(MAX_CONTEXT), MAX_CONTEXT)


@pytest.fixture(scope="module")
def static(tiny) -> onnx.ModelProto:
    return build_decoder(tiny.spec, tiny.weights, tiny.rope(MAX_CONTEXT), MAX_CONTEXT, variant="static", chunk=CHUNK)


@pytest.fixture(scope="module")
def tokens(tiny) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(3, tiny.spec.vocab_size, 24)]


def run_fused(model: onnx.ModelProto, tokens: list[int], step: int, pad_single: bool = False) -> np.ndarray:
    """Logits [T, V] of `tokens` fed `step` at a time, KV buffers bound as both past and present (the runtime's way).

    `pad_single` runs one-token passes as two rows (a dummy token after the real one, never kept).
    """
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    kv = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(i.shape, np.float32))
          for i in sess.get_inputs() if i.name.startswith(("past_key", "past_value"))}
    out, pos = [], 0
    while pos < len(tokens):
        chunk = tokens[pos:pos + step]
        real = len(chunk)
        if pad_single and real == 1:
            chunk = chunk + [0]
        n = len(chunk)
        b = sess.io_binding()
        b.bind_cpu_input("input_ids", np.array(chunk, np.int64)[None])
        b.bind_cpu_input("position_ids", np.arange(pos, pos + n, dtype=np.int64)[None])
        b.bind_cpu_input("attention_mask", np.tril(np.ones((n, n), bool)))
        b.bind_cpu_input("past_length", np.array([pos], np.int64))
        b.bind_cpu_input("logits_from", np.array([0], np.int64))
        b.bind_output("logits")
        for name, value in kv.items():
            b.bind_ortvalue_input(name, value)
            b.bind_ortvalue_output(name.replace("past_", "present_"), value)
        sess.run_with_iobinding(b)
        out.append(b.get_outputs()[0].numpy()[0, :real])
        pos += real
    return np.concatenate(out)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def nbits_nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def nbits_weight(model: onnx.ModelProto, linear: str) -> np.ndarray:
    """The [N, K] weight a MatMulNBits node (default zero point) plus its block-offset term computes with."""
    nodes = nbits_nodes(model)
    node = nodes.get(f"{linear}_Q4") or nodes[f"{linear}_Q8"]
    a = attrs(node)
    inits = {t.name: t for t in model.graph.initializer}
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(a["N"], -1)
    assert len(node.input) == 3, "expected the kernel's default zero point"
    if a["bits"] == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(a["N"], -1, a["block_size"])
        codes = codes.astype(np.float32) - 8
    else:
        codes = packed.reshape(a["N"], -1, a["block_size"]).astype(np.float32) - 128
    w = codes * scales[..., None]
    if f"{linear}.block_offsets" in inits:
        w = w + numpy_helper.to_array(inits[f"{linear}.block_offsets"]).T[..., None]
    return w.reshape(a["N"], a["K"])


# ---- weight-only (MatMulNBits) ----

@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_replaces_every_linear(fused, tiny, bits):
    q = quantize_weight_only(fused, bits)
    assert not [n.name for n in q.graph.node if n.op_type == "MatMul"]
    nodes = nbits_nodes(q)
    assert len(nodes) == 4 * tiny.spec.num_layers + 1
    for name, node in nodes.items():
        a = attrs(node)
        assert a["bits"] == (8 if name.startswith("lm_head") else bits)
        assert a["accuracy_level"] == 4 and a["block_size"] == 32
        assert len(node.input) == 3  # symmetric: the kernel's default zero point, which is faster
    assert any(n.op_type == "MatMul" for n in fused.graph.node), "the input model must not be modified"


@pytest.mark.parametrize("bits,bound", [(4, 0.03), (8, 0.015)])
def test_weight_only_logits_close_to_fp32(fused, tokens, bits, bound):
    # The LM head is 8-bit in both (half a step is 1/254 of a block's max |w|); 4-bit layers add up to 1/14 of a
    # block's max per weight. Measured on this model: 0.6 % (int4) and 0.3 % (int8) of the largest logit; the
    # bounds leave room for other CPUs' kernels while a wrong packing or zero point gives errors near 100 %.
    ref = run_fused(fused, tokens, len(tokens))
    got = run_fused(quantize_weight_only(fused, bits), tokens, len(tokens))
    assert rel_err(got, ref) < bound
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_quantized_multi_token_passes_are_bitwise_batch_consistent(fused, tokens):
    # Lossless speculation needs a k-token pass to give exactly the logits of smaller passes. MatMulNBits with
    # int8 activations quantizes each row by itself, so any pass of two or more rows must agree bit for bit;
    # one-row passes take another GEMV path in attention, so the runtime pads them to two rows.
    q = quantize_weight_only(fused, 4)
    ref = run_fused(q, tokens, 8)
    for step in (2, 4, 24):
        assert np.array_equal(run_fused(q, tokens, step), ref), f"chunks of {step} differ from chunks of 8"
    assert np.array_equal(run_fused(q, tokens, 1, pad_single=True), ref)


def test_weight_only_rejects_bad_options(fused, tiny):
    with pytest.raises(ValueError, match="bits"):
        quantize_weight_only(fused, 3)
    with pytest.raises(ValueError, match="block_size"):
        quantize_weight_only(fused, 4, block_size=48)
    tied = build_decoder(tiny.spec, tiny.weights, tiny.rope(MAX_CONTEXT), MAX_CONTEXT, tie_lm_head=True)
    with pytest.raises(ValueError, match="tie_lm_head=False"):
        quantize_weight_only(tied, 4)


# ---- W8A8: 8-bit weights per output channel (stored as uint8), 8-bit activations per row ----

def _w8a8_reference(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """What one quantized linear computes, in numpy: activation codes rounded half up, weight codes in [-127, 127]
    per output channel, exact integer products."""
    scale = np.maximum(np.abs(x).max(-1, keepdims=True), np.float32(1e-30)) * np.float32(1 / 127)
    codes = np.floor(x / scale + np.float32(128.5)).astype(np.int64) - 128
    ws = (np.abs(weight).max(0) / 127).astype(np.float32)
    wq = np.clip(np.rint(weight / np.where(ws == 0, 1, ws)), -127, 127).astype(np.int64)
    return (codes @ wq).astype(np.float32) * ws * scale


def _one_linear(fused: onnx.ModelProto,
                weight: np.ndarray | None = None) -> tuple[ort.InferenceSession, str, np.ndarray]:
    """(session, input name, weight) of the W8A8 down projection of layer 0 cut from the model as a one-node graph,
    with `weight` (same shape) in place of the model's if given."""
    node = next(n for n in fused.graph.node if n.name.endswith("down_proj"))
    if weight is None:
        weight = numpy_helper.to_array({t.name: t for t in fused.graph.initializer}[node.input[1]])
    graph = onnx.helper.make_graph([node], "one", [onnx.helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT,
                                                                                       [1, None, weight.shape[0]])],
                                   [onnx.helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                                   [numpy_helper.from_array(weight, node.input[1])])
    one = quantize_rowwise(onnx.helper.make_model(graph, opset_imports=fused.opset_import))
    return ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"]), node.input[0], weight


def test_w8a8_replaces_every_linear_and_computes_the_reference(fused, tiny):
    q = quantize_rowwise(fused)
    ops = [n.op_type for n in q.graph.node]
    assert "MatMul" not in ops and ops.count("MatMulIntegerToFloat") == 4 * tiny.spec.num_layers + 1
    # one activation quantizer per linear input: q/k/v share one, as do gate/up
    assert ops.count("ReduceMax") == 4 * tiny.spec.num_layers + 1
    # the down projection of layer 0 against numpy, fed through a one-linear graph cut from the model
    session, name, weight = _one_linear(fused)
    x = np.random.default_rng(0).standard_normal((1, 5, weight.shape[0])).astype(np.float32)
    x[0, 2] = 0.0  # an all-zero row quantizes to zeros, not NaN
    got = session.run(None, {name: x})[0]
    np.testing.assert_allclose(got, _w8a8_reference(x, weight), rtol=1e-5, atol=1e-6)
    assert np.all(got[0, 2] == 0)


def test_w8a8_int16_pair_sums_cannot_saturate(fused):
    # Without VNNI, onnxruntime's u8·s8 GEMM adds adjacent u8·s8 products into a saturating int16 (VPMADDUBSW):
    # activation codes 127 (u8 255) against int8 weights of one sign reach 2·255·127 = 64770 per pair, and with
    # int8 weights this test failed on AVX2 (errors of most of the result). uint8 weights take the u8·u8 GEMM,
    # exact on every CPU; the first check asserts that where the kernel would not show it (VNNI accumulates in
    # int32).
    q = quantize_rowwise(fused)
    inits = {t.name: t for t in q.graph.initializer}
    gemms = [n for n in q.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert gemms
    for node in gemms:
        weight, zero_point = inits[node.input[1]], numpy_helper.to_array(inits[node.input[5]])
        assert weight.data_type == TensorProto.UINT8 and zero_point.dtype == np.uint8 and zero_point == 128
        # the codes stay symmetric: 128 ± 127, the full 8 bits
        assert numpy_helper.to_array(weight).min() >= 1 and numpy_helper.to_array(weight).max() == 255
    shape = _one_linear(fused)[2].shape
    rng = np.random.default_rng(1)
    # columns of one sign, every weight near its column's maximum: adjacent products add up, never cancel
    weight = (rng.uniform(0.9, 1.0, shape) * np.where(np.arange(shape[1]) % 2, -1.0, 1.0)).astype(np.float32)
    session, name, _ = _one_linear(fused, weight)
    x = np.stack([np.ones(shape[0]), -np.ones(shape[0]), rng.uniform(0.95, 1.0, shape[0]),
                  np.where(np.arange(shape[0]) % 2, -1.0, 1.0), rng.standard_normal(shape[0])])[None]
    x = x.astype(np.float32)
    ref = _w8a8_reference(x, weight)
    np.testing.assert_allclose(session.run(None, {name: x})[0], ref, rtol=1e-5, atol=1e-6)
    for row in range(x.shape[1]):  # one row: onnxruntime has GEMV kernels too (its u8·s8 one pairs products)
        np.testing.assert_allclose(session.run(None, {name: x[:, row:row + 1]})[0], ref[:, row:row + 1],
                                   rtol=1e-5, atol=1e-6)


def test_w8a8_logits_close_to_fp32_and_independent_of_pass_size(fused, tokens):
    # Per-row activation scales make a row's codes independent of the rest of its pass, and int32 products are
    # exact, so every pass size gives the same bits (per-tensor dynamic int8 does not: a test of that below).
    # Error measured on this model: 0.34 % of the largest logit, argmax equal everywhere; a wrong zero point or
    # scale gives ~100 %.
    q = quantize_rowwise(fused)
    ref = run_fused(q, tokens, 8)
    for step in (2, 3, 24):
        assert np.array_equal(run_fused(q, tokens, step), ref), f"chunks of {step} differ from chunks of 8"
    assert np.array_equal(run_fused(q, tokens, 1, pad_single=True), ref)
    fp32 = run_fused(fused, tokens, len(tokens))
    assert rel_err(ref, fp32) < 0.03
    assert (ref.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9


def test_smoothing_keeps_the_function_and_helps_w8a8_with_outlier_channels(tiny, tokens):
    # Give layer 0's down-projection input outlier channels, as SmolLM2's have (up to thousands of times the median):
    # per-row int8 then rounds that row's other entries coarsely, and smoothing must win much of that back.
    # Measured: 0.59 % of the largest logit unsmoothed, 0.39 % smoothed; smoothing alone moves fp32 logits by 2e-7.
    weights = dict(tiny.weights)
    up = weights["layers.0.up_proj"].copy()
    up[:3] *= 300.0
    weights["layers.0.up_proj"] = up
    weights["layers.0.down_proj"] = weights["layers.0.down_proj"].copy()
    weights["layers.0.down_proj"][:, :3] /= 300.0
    plain = build_decoder(tiny.spec, weights, tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    calibration = [tokens[:12], tokens[12:]]
    maxima = activation_maxima(plain, calibration)
    assert set(maxima) == set(quantized_linear_names(plain))
    assert maxima["layers.0.down_proj"][:3].min() > 20 * np.median(maxima["layers.0.down_proj"])
    smoothed = build_decoder(tiny.spec, smooth_weights(weights, tiny.spec, maxima), tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    ref = run_fused(plain, tokens, len(tokens))
    assert rel_err(run_fused(smoothed, tokens, len(tokens)), ref) < 1e-4  # the same function in fp32
    before = rel_err(run_fused(quantize_rowwise(plain), tokens, len(tokens)), ref)
    after = rel_err(run_fused(quantize_rowwise(smoothed), tokens, len(tokens)), ref)
    assert after < 0.7 * before, (before, after)
    assert np.array_equal(weights["layers.0.up_proj"], up), "the input weights must not be modified"


def test_per_tensor_dynamic_int8_would_depend_on_the_pass(fused, tokens):
    # The reason W8A8 quantizes rows itself: onnxruntime's dynamic quantizer gives one scale per pass.
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        onnx.save(fused, f"{d}/fp32.onnx")
        quantize_dynamic(f"{d}/fp32.onnx", f"{d}/dyn.onnx", weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], extra_options={"DefaultTensorType": TensorProto.FLOAT})
        dynamic = onnx.load(f"{d}/dyn.onnx")
    assert not np.array_equal(run_fused(dynamic, tokens, 2), run_fused(dynamic, tokens, 8))


# ---- GGUF blocks carried exactly ----

def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's RoPE row permutation of attn_q/attn_k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse permutation, as transformers' GGUF loader applies it."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, tiny, types: dict) -> dict[str, np.ndarray]:
    """Write the tiny model as a llama GGUF with `types` blocks; returns the weights the GGUF dequantizes to."""
    spec = tiny.spec
    writer = gguf.GGUFWriter(str(path), "llama")
    deq = dict(tiny.weights)
    embd = gguf.quants.quantize(tiny.weights["embed_tokens"], Q.Q8_0)
    writer.add_tensor("token_embd.weight", embd, raw_dtype=Q.Q8_0)
    deq["lm_head"] = gguf.quants.dequantize(embd, Q.Q8_0)
    for i in range(spec.num_layers):
        for name, (canonical, qtype) in types.items():
            heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}.get(name)
            w = tiny.weights[f"layers.{i}.{canonical}"]
            w = _llama_cpp_permute(w, heads) if heads else w
            blocks = gguf.quants.quantize(w, qtype)
            writer.add_tensor(f"blk.{i}.{name}.weight", blocks, raw_dtype=qtype)
            back = gguf.quants.dequantize(blocks, qtype)
            deq[f"layers.{i}.{canonical}"] = _hf_rows(back, heads) if heads else back
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return deq


@pytest.fixture(scope="module")
def gguf_case(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    deq = write_gguf(path, tiny, GGUF_LAYOUT)
    graph = build_decoder(tiny.spec, deq, tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    return path, deq, graph


def test_gguf_blocks_carried_exactly(gguf_case, tiny):
    path, deq, graph = gguf_case
    q, info = carry_gguf_blocks(graph, path, tiny.spec)
    assert not [n.name for n in q.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight")]
    L = tiny.spec.num_layers
    assert info["weights"] == "gguf-exact"
    assert info["gguf_types"] == {"Q4_0": 2 * L, "Q4_1": 4 * L, "Q8_0": L + 1}
    assert info["linears_by_bits"] == {"4": 3 * L, "8": L + 1}  # qkv holds a Q8_0 part, so it is 8-bit
    for i in range(L):
        p = f"layers.{i}."
        expected = {
            "qkv_proj": np.concatenate([deq[p + "q_proj"], deq[p + "k_proj"], deq[p + "v_proj"]]),
            "o_proj": deq[p + "o_proj"], "down_proj": deq[p + "down_proj"],
            "gate_up_proj": np.concatenate([deq[p + "gate_proj"], deq[p + "up_proj"]])}
        for linear, w in expected.items():
            # bit for bit: d·(q−8) is exact in fp32 and m+8d is representable, so d·(q−8) + (m+8d)
            # rounds the same real number as the GGUF's d·q + m
            assert np.array_equal(nbits_weight(q, p + linear), w), linear
    assert np.array_equal(nbits_weight(q, "lm_head"), deq["lm_head"])


def test_gguf_exact_logits_match_fp32_of_the_same_weights(gguf_case, tiny, tokens):
    # The weights are identical; only accuracy_level 4's int8 activations differ from the fp32 graph.
    path, _, graph = gguf_case
    q, _ = carry_gguf_blocks(graph, path, tiny.spec)
    ref = run_fused(graph, tokens, len(tokens))
    got = run_fused(q, tokens, len(tokens))
    assert rel_err(got, ref) < 0.015
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_gguf_exact_leaves_other_types_to_rtn(tiny, tmp_path):
    path = tmp_path / "bf16.gguf"
    deq = write_gguf(path, tiny, dict(GGUF_LAYOUT, ffn_down=("down_proj", Q.BF16)))
    graph = build_decoder(tiny.spec, deq, tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    q, info = carry_gguf_blocks(graph, path, tiny.spec)
    assert info["linears"]["layers.0.down_proj"] == {"gguf_types": ["BF16"], "rtn": "BF16 blocks are not carried"}
    assert [n.op_type for n in q.graph.node if n.name == "layers.0.down_proj"] == ["MatMul"]


def test_gguf_exact_refuses_a_graph_from_other_weights(gguf_case, fused, tiny):
    path, _, _ = gguf_case
    with pytest.raises(UnsupportedGGUFError, match="differ from the graph's fp32 weights"):
        carry_gguf_blocks(fused, path, tiny.spec)  # fused holds the unquantized weights


# ---- static QDQ ----

def test_calibration_feeds_carry_real_kv(static, fused, tiny):
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, tiny.spec.vocab_size, n)]
               for i, n in enumerate((9, 6))]
    feeds = list(calibration_feeds(static, prompts, MAX_CONTEXT, CHUNK))
    assert len(feeds) == 3 + 2
    sess = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"])
    starts = [(prompts[0], s) for s in (0, 4, 8)] + [(prompts[1], s) for s in (0, 4)]
    for feed, (prompt, start) in zip(feeds, starts, strict=True):
        assert feed["past_length"][0] == start
        real = prompt[start:start + CHUNK]
        assert feed["input_ids"][0, :len(real)].tolist() == real and not feed["input_ids"][0, len(real):].any()
        key = feed["past_key.1"]
        assert not key[:, :, start:].any()
        if start:  # the fused graph's K after the same prefix, computed in one pass
            ref_feed = {i.name: np.zeros(i.shape, np.float32) for i in sess.get_inputs()
                        if i.name.startswith(("past_key", "past_value"))}
            ref_feed.update(input_ids=np.array(prompt[:start])[None], position_ids=np.arange(start)[None],
                            attention_mask=np.tril(np.ones((start, start), bool)), past_length=np.array([0]),
                            logits_from=np.array([0]))
            ref_key = sess.run(["present_key.1"], ref_feed)[0]
            np.testing.assert_allclose(key[:, :, :start], ref_key[:, :, :start], atol=1e-5)


@pytest.fixture(scope="module")
def calibration(static, tiny) -> list[dict]:
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, tiny.spec.vocab_size, n)]
               for i, n in enumerate((9, 14, 6))]
    return list(calibration_feeds(static, prompts, MAX_CONTEXT, CHUNK))


@pytest.mark.parametrize("op_types", [("MatMul",), None])
def test_qdq_graph_quantizes_weights_and_stays_close(static, tiny, calibration, op_types):
    q = quantize_qdq(static, iter(calibration), "uint16", op_types=op_types)
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: t for t in q.graph.initializer}
    linears = [n for n in q.graph.node if n.op_type == "MatMul" and n.name.endswith(("_proj", "lm_head"))]
    assert len(linears) == 4 * tiny.spec.num_layers + 1
    for node in linears:  # every weight reaches its MatMul through DequantizeLinear from a uint8 initializer
        dq = producer[node.input[1]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].data_type == TensorProto.UINT8
    matmul_io = {t for n in static.graph.node if n.op_type == "MatMul" for t in [*n.input, *n.output]}
    # graph outputs keep their name: the quantizer renames the tensor it rounds
    quantized = {n.input[0].removesuffix("_QuantizeLinear_Input") for n in q.graph.node
                 if n.op_type == "QuantizeLinear"}
    softmax_out = {n.output[0] for n in static.graph.node if n.op_type == "Softmax"}
    if op_types:  # only the MatMuls' activations are rounded; norms, residual adds and softmax stay float
        assert quantized <= matmul_io
    else:
        assert softmax_out <= quantized
    ref = ort.InferenceSession(static.SerializeToString(), providers=["CPUExecutionProvider"])
    got = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
    errs, agree = [], []
    for feed in calibration:
        a, b = ref.run(["logits"], feed)[0], got.run(["logits"], feed)[0]
        errs.append(rel_err(b, a))
        agree.append((a.argmax(-1) == b.argmax(-1)).mean())
    # uint16 activations have 1/65535 of each tensor's range per step and uint8 weights 1/255: measured 0.7 %
    assert max(errs) < 0.03
    assert np.mean(agree) >= 0.9


def test_qdq_masked_scores_keep_their_resolution(static, calibration):
    # Without the clamp the mask value (-3.4e38) sets the scores' scale to ~5e33: every real score rounds to 0.
    q = quantize_qdq(static, iter(calibration), "uint16", op_types=None)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    bias = next(n.output[0] for n in static.graph.node if n.name == "attention_bias")
    scores = [n.output[0] for n in static.graph.node if n.op_type == "Add" and bias in n.input]
    assert len(scores) == 2  # one per layer
    for name in [bias, *scores]:
        qnode = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == name)
        scale = float(inits[qnode.input[1]])
        assert scale < 2 * MASK_FLOOR / 65535, name


def test_qdq_rejects_bad_input(static, fused):
    with pytest.raises(ValueError, match="activation_type"):
        quantize_qdq(static, [], activation_type="int4")
    with pytest.raises(ValueError, match="static graph variant"):
        quantize_qdq(fused, [])
    with pytest.raises(ValueError, match="chunk"):
        next(calibration_feeds(static, [[5, 6]], MAX_CONTEXT, CHUNK * 2))
    with pytest.raises(ValueError, match="1..64 tokens"):
        next(calibration_feeds(static, [[5] * (MAX_CONTEXT + 1)], MAX_CONTEXT, CHUNK))


# ---- fp16 ----

def test_fp16_keeps_fp32_io_and_runs_with_shared_kv_buffers(fused, tokens):
    h = to_fp16(fused)
    io = {v.name: v.type.tensor_type.elem_type for v in [*h.graph.input, *h.graph.output]}
    assert io == {v.name: v.type.tensor_type.elem_type for v in [*fused.graph.input, *fused.graph.output]}
    weights = {t.name: t.data_type for t in h.graph.initializer if t.name.endswith("_proj.weight")}
    assert weights and set(weights.values()) == {TensorProto.FLOAT16}
    ref = run_fused(fused, tokens, len(tokens))
    for step in (1, 4):
        got = run_fused(h, tokens, step)
        # fp16 keeps 11 significant bits (relative step 4.9e-4); measured 2e-4 of the largest logit
        assert rel_err(got, ref) < 5e-3
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert fused.graph.initializer[0].data_type == TensorProto.FLOAT, "the input model must not be modified"


# ---- 8-bit embedding table ----

def test_q8_embedding_is_exact_for_a_q8_0_table_and_close_otherwise(tiny, tokens):
    raw = tiny.weights["embed_tokens"]
    q8_0 = gguf.quants.dequantize(gguf.quants.quantize(raw, Q.Q8_0), Q.Q8_0)  # what transformers loads
    assert np.array_equal(dequantize_q8(*q8_blocks(q8_0)), q8_0)

    graph = build_decoder(tiny.spec, dict(tiny.weights, embed_tokens=q8_0), tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    exact, info = quantize_embedding(graph, exact_only=True)
    assert [n.op_type for n in exact.graph.node if n.name == "embed_tokens"] == ["GatherBlockQuantized"]
    assert info["embedding_max_error"] == 0.0
    np.testing.assert_array_equal(run_fused(exact, tokens, 3), run_fused(graph, tokens, 3))

    fp32_graph = build_decoder(tiny.spec, tiny.weights, tiny.rope(MAX_CONTEXT), MAX_CONTEXT)
    kept, info = quantize_embedding(fp32_graph, exact_only=True)  # a GGUF-exact bundle keeps an inexact table
    assert kept is fp32_graph and info["embedding"].startswith("fp32")
    rounded, info = quantize_embedding(fp32_graph)
    step = np.abs(raw).reshape(len(raw), -1, 32).max(-1) / 127
    assert 0 < info["embedding_max_error"] <= 0.51 * step.max()
    ref = run_fused(fp32_graph, tokens, 3)
    assert rel_err(run_fused(rounded, tokens, 3), ref) < 0.02
