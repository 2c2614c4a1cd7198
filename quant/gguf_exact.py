"""Carry a GGUF's own 4/8-bit blocks into `MatMulNBits`, so an already quantized model is not rounded twice.

Re-quantizing the dequantized fp32 weights of a Q4 GGUF with RTN rounds a second time and the output
diverges from the first token (design/feasibility.md); repacking the GGUF's blocks loses nothing.
Written by hand because no onnxruntime or gguf tool converts GGUF blocks to MatMulNBits. Every block
type is written as `w = d·c + o` with a centred integer code `c`:

- Q4_0 `d·(q−8)`: c = q−8, o = 0 → 4-bit MatMulNBits with the kernel's default zero point 8;
- Q4_1 `d·q + m`: c = q−8, o = m + 8d → 4-bit MatMulNBits plus a per-block offset term
  `blocksum(A) @ oᵀ`, computed in the graph (Reshape + ReduceSum + one small MatMul);
- Q8_0 `d·q`: c = q, o = 0 → 8-bit MatMulNBits (stored q+128, default zero point 128).

A linear that concatenates tensors of mixed types (q, k and v) becomes 8-bit if any part is Q8_0
(4-bit codes are exact in 8 bits). Explicit zero points would avoid the offset term but make the
kernel slower. The result is checked against the graph's fp32 weights, which transformers
dequantized from the same file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgespec.export.errors import ExportError
from edgespec.export.spec import ModelSpec
from edgespec.quant.weight_only import LM_HEAD, quantized_linear_names

BLOCK = 32
SUPPORTED = ("Q4_0", "Q4_1", "Q8_0")
# graph linear -> GGUF tensors concatenated along the output dimension (llama.cpp names)
PARTS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",),
         "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


class UnsupportedGGUFError(ExportError):
    """The GGUF's blocks cannot be carried over exactly; the caller should quantize with RTN instead."""


def carry_gguf_blocks(model: onnx.ModelProto, gguf_path: str | Path, spec: ModelSpec,
                      accuracy_level: int = 4) -> tuple[onnx.ModelProto, dict]:
    """Return a copy of `model` whose linear MatMuls use the GGUF's blocks, and a manifest summary."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
    if any(n.name == LM_HEAD and n.op_type != "MatMul" for n in model.graph.node):
        raise ValueError("the LM head reads the tied embedding through a Gemm; build the graph with "
                         "tie_lm_head=False so it has its own MatMul weight")
    names = quantized_linear_names(model)
    sources = {name: _gguf_parts(name, tensors) for name in names}
    bad = sorted({f"{t}: {tensors[t].tensor_type.name}" for parts in sources.values() for t in parts
                  if tensors[t].tensor_type.name not in SUPPORTED})
    if bad:
        raise UnsupportedGGUFError(f"gguf-exact carries only {', '.join(SUPPORTED)} blocks; {gguf_path} has "
                                   f"{'; '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    nodes = list(out.graph.node)
    new_nodes, new_inits = [], []
    type_counts: dict[str, int] = {}
    bit_counts = {"4": 0, "8": 0}
    for node in nodes:
        if node.name not in sources:
            new_nodes.append(node)
            continue
        parts = sources[node.name]
        codes, scales, offsets, bits = _read_linear(parts, tensors, spec, permute=arch == "llama")
        _check_against(node.name, codes, scales, offsets, numpy_helper.to_array(inits[node.input[1]]))
        built_nodes, built_inits = _nbits_nodes(node, codes, scales, offsets, bits, accuracy_level)
        new_nodes += built_nodes
        new_inits += built_inits
        for t in parts:
            type_counts[tensors[t].tensor_type.name] = type_counts.get(tensors[t].tensor_type.name, 0) + 1
        bit_counts[str(bits)] += 1
    replaced = {inits[n.input[1]].name for n in nodes if n.name in sources}
    kept = [t for t in out.graph.initializer if t.name not in replaced]
    out.graph.ClearField("node")
    out.graph.node.extend(new_nodes)
    out.graph.ClearField("initializer")
    out.graph.initializer.extend(kept + new_inits)
    info = {"weights": "gguf-exact", "gguf_types": type_counts, "linears_by_bits": bit_counts,
            "block_size": BLOCK, "accuracy_level": accuracy_level}
    return out, info


def _gguf_parts(name: str, tensors: dict) -> list[str]:
    if name == LM_HEAD:
        parts = ["output.weight" if "output.weight" in tensors else "token_embd.weight"]
    else:
        layer, kind = name.split(".")[1], name.split(".")[2]
        parts = [f"blk.{layer}.{p}.weight" for p in PARTS[kind]]
    missing = [p for p in parts if p not in tensors]
    if missing:
        raise UnsupportedGGUFError(f"the GGUF has no tensor {missing[0]} for graph node {name}")
    return parts


def _read_linear(parts: list[str], tensors: dict, spec: ModelSpec,
                 permute: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Centred int8 codes [N, K], scales and offsets [N, K/32], and the MatMulNBits bit width."""
    codes, scales, offsets = [], [], []
    for part in parts:
        c, d, o = _decode_blocks(tensors[part])
        if permute and (".attn_q." in part or ".attn_k." in part):
            heads = spec.num_heads if ".attn_q." in part else spec.num_kv_heads
            rows = _unpermute_rows(c.shape[0], heads)
            c, d, o = c[rows], d[rows], o[rows]
        codes.append(c)
        scales.append(d)
        offsets.append(o)
    bits = 8 if any(tensors[p].tensor_type.name == "Q8_0" for p in parts) else 4
    return np.concatenate(codes), np.concatenate(scales), np.concatenate(offsets), bits


