"""Static QDQ quantization of the **static** graph variant for NPUs (QNN HTP style: uint16 activations, uint8 weights).

NPUs run integer MatMuls whose activation scales are fixed ahead of time, so activations are
calibrated by running the fp32 static graph over real prompts. Calibration feeds carry real KV
contents (the runtime's buffers after the earlier chunks), not zeros: attention ranges depend on them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from edgespec.quant.names import kv_input_names

# Where the attention mask is added (if Add is quantized), calibration would see the builder's -3.4e38 mask
# value and stretch the scores' range until every real score rounds to the same code. Clamping that range's
# minimum instead makes masked scores saturate at -MASK_FLOOR, which softmax still turns into zero
# (exp(-100) is below fp16's smallest value) while real scores keep their resolution.
MASK_FLOOR = 100.0
ACTIVATION_TYPES = ("uint16", "uint8")
WEIGHT_TYPES = ("uint8",)


def calibration_feeds(static_model: onnx.ModelProto, token_lists: list[list[int]], max_context: int,
                      chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """Yield the static graph's input feeds for each chunk of each prompt, the way the runtime would run them.

    Each prompt starts from an empty KV buffer; after every chunk its `new_key/new_value` rows are copied
    into the buffer at the write index (docs/kv-interface.md). A short last chunk is padded with token 0;
    padded rows are never kept. Every yielded dict owns its arrays.
    """
    import onnxruntime as ort

    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in static_model.graph.input}
    if shapes.get("input_ids") != [1, chunk]:
        raise ValueError(f"the model's input_ids shape is {shapes.get('input_ids')}, not [1, {chunk}]: "
                         "calibration needs the static variant built with this chunk length")
    kv_names = [n for n in shapes if n.startswith(("past_key.", "past_value."))]
    num_layers = len(kv_names) // 2
    if not kv_names or kv_input_names(num_layers) != kv_names:
        raise ValueError("the model does not have the edgespec KV inputs past_key.{i} / past_value.{i}")
    if shapes[kv_names[0]][2] != max_context:
        raise ValueError(f"the model's KV buffers hold {shapes[kv_names[0]][2]} slots, not max_context={max_context}")
    too_long = [len(t) for t in token_lists if len(t) > max_context or not t]
    if too_long:
        raise ValueError(f"calibration prompts must have 1..{max_context} tokens; got lengths {too_long}")

    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(static_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    mask = np.tril(np.ones((chunk, chunk), bool))
    for tokens in token_lists:
        kv = {n: np.zeros(shapes[n], np.float32) for n in kv_names}
        for start in range(0, len(tokens), chunk):
            real = tokens[start:start + chunk]
            ids = np.zeros((1, chunk), np.int64)
            ids[0, :len(real)] = real
            positions = np.minimum(np.arange(start, start + chunk), max_context - 1)[None].astype(np.int64)
            feed = {"input_ids": ids, "position_ids": positions, "attention_mask": mask.copy(),
                    "past_length": np.array([start], np.int64)}
            feed.update({n: a.copy() for n, a in kv.items()})
            yield feed
            result = dict(zip(outputs, session.run(None, feed), strict=True))
            for n in kv_names:
                new = result[n.replace("past_", "new_")]
                kv[n][:, :, start:start + len(real)] = new[:, :, :len(real)]


def quantize_qdq(model: onnx.ModelProto, calibration_feeds: Iterable[dict[str, np.ndarray]],
                 activation_type: str = "uint16", weight_type: str = "uint8",
                 op_types: Sequence[str] | None = ("MatMul",)) -> onnx.ModelProto:
    """Return the QDQ-quantized static graph, with QNN's compatibility overrides (get_qnn_qdq_config).

    Only MatMuls (the linear layers and attention) are quantized by default; `op_types=None` quantizes
    every operator type the QNN config supports. One scale per tensor cannot hold the residual stream of
    models with "massive activations" (SmolLM2-135M: |x| up to ~25,000 in a few channels next to values
    near 1, and their squares in RMSNorm up to 6e8): quantizing everything gave 3/160 teacher-forced top-1
    agreement with fp32 on the default model, MatMuls only 136/160.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    if activation_type not in ACTIVATION_TYPES:
        raise ValueError(f"activation_type must be one of {ACTIVATION_TYPES}, not {activation_type!r}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, not {weight_type!r}")
    if any(n.domain == "com.microsoft" for n in model.graph.node):
        raise ValueError("QDQ quantization is for the static graph variant; this graph uses contrib operators")

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(calibration_feeds)

        def get_next(self) -> dict | None:
            return next(self._feeds, None)

    qtypes = {"uint16": QuantType.QUInt16, "uint8": QuantType.QUInt8}
    overrides = {name: [{"rmin": np.array(-MASK_FLOOR, np.float32)}] for name in _masked_score_tensors(model)}
    # The quantizer gets a file of a copy: saving a proto with external data (which the quantizer does
    # with protos it is given) rewrites its initializers to point at the file, here a deleted temporary one.
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(copy, str(src), save_as_external_data=True, location="fp32.onnx.data")
        del copy
        config = get_qnn_qdq_config(str(src), _Reader(), activation_type=qtypes[activation_type],
                                    weight_type=qtypes[weight_type], init_overrides=overrides,
                                    op_types_to_quantize=list(op_types) if op_types else None)
        quantize(str(src), str(dst), config)
        return onnx.load(str(dst))


def _masked_score_tensors(model: onnx.ModelProto) -> list[str]:
    """The attention biases (outputs of the builder's `attention_bias` nodes, one per sliding-window size) and the
    masked scores they are added into."""
    bias = [n.output[0] for n in model.graph.node if n.name.endswith("attention_bias")]
    if not bias:
        raise ValueError("the static graph has no attention_bias node; was it built by edgespec.export.graph?")
    return bias + [n.output[0] for n in model.graph.node if n.op_type == "Add" and set(bias) & set(n.input)]
