"""Carry a GGUF's own blocks into `MatMulNBits`, so an already quantized model is not rounded twice.

Re-quantizing the dequantized fp32 weights of a Q4 GGUF with RTN rounds a second time and the greedy output
leaves the GGUF model's at the first token (docs/benchmarks.md, `int4-rtn`); repacking the blocks loses nothing.
Written by hand because no onnxruntime or gguf tool converts GGUF blocks to MatMulNBits. Every block
type is written as `w = s·c + o` per block of weights with a centred integer code `c`:

- Q4_0 `d·(q−8)`: c = q−8, o = 0 → 4-bit MatMulNBits with the kernel's default zero point 8;
- Q4_1 `d·q + m`: c = q−8, o = m + 8d → 4-bit MatMulNBits plus a per-block offset term
  `blocksum(A) @ oᵀ`, computed in the graph (Reshape + ReduceSum + one small MatMul);
- Q4_K `d·sc·q − dmin·m` per 32 weights of a 256-weight super-block: s = d·sc, c = q−8, o = 8s − dmin·m → 4-bit,
  the same form as Q4_1 (d·sc and dmin·m are exact in fp32: 11-bit by 6-bit products);
- Q5_0 `d·(q−16)`, Q5_1 `d·q + m`, Q5_K (Q4_K with 5-bit q): c = q−16 → 8-bit (stored c+128, default zero point 128);
- Q6_K `d·sc·(q−32)` per 16 weights: s = d·sc, c = q−32 → 8-bit blocks of 16;
- Q8_0 `d·q`: c = q, o = 0 → 8-bit.

With `--quant int8` every carried linear is 8-bit: a 4-bit code is exact in 8 bits (stored c+128).

A linear that concatenates tensors of mixed types (q, k and v) becomes 8-bit if any part is not 4-bit (4-bit codes
are exact in 8 bits), with blocks of 16 if any part is Q6_K (a 32-weight block is two 16-weight blocks with its
scale). A linear with a part in any other type (F16, BF16, Q2_K, ...) is left to the caller's RTN quantizer and the
summary says why, per linear. Explicit zero points would avoid the offset term but make the kernel slower. The
result is checked against the graph's fp32 weights, which transformers dequantized from the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgespec.quant.names import DecoderShape, QuantError
from edgespec.quant.weight_only import LM_HEAD, quantized_linear_names

BLOCK = 32
FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
SUPPORTED = FOUR_BIT + ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
# graph linear -> GGUF tensors concatenated along the output dimension (llama.cpp names)
PARTS = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",),
         "gate_up_proj": ("ffn_gate", "ffn_up"), "down_proj": ("ffn_down",)}


class UnsupportedGGUFError(QuantError):
    """No linear's blocks can be carried over exactly; the caller should quantize with RTN instead."""