def _decode_blocks(tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a GGUF tensor's packed rows [N, blocks·bytes] into codes, scales d and offsets.

    Layouts (gguf.quants): Q4_0 = d:f16, 16 bytes of nibbles (low nibbles are elements 0..15,
    high nibbles 16..31); Q4_1 = d:f16, m:f16, same nibbles; Q8_0 = d:f16, 32 int8.
    """
    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data)
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[kind])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if kind == "Q8_0":
        return blocks[..., 2:].copy().view(np.int8).reshape(n, -1), d, np.zeros_like(d)
    nib = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.int8) - 8
    offset = np.zeros_like(d)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        offset = m + 8 * d
    return q.reshape(n, -1), d, offset


def _unpermute_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's RoPE permutation of attn_q/attn_k (as transformers' loader does).

    llama.cpp stores row (head, i, half) where Hugging Face has (head, half, i).
    """
    return np.arange(n_rows).reshape(heads, n_rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The weight [N, K] the MatMulNBits node plus offset term computes with."""
    n, k = codes.shape
    w = codes.reshape(n, k // BLOCK, BLOCK).astype(np.float32) * scales[..., None] + offsets[..., None]
    return w.reshape(n, k)


def _check_against(name: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                   fp32_kn: np.ndarray) -> None:
    """The GGUF's blocks must give the graph's fp32 weights, or the graph was not built from this GGUF."""
    w = dequantize(codes, scales, offsets)
    if w.shape != fp32_kn.T.shape:
        raise UnsupportedGGUFError(f"GGUF blocks for {name} have shape {w.shape[::-1]}, "
                                   f"the graph's weight {fp32_kn.shape}")
    err = float(np.abs(w - fp32_kn.T).max())
    bound = 1e-6 * max(1.0, float(np.abs(fp32_kn).max()))
    if err > bound:
        raise UnsupportedGGUFError(f"the GGUF's blocks for {name} differ from the graph's fp32 weights by {err:.3g}: "
                         "the graph was not built from this GGUF (or its rows are ordered differently)")


def _nbits_nodes(node: onnx.NodeProto, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray,
                 bits: int, accuracy_level: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    n, k = codes.shape
    name, x, y = node.name, node.input[0], node.output[0]
    if bits == 4:
        u = (codes + 8).astype(np.uint8).reshape(n, k // BLOCK, BLOCK // 2, 2)
        packed = u[..., 0] | (u[..., 1] << 4)  # MatMulNBits: element 2j in the low nibble of byte j
    else:
        packed = (codes.astype(np.int16) + 128).astype(np.uint8).reshape(n, k // BLOCK, BLOCK)
    b_name, s_name = f"{name}.weight_Q{bits}", f"{name}.weight_scales"
    inits = [numpy_helper.from_array(np.ascontiguousarray(packed), b_name),
             numpy_helper.from_array(np.ascontiguousarray(scales), s_name)]
    has_offset = bool(np.any(offsets))
    nbits_out = f"{name}/nbits" if has_offset else y
    nodes = [onnx.helper.make_node("MatMulNBits", [x, b_name, s_name], [nbits_out], name=f"{name}_Q{bits}",
                                   domain="com.microsoft", K=k, N=n, bits=bits, block_size=BLOCK,
                                   accuracy_level=accuracy_level)]
    if has_offset:
        shape, axes, off = f"{name}.block_shape", f"{name}.block_axes", f"{name}.block_offsets"
        inits += [numpy_helper.from_array(np.array([0, 0, k // BLOCK, BLOCK], np.int64), shape),
                  numpy_helper.from_array(np.array([-1], np.int64), axes),
                  numpy_helper.from_array(np.ascontiguousarray(offsets.T), off)]
        blocks = onnx.helper.make_node("Reshape", [x, shape], [f"{name}/blocks"], name=f"{name}/blocks")
        sums = onnx.helper.make_node("ReduceSum", [f"{name}/blocks", axes], [f"{name}/block_sums"],
                                     name=f"{name}/block_sums", keepdims=0)
        corr = onnx.helper.make_node("MatMul", [f"{name}/block_sums", off], [f"{name}/offset"],
                                     name=f"{name}/offset")
        add = onnx.helper.make_node("Add", [nbits_out, f"{name}/offset"], [y], name=f"{name}/add_offset")
        nodes += [blocks, sums, corr, add]
    return nodes, inits
