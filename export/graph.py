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

from edgespec.export.rope import RopeTable, rotary_order
from edgespec.export.spec import ModelSpec
from edgespec.quant.names import MS_DOMAIN, kv_input_names

OPSET = 17


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


def build_decoder(spec: ModelSpec, weights: dict[str, np.ndarray], rope: dict[str, RopeTable],
                  max_context: int, variant: str = "fused", chunk: int | None = None,
                  tie_lm_head: bool = False, attention_rows: int = 1, tree_mask: bool = True) -> onnx.ModelProto:
    """Return the fp32 decoder graph.

    `rope` holds the tables `spec.layer_rope` names (`ModelSpec.rope_tables`). `chunk` fixes the number of new
    tokens per pass (required for ``static``; ``None`` keeps it dynamic). `tie_lm_head` reads the LM head from
    the embedding table through a Gemm with transB, so an unquantized bundle stores the 49k x H matrix once;
    quantized bundles keep a separate MatMul the weight-only quantizer can convert. `attention_rows` (fused only)
    pads the chunk to at least that many rows inside attention alone (see `_attention_padding`).
    Without `tree_mask` (fused only) attention is causal and ignores `attention_mask`: it skips
    building and adding the bias (a measurable share of a one-row int4 pass), for chain-only graphs.
    A fused graph computes logits for rows `logits_from`.. of the chunk only: the LM head is a fifth of
    SmolLM2-135M's multiply-adds per row, and a prefill chunk needs the logits of its last row alone.
    """
    _check_variant(variant, chunk, attention_rows, tree_mask)
    g = _Graph()
    head_rows = weights["lm_head"].shape[0]  # below vocab_size for a draft with a restricted head
    inputs, outputs = _interface(spec, variant, chunk, max_context, head_rows)
    g.const("embed_tokens.weight", weights["embed_tokens"].astype(np.float32))
    x = g.op("Gather", ["embed_tokens.weight", "input_ids"], name="embed_tokens")
    if spec.embedding_scale != 1.0:  # Gemma: after the lookup, so a tied head reads the unscaled table
        x = g.op("Mul", [x, g.const("embedding_scale", np.array(spec.embedding_scale, np.float32))],
                 name="embedding_scaled")
    ctx = _fused_context(g, spec, rope, attention_rows, tree_mask, max_context) if variant == "fused" else \
        _static_context(g, spec, rope, max_context, chunk)

    residual = None
    for i in range(spec.num_layers):
        x, residual = _decoder_layer(g, spec, weights, i, variant, ctx, x, residual)

    norm_w = g.const("final_norm.weight", weights["final_norm"].astype(np.float32))
    h, _ = _rms_norm(g, variant, x, residual, norm_w, spec.rms_norm_eps, "final_norm")
    if variant == "fused":  # the LM head runs on rows logits_from.. only: a prefill chunk needs its last row's
        h = g.op("Slice", [h, "logits_from", "chunk_len", g.const("logits_axis", np.array([1], np.int64))],
                 name="logits_rows")
    _lm_head(g, spec, weights, h, tie_lm_head and spec.tie_word_embeddings and head_rows == spec.vocab_size)
    graph = helper.make_graph(g.nodes, f"edgespec_decoder_{variant}", inputs, outputs, g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgespec")
    model.ir_version = 8
    return model


def _check_variant(variant: str, chunk: int | None, attention_rows: int, tree_mask: bool) -> None:
    if variant not in ("fused", "static"):
        raise ValueError(f"unknown graph variant {variant!r}")
    if variant == "static" and chunk is None:
        raise ValueError("the static variant needs a fixed chunk length")
    if attention_rows not in (1, 2) or (attention_rows > 1 and variant != "fused"):
        raise ValueError("attention_rows is 1, or 2 for the fused variant")
    if not tree_mask and variant != "fused":
        raise ValueError("only the fused variant can drop the tree mask")


def _interface(spec: ModelSpec, variant: str, chunk: int | None, max_context: int,
               head_rows: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The graph's inputs and outputs (docs/kv-interface.md): the fixed-size K/V buffers in; the logits and either
    the whole updated buffers (fused) or the chunk's new K/V (static) out."""
    S = chunk if chunk is not None else "chunk"
    nkv, D = spec.num_kv_heads, spec.head_dim
    kv_shape = [1, nkv, max_context, D]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, S]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, S]),
        helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, [S, S]),
        helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]),
    ]
    for name in kv_input_names(spec.num_layers):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, kv_shape))
    logit_rows: int | str = S
    if variant == "fused":
        inputs.append(helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1]))
        logit_rows = "logit_rows"
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, logit_rows, head_rows])]
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            if variant == "fused":
                outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, kv_shape))
            else:
                outputs.append(helper.make_tensor_value_info(f"new_{kind}.{i}", TensorProto.FLOAT,
                                                             [1, nkv, chunk, D]))
    return inputs, outputs


