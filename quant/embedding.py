"""8-bit block-quantized token embeddings (`GatherBlockQuantized`), exact for a table that is Q8_0 already.

SmolLM2-135M's fp32 embedding table is 113 MB: more than all of its int4 layers and its LM head
together, and a derived draft holds a second copy, so a quantized target-and-draft bundle shipped 226 MB
of fp32 rows of which a pass reads one per token (onnxruntime maps them from the file, so they cost disk
and download, not resident memory). In 8-bit blocks of 32 a table takes 28 MB + scales and a lookup
still reads one row. onnxruntime's MatMulNBitsQuantizer quantizes a Gather to 4 bits only,
so the 8-bit codes are made here, as llama.cpp's Q8_0 makes them (symmetric, scale = max|x| / 127
rounded to fp16). A table dequantized from a GGUF's Q8_0 blocks (SmolLM2's GGUF ties its head to one)
comes back bit for bit, which the exporter checks for GGUF-exact bundles.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgespec.quant.names import MS_DOMAIN

EMBEDDING_NODE = "embed_tokens"


def q8_blocks(table: np.ndarray, block_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(codes as uint8 = q + 128, fp32 scales [rows, cols / block_size]) of a [rows, cols] table."""
    rows, cols = table.shape
    if cols % block_size:
        raise ValueError(f"embedding width {cols} is not a multiple of the block size {block_size}")
    blocks = table.astype(np.float32).reshape(rows, cols // block_size, block_size)
    scales = (np.abs(blocks).max(-1) / 127).astype(np.float16).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    codes = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int16) + 128
    return codes.reshape(rows, cols).astype(np.uint8), scales


def dequantize_q8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The table `GatherBlockQuantized` reads from `q8_blocks`' codes and scales (default zero point 128)."""
    rows, cols = codes.shape
    blocks = (codes.astype(np.float32) - 128).reshape(rows, scales.shape[1], -1) * scales[..., None]
    return blocks.reshape(rows, cols)


def quantize_embedding(model: onnx.ModelProto, block_size: int = 32,
                       exact_only: bool = False) -> tuple[onnx.ModelProto, dict]:
    """Return `model` with its embedding Gather in 8-bit blocks, and a manifest summary.

    `exact_only` keeps the fp32 table unless the codes reproduce it exactly (GGUF-exact bundles promise
    the file's numbers). A graph whose LM head reads the same table (a tied fp32 head) is left alone.
    """
    inits = {t.name: t for t in model.graph.initializer}
    node = next((n for n in model.graph.node if n.name == EMBEDDING_NODE and n.op_type == "Gather"), None)
    if node is None or node.input[0] not in inits:
        return model, {"embedding": "unchanged: no embedding Gather on a constant table"}
    if sum(node.input[0] in n.input for n in model.graph.node) > 1:
        return model, {"embedding": "fp32: the LM head reads the same table"}
    table = numpy_helper.to_array(inits[node.input[0]])
    if table.ndim != 2 or table.shape[1] % block_size:
        return model, {"embedding": f"fp32: width {table.shape[-1]} is not a multiple of {block_size}"}
    codes, scales = q8_blocks(table, block_size)
    error = float(np.abs(dequantize_q8(codes, scales) - table).max())
    if exact_only and error != 0.0:
        return model, {"embedding": f"fp32: 8-bit blocks would move it by up to {error:.2g}"}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name = node.input[0]
    kept = [t for t in out.graph.initializer if t.name != name]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + [numpy_helper.from_array(codes, name + "_Q8"),
                                         numpy_helper.from_array(scales, name + "_scales")])
    quantized = helper.make_node("GatherBlockQuantized", [name + "_Q8", node.input[1], name + "_scales"],
                                 list(node.output), name=EMBEDDING_NODE, domain=MS_DOMAIN, gather_axis=0,
                                 quantize_axis=1, block_size=block_size, bits=8)
    index = next(i for i, n in enumerate(out.graph.node) if n.name == EMBEDDING_NODE)
    out.graph.node.remove(out.graph.node[index])
    out.graph.node.insert(index, quantized)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, {"embedding": f"8-bit blocks of {block_size}", "embedding_max_error": error}
