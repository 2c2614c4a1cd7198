"""fp16 graphs (for GPU and NPU providers) with onnxruntime's own float16 converter.

Graph inputs and outputs stay fp32 (and bool): the runtime feeds one KV buffer type whatever the
graph's precision; the converter inserts the casts at the graph's edges. In the fused variant the
present outputs are casts of GroupQueryAttention's fp16 present, so binding them to the same fp32
buffer as the past inputs still works, at the cost of converting the whole buffer every pass.
"""

from __future__ import annotations

import onnx


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return an fp16 copy of `model` with fp32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return convert_float_to_float16(copy, keep_io_types=True)