@dataclass
class _AttentionContext:
    """What every layer's attention reads: biases by window size, RoPE inputs by name, padding."""

    biases: dict[int, str]  # window (0: none) -> bias tensor; empty for a causal fused graph
    cos: dict[str, str]
    sin: dict[str, str]
    windows: list[int]  # per layer, 0 where the window is absent or covers the whole buffer
    positions: str = "position_ids"
    qkv_pads: str | None = None
    chunk: int | None = None
    causal: bool = False  # fused without a tree mask: GroupQueryAttention applies windows itself


def _effective_windows(spec: ModelSpec, max_context: int) -> list[int]:
    """A window at least as long as the buffer never hides a slot: such layers attend to everything."""
    return [w if 0 < w < max_context else 0 for w in spec.layer_windows]


def _rope_const_names(name: str) -> tuple[str, str]:
    prefix = "rope." if name == "default" else f"rope.{name}."
    return prefix + "cos", prefix + "sin"


def _fused_context(g: _Graph, spec: ModelSpec, rope: dict[str, RopeTable], attention_rows: int,
                   tree_mask: bool, max_context: int) -> _AttentionContext:
    g.op("Shape", ["input_ids"], outputs=["chunk_len"], start=1, end=2)
    mask, positions, rows, qkv_pads = _attention_padding(g, attention_rows)
    windows = _effective_windows(spec, max_context)
    biases = {}
    if tree_mask:
        biases = {w: _fused_window_bias(g, mask, positions, w) if w else _fused_attention_bias(g, mask)
                  for w in sorted(set(windows))}
    cos, sin = {}, {}
    for name, table in rope.items():
        cos[name], sin[name] = (g.const(n, t) for n, t in zip(_rope_const_names(name), (table.cos, table.sin),
                                                               strict=True))
    g.op("Cast", ["past_length"], outputs=["past_length_i32"], to=TensorProto.INT32)
    total = g.op("Add", ["past_length", rows], name="total_len")
    g.op("Cast", [total], outputs=["total_i32_1d"], to=TensorProto.INT32)
    g.op("Sub", ["total_i32_1d", g.const("one_i32", np.array([1], np.int32))], outputs=["seqlens_k"])
    g.op("Squeeze", ["total_i32_1d"], outputs=["total_len_scalar"])
    return _AttentionContext(biases, cos, sin, windows, positions, qkv_pads, causal=not tree_mask)


def _static_context(g: _Graph, spec: ModelSpec, rope: dict[str, RopeTable], max_context: int,
                    chunk: int) -> _AttentionContext:
    windows = _effective_windows(spec, max_context)
    g.const("kv_slots", np.arange(max_context, dtype=np.int64))
    biases = {w: _static_attention_bias(g, max_context, chunk, w) for w in sorted(set(windows))}
    cos, sin = {}, {}
    shape = g.const("shape_cos", np.array([1, 1, chunk, spec.head_dim], np.int64))
    for name, table in rope.items():
        cos_name, sin_name = _rope_const_names(name)
        for out, base, values in ((cos, cos_name, table.cos), (sin, sin_name, table.sin)):
            full = g.const(base + "_full", np.concatenate([values, values], axis=1))
            rows = g.op("Gather", [full, "position_ids"], name=base.replace("rope.", "rope_"))  # [1,S,D]
            out[name] = g.op("Reshape", [rows, shape], name=base.replace("rope.", "rope_") + "_4d")
    return _AttentionContext(biases, cos, sin, windows, chunk=chunk)