def carry_gguf_blocks(model: onnx.ModelProto, gguf_path: str | Path, spec: DecoderShape,
                      accuracy_level: int = 4, min_bits: int = 4) -> tuple[onnx.ModelProto, dict]:
    """Return a copy of `model` whose linear MatMuls use the GGUF's blocks where their types allow, and a
    manifest summary saying per linear which GGUF types it had and whether it was carried (else: why not).
    `min_bits=8` (`--quant int8`) writes 4-bit codes as 8-bit ones too: exact, in the 8-bit kernel."""
    if min_bits not in (4, 8):
        raise ValueError(f"min_bits must be 4 or 8, got {min_bits}")
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tensors = {t.name: t for t in reader.tensors}
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
    if any(n.name == LM_HEAD and n.op_type != "MatMul" for n in model.graph.node):
        raise ValueError("the LM head reads the tied embedding through a Gemm; build the graph with "
                         "tie_lm_head=False so it has its own MatMul weight")
    sources, per_linear = {}, {}
    for name in quantized_linear_names(model):
        parts, reason = _gguf_parts(name, tensors)
        types = [tensors[t].tensor_type.name for t in parts]
        reason = reason or next((f"{t} blocks are not carried" for t in types if t not in SUPPORTED), "")
        per_linear[name] = {"gguf_types": types, **({"rtn": reason} if reason else {})}
        if not reason:
            sources[name] = parts
    if not sources:
        raise UnsupportedGGUFError(f"no linear of {gguf_path} has blocks that can be carried over exactly "
                                   f"({next(iter(per_linear.values()), {}).get('rtn', 'no linears')})")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    new_nodes, new_inits = [], []
    for node in list(out.graph.node):
        if node.name not in sources:
            new_nodes.append(node)
            continue
        block = _read_linear(sources[node.name], tensors, spec, permute=arch == "llama")
        block.bits = max(block.bits, min_bits)
        _check_against(node.name, block, numpy_helper.to_array(inits[node.input[1]]))
        built_nodes, built_inits = _nbits_nodes(node, block, accuracy_level)
        new_nodes += built_nodes
        new_inits += built_inits
        per_linear[node.name]["carried"] = f"{block.bits}-bit blocks of {block.size}"
    replaced = {inits[n.input[1]].name for n in model.graph.node if n.name in sources}
    kept = [t for t in out.graph.initializer if t.name not in replaced]
    out.graph.ClearField("node")
    out.graph.node.extend(new_nodes)
    out.graph.ClearField("initializer")
    out.graph.initializer.extend(kept + new_inits)
    return out, _summary(per_linear, accuracy_level)


def _summary(per_linear: dict, accuracy_level: int) -> dict:
    carried = [v for v in per_linear.values() if "carried" in v]
    type_counts: dict[str, int] = {}
    for entry in carried:
        for t in entry["gguf_types"]:
            type_counts[t] = type_counts.get(t, 0) + 1
    bits = {b: sum(v["carried"].startswith(f"{b}-bit") for v in carried) for b in ("4", "8")}
    whole = len(carried) == len(per_linear)
    return {"weights": "gguf-exact" if whole else "gguf-exact where the blocks allow, rtn elsewhere",
            "gguf_types": type_counts, "linears_by_bits": bits, "accuracy_level": accuracy_level,
            "block_size": min(int(v["carried"].rsplit(" ", 1)[1]) for v in carried), "linears": per_linear}


def _gguf_parts(name: str, tensors: dict) -> tuple[list[str], str]:
    """The GGUF tensors of a graph linear, or why it has none (a fused attn_qkv, as Phi-3's GGUFs store it)."""
    if name == LM_HEAD:
        return ["output.weight" if "output.weight" in tensors else "token_embd.weight"], ""
    layer, kind = name.split(".")[1], name.split(".")[2]
    parts = [f"blk.{layer}.{p}.weight" for p in PARTS[kind]]
    missing = [p for p in parts if p not in tensors]
    return (parts, "") if not missing else ([], f"the GGUF has no tensor {missing[0]}")


@dataclass
class _Blocks:
    """A linear's weight as w = scale·code + offset per block of `size` input weights."""

    codes: np.ndarray  # [N, K] int16, centred
    scales: np.ndarray  # [N, K / size] float32
    offsets: np.ndarray  # [N, K / size] float32
    size: int
    bits: int


def _read_linear(parts: list[str], tensors: dict, spec: DecoderShape, permute: bool) -> _Blocks:
    """The blocks of the concatenated parts, at the smallest block size and widest code of any part."""
    decoded = []
    for part in parts:
        blocks = _decode_blocks(tensors[part])
        if permute and (".attn_q." in part or ".attn_k." in part):
            heads = spec.num_heads if ".attn_q." in part else spec.num_kv_heads
            rows = _unpermute_rows(blocks.codes.shape[0], heads)
            blocks = _Blocks(blocks.codes[rows], blocks.scales[rows], blocks.offsets[rows], blocks.size, blocks.bits)
        decoded.append(blocks)
    size = min(b.size for b in decoded)
    repeat = [b.size // size for b in decoded]  # a block of 32 is two blocks of 16 with its scale and offset
    pairs = list(zip(decoded, repeat, strict=True))
    return _Blocks(codes=np.concatenate([b.codes for b in decoded]),
                   scales=np.concatenate([np.repeat(b.scales, r, axis=1) for b, r in pairs]),
                   offsets=np.concatenate([np.repeat(b.offsets, r, axis=1) for b, r in pairs]),
                   size=size, bits=max(b.bits for b in decoded))


def _fp16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16)[..., 0].astype(np.float32)


