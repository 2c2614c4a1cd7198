"""8-bit weights per output channel, 8-bit activations per row (W8A8), for targets that verify many tokens a pass.

`MatMulNBits` (int4/int8 bundles) quantizes activations per row and block, so its result for a row does not depend
on the pass, but its CPU kernel costs nearly as much per extra row as for the first (the measured curves:
runtime/costs.py, docs/speculative.md). onnxruntime's integer GEMM (`MatMulIntegerToFloat`) is nearly flat in the
row count on our Intel machine (measured with int8 weights, before they became uint8, below), but onnxruntime's
quantizers feed it one activation scale per tensor (`DynamicQuantizeLinear`), which makes a row's logits depend on
the other rows of its pass and breaks lossless speculation (a row's scale is the maximum over the whole pass). So
the per-row activation quantization is written here as plain ONNX ops; no onnxruntime or onnx tool emits it. Each
linear input is quantized once, symmetrically (scale = max|row| / 127, zero point 128), the int32 products are
exact, and the result is rescaled per row and per output channel.

The weight codes (symmetric per output channel, [-127, 127]) are stored as uint8 with zero point 128, so
onnxruntime runs its u8·u8 GEMM, which is exact on every CPU. Its u8·s8 GEMM is not: without VNNI (AVX2, AVX512
without VNNI) it multiplies with VPMADDUBSW, which adds two adjacent u8·s8 products into a saturating int16, and
activations up to 255 (code 127 + zero point 128) against int8 weights reach 2·255·127 = 64770 > 32767 (on an
AVX2 machine SmolLM2's logits moved by up to 10, against 4 for the rounding alone). onnxruntime documents
`reduce_range` for this (7-bit weights, [-64, 64]: 2·255·64 = 32640), and its session option
`session.x64quantprecision` turns such weights into u8 when the running CPU lacks VNNI; but a bundle exported on
one CPU runs on others, with or without that option, so the graph itself is made exact. Mean KL to fp32 on
SmolLM2's parity prompts: 0.013 with u8 weights, 0.028 with 7-bit weights, 0.039 with 7-bit activations (zero
point 64) against 8-bit weights; s8 activations would take a scalar kernel on x86 without AVX-VNNI-INT8. The price
is VNNI and AMX, which onnxruntime uses for u8·s8 only.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgespec.quant.names import MS_DOMAIN
from edgespec.quant.weight_only import quantized_linear_names

# of the activation codes, and of the weight codes as stored (uint8: see the module docstring)
_ZERO_POINT = 128
# the smallest row maximum that is quantized: an all-zero row gets scale 1e-30 and codes 128, not NaN
_TINY = 1e-30


def per_channel_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 codes [K, N], fp32 scales [N]) of a [K, N] weight, symmetric per output column."""
    scales = (np.abs(weight).max(axis=0) / 127).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.rint(weight / safe), -127, 127).astype(np.int8)
    return codes, scales


def _constants(opset: int) -> list[onnx.TensorProto]:
    axes = (("rowq_axes", [-1], np.int64),) if opset >= 18 else ()
    return [numpy_helper.from_array(np.array(v, dtype), name) for name, v, dtype in axes + (
        ("rowq_inv127", 1 / 127, np.float32), ("rowq_tiny", _TINY, np.float32),
        ("rowq_zp_half", _ZERO_POINT + 0.5, np.float32), ("rowq_zp", _ZERO_POINT, np.uint8),
        ("rowq_one", 1.0, np.float32))]


def _row_quantizer(x: str, opset: int) -> tuple[list[onnx.NodeProto], str, str]:
    """Nodes that turn activation `x` into (uint8 codes, fp32 per-row scale [.., 1])."""
    p = f"{x}/rowq"
    # ReduceMax takes its axes as an input from opset 18 on, as an attribute before
    axes = {"inputs": [f"{p}/abs", "rowq_axes"]} if opset >= 18 else {"inputs": [f"{p}/abs"], "axes": [-1]}
    nodes = [
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", axes.pop("inputs"), [f"{p}/max"], name=f"{p}/max", keepdims=1, **axes),
        helper.make_node("Max", [f"{p}/max", "rowq_tiny"], [f"{p}/safe"], name=f"{p}/safe"),
        helper.make_node("Mul", [f"{p}/safe", "rowq_inv127"], [f"{p}/scale"], name=f"{p}/scale"),
        helper.make_node("Div", [x, f"{p}/scale"], [f"{p}/div"], name=f"{p}/div"),
        # x/scale is in [-127, 127]: adding 128.5 and casting (which truncates) rounds half up onto 1..255
        # in one op fewer than Round + Add
        helper.make_node("Add", [f"{p}/div", "rowq_zp_half"], [f"{p}/shift"], name=f"{p}/shift"),
        helper.make_node("Cast", [f"{p}/shift"], [f"{p}/codes"], name=f"{p}/codes", to=TensorProto.UINT8),
    ]
    return nodes, f"{p}/codes", f"{p}/scale"


def quantize_rowwise(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `model` whose linear MatMuls (layers and LM head) are W8A8 with per-row activations."""
    linears = set(quantized_linear_names(model))
    if not linears:
        raise ValueError("the model has no linear MatMul with a constant weight to quantize")
    if any(n.name == "lm_head" and n.op_type != "MatMul" for n in model.graph.node):
        raise ValueError("the LM head reads the tied embedding through a Gemm; build the graph with "
                         "tie_lm_head=False so it has its own MatMul weight to quantize")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.name in linears}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [t for t in out.graph.initializer if t.name not in weights]
    new_inits = _constants(opset)
    nodes: list[onnx.NodeProto] = []
    quantized: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        if node.name not in linears:
            nodes.append(node)
            continue
        x, w = node.input
        if x not in quantized:
            qnodes, codes, scale = _row_quantizer(x, opset)
            nodes.extend(qnodes)
            quantized[x] = codes, scale
        codes, scale = quantized[x]
        wq, ws = per_channel_int8(numpy_helper.to_array(inits[w]).astype(np.float32))
        stored = (wq.astype(np.int16) + _ZERO_POINT).astype(np.uint8)  # u8·u8: exact on every CPU
        new_inits += [numpy_helper.from_array(stored, f"{w}_W8"), numpy_helper.from_array(ws, f"{w}_W8_scale")]
        nodes += [
            helper.make_node("MatMulIntegerToFloat",
                             [codes, f"{w}_W8", "rowq_one", f"{w}_W8_scale", "rowq_zp", "rowq_zp"],
                             [f"{node.name}/int"], name=f"{node.name}/int", domain=MS_DOMAIN),
            helper.make_node("Mul", [f"{node.name}/int", scale], list(node.output), name=node.name),
        ]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + new_inits)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out