def _decoder_layer(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], i: int, variant: str,
                   ctx: _AttentionContext, x: str, residual: str | None) -> tuple[str, str]:
    """One block: norm, attention, (norm), residual, norm, gated MLP, (norm); returns (block output, residual)."""
    p = f"layers.{i}."
    eps = spec.rms_norm_eps
    norm_w = g.const(p + "input_norm.weight", weights[p + "input_norm"].astype(np.float32))
    h, residual = _rms_norm(g, variant, x, residual, norm_w, eps, p + "input_norm")
    order = _qk_order(spec, i)
    qkv = _linear(g, h, _qkv_rows(spec, weights, p, "proj", order), p + "qkv_proj")
    if spec.attention_bias:
        qkv_b = _qkv_rows(spec, weights, p, "bias", order)
        qkv = g.op("Add", [qkv, g.const(p + "qkv_proj.bias", qkv_b.astype(np.float32))])
    if variant == "fused":
        if spec.qk_norm:
            qkv = _fused_qk_norm(g, spec, weights, p, qkv, order)
        attn = _fused_attention(g, spec, i, qkv, ctx)
    else:
        q, k, v = _split_qkv(g, spec, qkv, p)
        attn = _static_attention(g, spec, weights, i, q, k, v, ctx, order)
    o = _linear(g, attn, weights[p + "o_proj"], p + "o_proj")
    if spec.attention_output_bias:
        o = g.op("Add", [o, g.const(p + "o_proj.bias", weights[p + "o_bias"].astype(np.float32))])
    o = _output_norm(g, spec, weights, variant, o, p + "attn_out_norm")
    norm_w = g.const(p + "post_attention_norm.weight", weights[p + "post_attention_norm"].astype(np.float32))
    h, residual = _rms_norm(g, variant, o, residual, norm_w, eps, p + "post_attention_norm")
    gate_up = _linear(g, h, np.concatenate([weights[p + "gate_proj"], weights[p + "up_proj"]], 0),
                      p + "gate_up_proj")
    inter = spec.intermediate_size
    gate, up = g.op("Split", [gate_up, g.const(p + "gate_up_split", np.array([inter, inter], np.int64))],
                    n_out=2, name=p + "gate_up_split_node", axis=-1)
    act = g.op("Mul", [_activation(g, spec.activation, variant, gate, p), up], name=p + "gated")
    down = _linear(g, act, weights[p + "down_proj"], p + "down_proj")
    return _output_norm(g, spec, weights, variant, down, p + "mlp_out_norm"), residual


def _qk_order(spec: ModelSpec, i: int) -> np.ndarray | None:
    """The q/k head dim order of layer `i` under partial rotary (export/rope.py `rotary_order`), else None."""
    name = spec.layer_rope[i]
    if name is None or spec.rope[name].rotary_dim == spec.head_dim:
        return None
    return rotary_order(spec.head_dim, spec.rope[name].rotary_dim)


def _qkv_rows(spec: ModelSpec, weights: dict[str, np.ndarray], p: str, kind: str,
              order: np.ndarray | None) -> np.ndarray:
    """q, k and v weights (kind "proj") or biases ("bias") stacked by output row, q and k heads in `order`."""
    q, k, v = (weights[f"{p}{n}_{kind}"] for n in "qkv")
    if order is not None:
        q = _reorder_heads(q, spec.num_heads, order)
        k = _reorder_heads(k, spec.num_kv_heads, order)
    return np.concatenate([q, k, v], 0)


def _reorder_heads(rows: np.ndarray, heads: int, order: np.ndarray) -> np.ndarray:
    d = len(order)
    return rows.reshape(heads, d, *rows.shape[1:])[:, order].reshape(rows.shape)


def _head_norm(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], variant: str, name: str,
               heads: str, order: np.ndarray | None) -> str:
    """Per-head RMSNorm (Qwen3's and Gemma 3's q_norm / k_norm) of a [..., heads, head_dim] tensor."""
    w = weights[name] if order is None else weights[name][order]
    return _rms_norm(g, variant, heads, None, g.const(name + ".weight", w.astype(np.float32)), spec.rms_norm_eps,
                     name)[0]