def _low_high(nibbles: np.ndarray) -> np.ndarray:
    """Bytes [..., n] -> 2n codes: the low nibbles first, then the high ones (ggml's 4-bit order)."""
    return np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.int16)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: 4 bytes, read as a little-endian uint32, whose bit j is the fifth bit of weight j."""
    return ((qh.copy().view("<u4") >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)


def _kquant_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and mins per super-block (gguf.quants.Q4_K.get_scale_min)."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _decode_blocks(tensor) -> _Blocks:
    """A GGUF tensor's packed rows [N, blocks·bytes] as centred codes, scales and offsets (layouts: gguf.quants)."""
    kind = tensor.tensor_type.name
    raw = np.asarray(tensor.data)
    n = raw.shape[0]
    if kind in ("Q4_K", "Q5_K", "Q6_K"):
        return _decode_kquant(kind, raw.reshape(n, -1, {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]))
    blocks = raw.reshape(n, -1, {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[kind])
    d = _fp16(blocks[..., 0:2])
    if kind == "Q8_0":
        return _Blocks(blocks[..., 2:].copy().view(np.int8).astype(np.int16).reshape(n, -1), d, np.zeros_like(d),
                       BLOCK, 8)
    has_min = kind in ("Q4_1", "Q5_1")
    start = 4 if has_min else 2
    if kind.startswith("Q5"):
        q = _low_high(blocks[..., start + 4:]) | (_high_bits(blocks[..., start:start + 4]) << 4)
        centre, bits = 16, 8
    else:
        q, centre, bits = _low_high(blocks[..., start:]), 8, 4
    offset = _fp16(blocks[..., 2:4]) + centre * d if has_min else np.zeros_like(d)
    return _Blocks((q - centre).reshape(n, -1), d, offset, BLOCK, bits)


def _decode_kquant(kind: str, blocks: np.ndarray) -> _Blocks:
    """Q4_K/Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, [Q5_K: 32 bytes of fifth bits], 128 bytes of nibbles
    (sub-blocks 2g and 2g+1 in the low and high nibbles of bytes 32g..32g+31). Q6_K: 128 bytes of low nibbles,
    64 of 2-bit highs, 16 int8 scales per 16 weights, d."""
    n = blocks.shape[0]
    if kind == "Q6_K":
        ql, qh = blocks[..., :128].reshape(n, -1, 2, 64), blocks[..., 128:192].reshape(n, -1, 2, 32)
        low = np.stack([ql & 0x0F, ql >> 4], axis=3).reshape(n, -1, 2, 4, 32)
        high = ((qh[..., None, :] >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, -1, 2, 4, 32)
        q = (low.astype(np.int16) | (high.astype(np.int16) << 4)) - 32
        scales = _fp16(blocks[..., 208:210])[..., None] * blocks[..., 192:208].copy().view(np.int8)
        return _Blocks(q.reshape(n, -1), scales.reshape(n, -1).astype(np.float32),
                       np.zeros((n, scales.size // n), np.float32), 16, 8)
    d, dmin = _fp16(blocks[..., 0:2])[..., None], _fp16(blocks[..., 2:4])[..., None]
    sc, mn = _kquant_scale_min(blocks[..., 4:16])
    nibbles = blocks[..., -128:].reshape(n, -1, 4, 32)
    q = np.stack([nibbles & 0x0F, nibbles >> 4], axis=3).reshape(n, -1, 8, 32).astype(np.int16)
    centre, bits = 8, 4
    if kind == "Q5_K":
        qh = blocks[..., 16:48]
        q = q | ((((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.int16)) << 4)
        centre, bits = 16, 8
    scales = (d * sc).reshape(n, -1)
    return _Blocks((q - centre).reshape(n, -1), scales, centre * scales - (dmin * mn).reshape(n, -1), BLOCK, bits)


def _unpermute_rows(n_rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's RoPE permutation of attn_q/attn_k (as transformers' loader does).

    llama.cpp stores row (head, i, half) where Hugging Face has (head, half, i).
    """
    return np.arange(n_rows).reshape(heads, n_rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def dequantize(blocks: _Blocks) -> np.ndarray:
    """The weight [N, K] the MatMulNBits node plus offset term computes with."""
    n, k = blocks.codes.shape
    w = blocks.codes.reshape(n, k // blocks.size, blocks.size).astype(np.float32) * blocks.scales[..., None]
    return (w + blocks.offsets[..., None]).reshape(n, k)


def _check_against(name: str, blocks: _Blocks, fp32_kn: np.ndarray) -> None:
    """The GGUF's blocks must give the graph's fp32 weights, or the graph was not built from this GGUF."""
    w = dequantize(blocks)
    if w.shape != fp32_kn.T.shape:
        raise UnsupportedGGUFError(f"GGUF blocks for {name} have shape {w.shape[::-1]}, "
                                   f"the graph's weight {fp32_kn.shape}")
    err = float(np.abs(w - fp32_kn.T).max())
    bound = 1e-6 * max(1.0, float(np.abs(fp32_kn).max()))
    if err > bound:
        raise UnsupportedGGUFError(f"the GGUF's blocks for {name} differ from the graph's fp32 weights by {err:.3g}: "
                                   "the graph was not built from this GGUF (or its rows are ordered differently)")


def _nbits_nodes(node: onnx.NodeProto, blocks: _Blocks,
                 accuracy_level: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    n, k = blocks.codes.shape
    size, bits = blocks.size, blocks.bits
    name, x, y = node.name, node.input[0], node.output[0]
    if bits == 4:
        u = (blocks.codes + 8).astype(np.uint8).reshape(n, k // size, size // 2, 2)
        packed = u[..., 0] | (u[..., 1] << 4)  # MatMulNBits: element 2j in the low nibble of byte j
    else:
        packed = (blocks.codes + 128).astype(np.uint8).reshape(n, k // size, size)
    b_name, s_name = f"{name}.weight_Q{bits}", f"{name}.weight_scales"
    inits = [numpy_helper.from_array(np.ascontiguousarray(packed), b_name),
             numpy_helper.from_array(np.ascontiguousarray(blocks.scales), s_name)]
    has_offset = bool(np.any(blocks.offsets))
    nbits_out = f"{name}/nbits" if has_offset else y
    nodes = [onnx.helper.make_node("MatMulNBits", [x, b_name, s_name], [nbits_out], name=f"{name}_Q{bits}",
                                   domain="com.microsoft", K=k, N=n, bits=bits, block_size=size,
                                   accuracy_level=accuracy_level)]
    if has_offset:
        shape, axes, off = f"{name}.block_shape", f"{name}.block_axes", f"{name}.block_offsets"
        inits += [numpy_helper.from_array(np.array([0, 0, k // size, size], np.int64), shape),
                  numpy_helper.from_array(np.array([-1], np.int64), axes),
                  numpy_helper.from_array(np.ascontiguousarray(blocks.offsets.T), off)]
        summed = onnx.helper.make_node("Reshape", [x, shape], [f"{name}/blocks"], name=f"{name}/blocks")
        sums = onnx.helper.make_node("ReduceSum", [f"{name}/blocks", axes], [f"{name}/block_sums"],
                                     name=f"{name}/block_sums", keepdims=0)
        corr = onnx.helper.make_node("MatMul", [f"{name}/block_sums", off], [f"{name}/offset"],
                                     name=f"{name}/offset")
        add = onnx.helper.make_node("Add", [nbits_out, f"{name}/offset"], [y], name=f"{name}/add_offset")
        nodes += [summed, sums, corr, add]
    return nodes, inits
