"""Weight-only block quantization of the linear layers to `MatMulNBits`, with onnxruntime's own quantizer.

Speculative verification needs a k-token pass to give exactly the logits of smaller passes. With
accuracy_level 4 the kernel quantizes each activation row by itself, so its result for a row does not
depend on the other rows (per-tensor dynamic int8 breaks this: one scale for the whole pass). Whole
graphs are bit-identical across passes of two or more rows; one-row passes take another path in
GroupQueryAttention (fp32 differences of ~1e-7 that int8 activation rounding amplifies), so target graphs
pad attention (only) to two rows (export/graph.py).
"""

from __future__ import annotations

import logging

import onnx

LM_HEAD = "lm_head"
LINEAR_SUFFIXES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantized_linear_names(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes with a constant weight that the exporter created as linear layers."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits
            and (n.name == LM_HEAD or n.name.rsplit(".", 1)[-1] in LINEAR_SUFFIXES)]


def quantize_weight_only(model: onnx.ModelProto, bits: int, block_size: int = 32, accuracy_level: int = 4,
                         lm_head_bits: int = 8) -> onnx.ModelProto:
    """Return a copy of `model` whose layer MatMuls are `bits`-bit and whose LM head is `lm_head_bits`-bit.

    Symmetric quantization (no zero-point input) because the kernel's default zero point is faster than an
    explicit one. The LM head defaults to 8 bits: it is the largest matrix of a small model and the one
    whose rounding moves the argmax most directly; 8-bit MatMulNBits is only fast with accuracy_level 4.
    """
    from onnxruntime.quantization import matmul_nbits_quantizer

    # the module logs every node at INFO level (it configures the root logger to INFO on import)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    for name, value in (("bits", bits), ("lm_head_bits", lm_head_bits)):
        if value not in (4, 8):
            raise ValueError(f"{name} must be 4 or 8, not {value}")
    if not 16 <= block_size <= 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two from 16 to 256, not {block_size}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0..4, not {accuracy_level}")
    if any(n.name == LM_HEAD and n.op_type != "MatMul" for n in model.graph.node):
        raise ValueError("the LM head reads the tied embedding through a Gemm; build the graph with "
                         "tie_lm_head=False so it has its own MatMul weight to quantize")
    linears = quantized_linear_names(model)
    if not linears:
        raise ValueError("the model has no linear MatMul with a constant weight to quantize")
    layer_nodes = [n for n in linears if n != LM_HEAD]
    head_nodes = [n for n in linears if n == LM_HEAD]

    out = onnx.ModelProto()
    out.CopyFrom(model)
    # nodes_to_include does not restrict the quantizer (it is OR-ed with the op type), so each pass
    # excludes every other node instead.
    for nodes, nbits in ((layer_nodes, bits), (head_nodes, lm_head_bits)):
        if not nodes:
            continue
        others = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.name not in nodes]
        quantizer = matmul_nbits_quantizer.MatMulNBitsQuantizer(
            out, bits=nbits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
            nodes_to_exclude=others)
        quantizer.process()
        out = quantizer.model.model
    left = quantized_linear_names(out)
    if left:
        raise RuntimeError(f"the quantizer left fp32 MatMuls for {left}")
    return out