def _fused_qk_norm(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], p: str, qkv: str,
                   order: np.ndarray | None) -> str:
    """The packed q|k|v rows with q and k normed per head (GroupQueryAttention's own q/k norm is GPU-only)."""
    q, k, v = _split_qkv(g, spec, qkv, p)
    normed = []
    for kind, x, heads in (("q", q, spec.num_heads), ("k", k, spec.num_kv_heads)):
        split = g.op("Reshape", [x, g.const(f"{p}{kind}_heads", np.array([0, 0, heads, spec.head_dim], np.int64))])
        y = _head_norm(g, spec, weights, "fused", f"{p}{kind}_norm", split, order)
        normed.append(g.op("Reshape", [y, g.const(f"{p}{kind}_flat", np.array([0, 0, heads * spec.head_dim],
                                                                               np.int64))]))
    return g.op("Concat", [*normed, v], axis=-1, name=p + "qk_normed")


def _output_norm(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], variant: str, x: str,
                 name: str) -> str:
    """Gemma's RMSNorm on the attention or MLP output before it joins the residual stream (identity elsewhere)."""
    if not spec.sandwich_norms:
        return x
    w = g.const(name + ".weight", weights[name].astype(np.float32))
    return _rms_norm(g, variant, x, None, w, spec.rms_norm_eps, name)[0]


def _activation(g: _Graph, kind: str, variant: str, gate: str, p: str) -> str:
    """silu(gate) or gelu_tanh(gate): FastGelu is onnxruntime's tanh-approximated GELU; NPUs get plain ops."""
    if kind == "silu":
        return g.op("Mul", [gate, g.op("Sigmoid", [gate])], name=p + "silu")
    if variant == "fused":
        return g.op("FastGelu", [gate], name=p + "gelu", domain=MS_DOMAIN)
    cube = g.op("Mul", [g.op("Mul", [gate, gate]), gate])
    inner = g.op("Add", [gate, g.op("Mul", [cube, g.const(p + "gelu/c", np.array(0.044715, np.float32))])])
    tanh = g.op("Tanh", [g.op("Mul", [inner, g.const(p + "gelu/k", np.array(np.sqrt(2 / np.pi), np.float32))])])
    half = g.op("Mul", [gate, g.const(p + "gelu/half", np.array(0.5, np.float32))])
    return g.op("Mul", [half, g.op("Add", [tanh, g.const(p + "gelu/one", np.array(1.0, np.float32))])],
                name=p + "gelu")


def _lm_head(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], h: str, tied: bool) -> None:
    """Logits from the final hidden rows, soft-capped as cap·tanh(logits/cap) where the config sets a cap."""
    out = "logits" if not spec.final_logit_softcap else "logits_uncapped"
    if tied:
        flat = g.op("Reshape", [h, g.const("flat_shape", np.array([-1, spec.hidden_size], np.int64))])
        logits2d = g.op("Gemm", [flat, "embed_tokens.weight"], name="lm_head", transB=1)
        g.op("Reshape", [logits2d, g.const("logits_shape", np.array([1, -1, spec.vocab_size], np.int64))],
             outputs=[out])
    else:
        _linear(g, h, weights["lm_head"], "lm_head", output=out)
    if spec.final_logit_softcap:
        _softcap(g, out, spec.final_logit_softcap, "final_logit_softcap", output="logits")


def _softcap(g: _Graph, x: str, cap: float, name: str, output: str | None = None) -> str:
    scaled = g.op("Div", [x, g.const(name + "/cap", np.array(cap, np.float32))])
    return g.op("Mul", [g.op("Tanh", [scaled]), name + "/cap"], name=name, outputs=[output] if output else None)


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


