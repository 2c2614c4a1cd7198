"""Build the ONNX decoder graph with edgespec's fixed-size KV interface.

Why the graph is written node by node instead of traced: neither `torch.onnx.export` nor
optimum emits a decoder whose KV cache is a preallocated `max_context` buffer shared between
past and present, that takes a 2-D chunk mask (tree attention) and explicit positions, that
returns logits for every position, and that uses onnxruntime's fused kernels (GroupQueryAttention with
its own rotary, SkipSimplifiedLayerNormalization, MatMulNBits). onnxruntime-genai's model builder
writes its graphs the same way, but without tree masks or all-position logits. Numerical parity
with the torch model is checked by the export itself and by tests. See docs/kv-interface.md.

Two variants share one interface (inputs `input_ids`, `position_ids`, `attention_mask`,
`past_length`, `past_key.{i}`, `past_value.{i}`):
- ``fused`` (CPU and GPU providers): dynamic chunk length; GroupQueryAttention writes the chunk's
  K/V in place into the bound past buffer (outputs `present_key.{i}` alias it).
- ``static`` (NPU providers): plain ONNX operators, every dimension fixed; outputs the chunk's
  K/V as `new_key.{i}` / `new_value.{i}` and the runtime copies them into its buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgespec.export.spec import ModelSpec, RopeTable

OPSET = 17
MS_DOMAIN = "com.microsoft"


@dataclass
class _Graph:
    """Accumulates nodes and initializers; `op` returns the output name(s) of the new node."""

    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    counter: int = 0

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, name: str | None = None,
           domain: str = "", outputs: list[str] | None = None, **attrs):
        self.counter += 1
        name = name or f"{op_type}_{self.counter}"
        outs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


def kv_input_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def build_decoder(spec: ModelSpec, weights: dict[str, np.ndarray], rope: RopeTable,
                  max_context: int, variant: str = "fused", chunk: int | None = None,
                  tie_lm_head: bool = False, attention_rows: int = 1, tree_mask: bool = True) -> onnx.ModelProto:
    """Return the fp32 decoder graph.

    `chunk` fixes the number of new tokens per pass (required for ``static``; ``None`` keeps
    it dynamic). `tie_lm_head` reads the LM head from the embedding table through a Gemm with
    transB, so an unquantized bundle stores the 49k x H matrix once; quantized bundles keep a
    separate MatMul the weight-only quantizer can convert. `attention_rows` (fused only) pads
    the chunk to at least that many rows inside attention alone (see `_attention_padding`).
    Without `tree_mask` (fused only) attention is causal and ignores `attention_mask`: it skips
    building and adding the bias (0.5 ms of a 7.5 ms int4 pass of SmolLM2-135M), for chain-only graphs.
    A fused graph computes logits for rows `logits_from`.. of the chunk only: the LM head is a fifth of
    SmolLM2-135M's multiply-adds per row, and a prefill chunk needs the logits of its last row alone.
    """
    if variant not in ("fused", "static"):
        raise ValueError(f"unknown graph variant {variant!r}")
    if variant == "static" and chunk is None:
        raise ValueError("the static variant needs a fixed chunk length")
    if attention_rows not in (1, 2) or (attention_rows > 1 and variant != "fused"):
        raise ValueError("attention_rows is 1, or 2 for the fused variant")
    if not tree_mask and variant != "fused":
        raise ValueError("only the fused variant can drop the tree mask")
    g = _Graph()
    S = chunk if chunk is not None else "chunk"
    H, D = spec.hidden_size, spec.head_dim
    nkv = spec.num_kv_heads
    kv_shape = [1, nkv, max_context, D]

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, [S, S]),
        helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]),
    ]
    for name in kv_input_names(spec.num_layers):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, kv_shape))
    head_rows = weights["lm_head"].shape[0]  # below vocab_size for a draft with a restricted head
    logit_rows: int | str = S
    if variant == "fused":
        inputs.append(helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]))
        logit_rows = "logit_rows"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, logit_rows, head_rows])]

    g.const("embed_tokens.weight", weights["embed_tokens"].astype(np.float32))
    x = g.op("Gather", ["embed_tokens.weight", "input_ids"], name="embed_tokens")

    if variant == "fused":
        g.op("Shape", ["input_ids"], outputs=["chunk_len"], start=1, end=2)
        mask, positions, rows, qkv_pads = _attention_padding(g, attention_rows)
        bias = _fused_attention_bias(g, mask) if tree_mask else ""
        g.const("rope.cos", rope.cos)
        g.const("rope.sin", rope.sin)

        g.op("Cast", ["past_length"], outputs=["past_length_i32"], to=TensorProto.INT32)
        total = g.op("Add", ["past_length", rows], name="total_len")
        g.op("Cast", [total], outputs=["total_i32_1d"], to=TensorProto.INT32)
        g.op("Sub", ["total_i32_1d", g.const("one_i32", np.array([1], np.int32))],
             outputs=["seqlens_k"])
        g.op("Squeeze", ["total_i32_1d"], outputs=["total_len_scalar"])
    else:
        bias = _static_attention_bias(g, max_context, chunk)
        full_cos = np.concatenate([rope.cos, rope.cos], axis=1)
        full_sin = np.concatenate([rope.sin, rope.sin], axis=1)
        g.const("rope.cos_full", full_cos)
        g.const("rope.sin_full", full_sin)
        cos = g.op("Gather", ["rope.cos_full", "position_ids"], name="rope_cos")  # [1,S,D]
        sin = g.op("Gather", ["rope.sin_full", "position_ids"], name="rope_sin")
        g.const("shape_cos", np.array([1, 1, chunk, D], np.int64))
        cos = g.op("Reshape", [cos, "shape_cos"], name="rope_cos_4d")
        sin = g.op("Reshape", [sin, "shape_cos"], name="rope_sin_4d")

    residual = None
    h = None
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        norm_w = g.const(p + "input_norm.weight", weights[p + "input_norm"].astype(np.float32))
        h, residual = _rms_norm(g, variant, x, residual, norm_w, spec.rms_norm_eps, p + "input_norm")
        qkv_w = np.concatenate([weights[p + "q_proj"], weights[p + "k_proj"], weights[p + "v_proj"]], 0)
        qkv = _linear(g, h, qkv_w, p + "qkv_proj")
        if spec.attention_bias:
            qkv_b = np.concatenate([weights[p + "q_bias"], weights[p + "k_bias"], weights[p + "v_bias"]])
            qkv = g.op("Add", [qkv, g.const(p + "qkv_proj.bias", qkv_b.astype(np.float32))])
        if variant == "fused":
            attn = _fused_attention(g, spec, i, qkv, bias, positions, qkv_pads)
        else:
            q, k, v = _split_qkv(g, spec, qkv, p)
            attn = _static_attention(g, spec, i, q, k, v, bias, cos, sin, chunk)
        o = _linear(g, attn, weights[p + "o_proj"], p + "o_proj")
        norm_w = g.const(p + "post_attention_norm.weight", weights[p + "post_attention_norm"].astype(np.float32))
        h, residual = _rms_norm(g, variant, o, residual, norm_w, spec.rms_norm_eps, p + "post_attention_norm")
        gate_up = _linear(g, h, np.concatenate([weights[p + "gate_proj"], weights[p + "up_proj"]], 0),
                          p + "gate_up_proj")
        inter = spec.intermediate_size
        gate, up = g.op("Split", [gate_up, g.const(p + "gate_up_split", np.array([inter, inter], np.int64))],
                        n_out=2, name=p + "gate_up_split_node", axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up], name=p + "swiglu")
        x = _linear(g, act, weights[p + "down_proj"], p + "down_proj")

    norm_w = g.const("final_norm.weight", weights["final_norm"].astype(np.float32))
    h, _ = _rms_norm(g, variant, x, residual, norm_w, spec.rms_norm_eps, "final_norm")
    if variant == "fused":  # the LM head runs on rows logits_from.. only: a prefill chunk needs its last row's
        h = g.op("Slice", [h, "logits_from", "chunk_len", g.const("logits_axis", np.array([1], np.int64))],
                 name="logits_rows")
    if tie_lm_head and spec.tie_word_embeddings and head_rows == spec.vocab_size:
        flat = g.op("Reshape", [h, g.const("flat_shape", np.array([-1, H], np.int64))])
        logits2d = g.op("Gemm", [flat, "embed_tokens.weight"], name="lm_head", transB=1)
        g.op("Reshape", [logits2d, g.const("logits_shape", np.array([1, -1, spec.vocab_size], np.int64))],
             outputs=["logits"])
    else:
        _linear(g, h, weights["lm_head"], "lm_head", output="logits")

    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            if variant == "fused":
                outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, kv_shape))
            else:
                outputs.append(helper.make_tensor_value_info(f"new_{kind}.{i}", TensorProto.FLOAT,
                                                             [1, nkv, chunk, D]))
    graph = helper.make_graph(g.nodes, f"edgespec_decoder_{variant}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgespec")
    model.ir_version = 8
    return model


def _linear(g: _Graph, x: str, weight_out_in: np.ndarray, name: str, output: str | None = None) -> str:
    """MatMul with a [K, N] initializer named `<name>.weight`; quantizers find it by node name."""
    w = g.const(name + ".weight", np.ascontiguousarray(weight_out_in.T.astype(np.float32)))
    return g.op("MatMul", [x, w], name=name, outputs=[output] if output else None)


def _rms_norm(g: _Graph, variant: str, x: str, residual: str | None, weight: str, eps: float,
              name: str) -> tuple[str, str]:
    """Returns (normalised, new residual); adds `x` to the residual stream first when one exists."""
    if variant == "fused":
        if residual is None:
            return g.op("SimplifiedLayerNormalization", [x, weight], name=name, axis=-1, epsilon=eps), x
        out = g.op("SkipSimplifiedLayerNormalization", [x, residual, weight], n_out=4, name=name,
                   domain=MS_DOMAIN, epsilon=eps)
        return out[0], out[3]
    total = x if residual is None else g.op("Add", [x, residual], name=name + "/residual")
    sq = g.op("Mul", [total, total])
    mean = g.op("ReduceMean", [sq], axes=[-1], keepdims=1)
    eps_c = g.const(name + "/eps", np.array(eps, np.float32))
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, eps_c])])])
    return g.op("Mul", [g.op("Mul", [total, inv]), weight], name=name), total


def _split_qkv(g: _Graph, spec: ModelSpec, qkv: str, p: str) -> list[str]:
    sizes = np.array([spec.num_heads * spec.head_dim] + [spec.num_kv_heads * spec.head_dim] * 2, np.int64)
    return g.op("Split", [qkv, g.const(p + "qkv_split", sizes)], n_out=3, name=p + "qkv_split_node", axis=-1)


def _attention_padding(g: _Graph, rows: int) -> tuple[str, str, str, str | None]:
    """(chunk mask, positions, row count, qkv pads) as attention sees them: at least `rows` rows.

    GroupQueryAttention computes a one-row chunk on another code path whose last-bit differences
    int8-rounded activations (MatMulNBits accuracy level 4) grow into whole logits; every other
    operator gives a row the same bits whatever the pass size. So a target graph pads only
    attention's input to two rows: the padding row sees the real rows, no real row sees it, its
    K/V land in the slot after the chunk (which the runtime reserves and never keeps) and its
    output is sliced away, while the matmuls still run on the real rows only.
    """
    if rows == 1:
        return "attention_mask", "position_ids", "chunk_len", None
    zero = g.const("pad_zero", np.array([0], np.int64))
    missing = g.op("Max", [g.op("Sub", [g.const("attention_rows", np.array([rows], np.int64)), "chunk_len"]), zero],
                   name="pad_rows")
    mask = g.op("Pad", ["attention_mask", g.op("Concat", [zero, zero, missing, zero], axis=0),
                        g.const("pad_true", np.array(True))], name="pad_mask_rows")
    mask = g.op("Pad", [mask, g.op("Concat", [zero, zero, zero, missing], axis=0),
                        g.const("pad_false", np.array(False))], name="pad_mask_cols")
    positions = g.op("Pad", ["position_ids", g.op("Concat", [zero, zero, zero, missing], axis=0)],
                     name="pad_positions")
    qkv_pads = g.op("Concat", [zero, zero, zero, zero, missing, zero], axis=0, name="qkv_pads")
    return mask, positions, g.op("Add", ["chunk_len", missing], name="attention_len"), qkv_pads


def _fused_attention_bias(g: _Graph, mask: str) -> str:
    """[1,1,S,past+S] additive bias: 0 to every past slot, the chunk mask inside the chunk."""
    neg = g.const("mask_neg", np.array(np.finfo(np.float32).min, np.float32))
    zero = g.const("mask_zero", np.array(0.0, np.float32))
    chunk_bias = g.op("Where", [mask, zero, neg], name="chunk_bias")
    shape = g.op("Shape", [mask], start=0, end=1)
    past_shape = g.op("Concat", [shape, "past_length"], axis=0)
    past_bias = g.op("ConstantOfShape", [past_shape], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0]))
    full = g.op("Concat", [past_bias, chunk_bias], axis=1)
    return g.op("Unsqueeze", [full, g.const("bias_axes", np.array([0, 1], np.int64))], name="attention_bias")


def _fused_attention(g: _Graph, spec: ModelSpec, i: int, qkv: str, bias: str, positions: str,
                     qkv_pads: str | None) -> str:
    """GroupQueryAttention on the packed q|k|v rows, rotating q and k itself at `positions`.

    Packed input and built-in rotary spare a Split and two RotaryEmbedding nodes per layer, as in
    onnxruntime-genai's graphs; explicit position ids keep tree passes (a node's position is its depth).
    """
    p = f"layers.{i}."
    if qkv_pads is not None:
        qkv = g.op("Pad", [qkv, qkv_pads], name=p + "attention_pad")
    out = g.op("GroupQueryAttention",
               [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_len_scalar",
                "rope.cos", "rope.sin", positions, bias],
               name=p + "attn", domain=MS_DOMAIN,
               outputs=[p + "attn/out", f"present_key.{i}", f"present_value.{i}"],
               num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1)
    if qkv_pads is None:
        return out[0]
    return g.op("Slice", [out[0], g.const("slice_start", np.array([0], np.int64)), "chunk_len",
                          g.const("slice_axis", np.array([1], np.int64))], name=p + "attention_rows")


def _static_attention_bias(g: _Graph, max_context: int, chunk: int) -> str:
    """[S, max_context+S] additive bias: past slots below `past_length` are visible."""
    slots = g.const("kv_slots", np.arange(max_context, dtype=np.int64))
    valid = g.op("Less", [slots, "past_length"])  # [max_context]
    valid = g.op("Expand", [valid, g.const("valid_shape", np.array([chunk, max_context], np.int64))])
    full = g.op("Concat", [valid, "attention_mask"], axis=1)
    neg = g.const("mask_neg", np.array(np.finfo(np.float32).min, np.float32))
    zero = g.const("mask_zero", np.array(0.0, np.float32))
    return g.op("Where", [full, zero, neg], name="attention_bias")


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """HF rotate_half RoPE on [1, heads, S, D] with plain operators."""
    x1, x2 = g.op("Split", [x, g.const(name + "/halves", np.array([half, half], np.int64))], n_out=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])], name=name)


def _static_attention(g: _Graph, spec: ModelSpec, i: int, q: str, k: str, v: str, bias: str,
                      cos: str, sin: str, chunk: int) -> str:
    p = f"layers.{i}."
    D, nq, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    group = nq // nkv
    to_heads = g.const(p + "q_heads", np.array([1, chunk, nq, D], np.int64))
    kv_heads = g.const(p + "kv_heads", np.array([1, chunk, nkv, D], np.int64))
    q = g.op("Transpose", [g.op("Reshape", [q, to_heads])], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [g.op("Reshape", [k, kv_heads])], perm=[0, 2, 1, 3])
    v = g.op("Transpose", [g.op("Reshape", [v, kv_heads])], perm=[0, 2, 1, 3], outputs=[f"new_value.{i}"])
    q = _rotate(g, q, cos, sin, D // 2, p + "q_rotary")
    k = _rotate(g, k, cos, sin, D // 2, p + "k_rotary")
    g.op("Identity", [k], outputs=[f"new_key.{i}"])
    keys = g.op("Concat", [f"past_key.{i}", k], axis=2)     # [1, nkv, T, D]
    values = g.op("Concat", [f"past_value.{i}", v], axis=2)
    qg = g.op("Reshape", [q, g.const(p + "q_group", np.array([1, nkv, group * chunk, D], np.int64))])
    scores = g.op("MatMul", [qg, g.op("Transpose", [keys], perm=[0, 1, 3, 2])])
    scores = g.op("Mul", [scores, g.const(p + "scale", np.array(1.0 / np.sqrt(D), np.float32))])
    total = scores  # [1, nkv, group*S, T] -> [1, nkv, group, S, T] to add the [S, T] bias
    t_len = g.const(p + "score_shape", np.array([1, nkv, group, chunk, -1], np.int64))
    scores = g.op("Add", [g.op("Reshape", [total, t_len]), bias])
    probs = g.op("Softmax", [scores], axis=-1)
    probs = g.op("Reshape", [probs, g.const(p + "prob_shape", np.array([1, nkv, group * chunk, -1], np.int64))])
    ctx = g.op("MatMul", [probs, values])  # [1, nkv, group*S, D]
    ctx = g.op("Reshape", [ctx, g.const(p + "ctx_heads", np.array([1, nq, chunk, D], np.int64))])
    ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx, g.const(p + "ctx_flat", np.array([1, chunk, nq * D], np.int64))])