def _fused_window_bias(g: _Graph, mask: str, positions: str, window: int) -> str:
    """[1,1,S,past+S] additive bias of a sliding-window layer in a graph that takes a tree mask.

    A row at position p sees the slots and chunk rows at positions above p - window (a past slot's position
    is its index) that its mask row allows. The window is built from positions, not slot indices, because a
    tree node's slot (past + node index) is past its position (past + depth); GroupQueryAttention's own
    `local_window_size` counts slots, so graphs with a tree mask leave it unset.
    """
    p = f"window{window}/"
    row_pos = g.op("Squeeze", [positions, g.const(p + "axis0", np.array([0], np.int64))])  # [R]
    past = g.op("Range", [g.const(p + "zero", np.array(0, np.int64)),
                          g.op("Squeeze", ["past_length"], name=p + "past_scalar"),
                          g.const(p + "one", np.array(1, np.int64))])
    key_pos = g.op("Concat", [past, row_pos], axis=0)  # [past+R]
    lowest = g.op("Sub", [g.op("Unsqueeze", [row_pos, g.const(p + "axis1", np.array([1], np.int64))]),
                          g.const(p + "size", np.array(window, np.int64))])  # [R, 1]
    in_window = g.op("Greater", [key_pos, lowest])  # [R, past+R]
    rows = g.op("Shape", [mask], start=0, end=1)
    past_ok = g.op("ConstantOfShape", [g.op("Concat", [rows, "past_length"], axis=0)],
                   value=helper.make_tensor("t", TensorProto.BOOL, [1], [True]))
    visible = g.op("And", [in_window, g.op("Concat", [past_ok, mask], axis=1)])
    bias = g.op("Where", [visible, g.const(p + "zero_f", np.array(0.0, np.float32)),
                          g.const(p + "neg", np.array(np.finfo(np.float32).min, np.float32))])
    return g.op("Unsqueeze", [bias, g.const(p + "bias_axes", np.array([0, 1], np.int64))], name=p + "attention_bias")


def _fused_attention(g: _Graph, spec: ModelSpec, i: int, qkv: str, ctx: _AttentionContext) -> str:
    """GroupQueryAttention on the packed q|k|v rows, rotating q and k itself at the context's positions.

    Packed input and built-in rotary spare a Split and two RotaryEmbedding nodes per layer, as in
    onnxruntime-genai's graphs; explicit position ids keep tree passes (a node's position is its depth).
    A layer without RoPE (SmolLM3) passes no tables. A causal graph (no bias) leaves the sliding window to
    the operator's `local_window_size`, which keeps the same W slots as transformers' mask; with a tree
    mask the window is in the bias (`_fused_window_bias`).
    """
    p = f"layers.{i}."
    if ctx.qkv_pads is not None:
        qkv = g.op("Pad", [qkv, ctx.qkv_pads], name=p + "attention_pad")
    rope = spec.layer_rope[i]
    rotary = [ctx.cos[rope], ctx.sin[rope], ctx.positions] if rope else ["", "", ""]
    window = ctx.windows[i]
    attrs = {"local_window_size": window} if window and ctx.causal else {}
    if spec.attention_scale is not None:
        attrs["scale"] = spec.attention_scale
    if spec.attention_softcap:
        attrs["softcap"] = spec.attention_softcap
    out = g.op("GroupQueryAttention",
               [qkv, "", "", f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_len_scalar", *rotary,
                ctx.biases.get(window, "")],
               name=p + "attn", domain=MS_DOMAIN,
               outputs=[p + "attn/out", f"present_key.{i}", f"present_value.{i}"],
               num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=int(rope is not None), **attrs)
    if ctx.qkv_pads is None:
        return out[0]
    return g.op("Slice", [out[0], g.const("slice_start", np.array([0], np.int64)), "chunk_len",
                          g.const("slice_axis", np.array([1], np.int64))], name=p + "attention_rows")


def _static_attention_bias(g: _Graph, max_context: int, chunk: int, window: int = 0) -> str:
    """[S, max_context+S] additive bias: past slots below `past_length` are visible, chunk rows as the mask says;
    with a window, only slots and rows at positions above the row's position minus the window."""
    p = "" if not window else f"window{window}/"
    valid = g.op("Less", ["kv_slots", "past_length"])  # [max_context]
    valid = g.op("Expand", [valid, g.const(p + "valid_shape", np.array([chunk, max_context], np.int64))])
    full = g.op("Concat", [valid, "attention_mask"], axis=1)
    if window:
        row_pos = g.op("Reshape", ["position_ids", g.const(p + "rows", np.array([chunk, 1], np.int64))])
        chunk_pos = g.op("Reshape", ["position_ids", g.const(p + "flat", np.array([chunk], np.int64))])
        key_pos = g.op("Concat", ["kv_slots", chunk_pos], axis=0)
        lowest = g.op("Sub", [row_pos, g.const(p + "size", np.array(window, np.int64))])
        full = g.op("And", [full, g.op("Greater", [key_pos, lowest])])
    neg = g.const(p + "mask_neg", np.array(np.finfo(np.float32).min, np.float32))
    zero = g.const(p + "mask_zero", np.array(0.0, np.float32))
    return g.op("Where", [full, zero, neg], name=p + "attention_bias")


def _rotate(g: _Graph, x: str, cos: str, sin: str, half: int, name: str) -> str:
    """HF rotate_half RoPE on [1, heads, S, D] with plain operators."""
    x1, x2 = g.op("Split", [x, g.const(name + "/halves", np.array([half, half], np.int64))], n_out=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])], name=name)


def _static_attention(g: _Graph, spec: ModelSpec, weights: dict[str, np.ndarray], i: int, q: str, k: str,
                      v: str, ctx: _AttentionContext, order: np.ndarray | None) -> str:
    p = f"layers.{i}."
    D, nq, nkv, chunk = spec.head_dim, spec.num_heads, spec.num_kv_heads, ctx.chunk
    group = nq // nkv
    q = g.op("Reshape", [q, g.const(p + "q_heads", np.array([1, chunk, nq, D], np.int64))])
    k = g.op("Reshape", [k, g.const(p + "kv_heads", np.array([1, chunk, nkv, D], np.int64))])
    if spec.qk_norm:
        q = _head_norm(g, spec, weights, "static", p + "q_norm", q, order)
        k = _head_norm(g, spec, weights, "static", p + "k_norm", k, order)
    q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = g.op("Transpose", [k], perm=[0, 2, 1, 3])
    v = g.op("Transpose", [g.op("Reshape", [v, p + "kv_heads"])], perm=[0, 2, 1, 3], outputs=[f"new_value.{i}"])
    rope = spec.layer_rope[i]
    if rope is not None:
        q = _rotate(g, q, ctx.cos[rope], ctx.sin[rope], D // 2, p + "q_rotary")
        k = _rotate(g, k, ctx.cos[rope], ctx.sin[rope], D // 2, p + "k_rotary")
    g.op("Identity", [k], outputs=[f"new_key.{i}"])
    keys = g.op("Concat", [f"past_key.{i}", k], axis=2)     # [1, nkv, T, D]
    values = g.op("Concat", [f"past_value.{i}", v], axis=2)
    qg = g.op("Reshape", [q, g.const(p + "q_group", np.array([1, nkv, group * chunk, D], np.int64))])
    scores = g.op("MatMul", [qg, g.op("Transpose", [keys], perm=[0, 1, 3, 2])])
    scale = spec.attention_scale if spec.attention_scale is not None else 1.0 / np.sqrt(D)
    scores = g.op("Mul", [scores, g.const(p + "scale", np.array(scale, np.float32))])
    if spec.attention_softcap:
        scores = _softcap(g, scores, spec.attention_softcap, p + "softcap")
    t_len = g.const(p + "score_shape", np.array([1, nkv, group, chunk, -1], np.int64))
    scores = g.op("Add", [g.op("Reshape", [scores, t_len]), ctx.biases[ctx.windows[i]]])  # + the [S, T] bias
    probs = g.op("Softmax", [scores], axis=-1)
    probs = g.op("Reshape", [probs, g.const(p + "prob_shape", np.array([1, nkv, group * chunk, -1], np.int64))])
    ctx_rows = g.op("MatMul", [probs, values])  # [1, nkv, group*S, D]
    ctx_rows = g.op("Reshape", [ctx_rows, g.const(p + "ctx_heads", np.array([1, nq, chunk, D], np.int64))])
    ctx_rows = g.op("Transpose", [ctx_rows], perm=[0, 2, 1, 3])
    return g.op("Reshape", [ctx_rows, g.const(p + "ctx_flat", np.array([1, chunk, nq * D], np.int64))])
