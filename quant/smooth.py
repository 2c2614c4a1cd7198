"""Move activation outliers into the weights before W8A8 (SmoothQuant, Xiao et al. 2023), folded into existing weights.

A row quantized with one scale (max|row| / 127, quant/rowwise.py) spends its levels on its largest entry. In
SmolLM2-135M some input channels of the linears are far larger than the rest (fp32 graph, 120 calibration
tokens: the largest channel maximum of a down-projection input is 10-4865x the median channel's, of a qkv input
9-29x), so the other entries of those rows round to a few codes. Dividing input channel k by s_k and multiplying
the weight's row k by s_k computes the same product; with s_k = a_k^α / w_k^(1-α) (a_k: the channel's calibrated
activation maximum, w_k: its largest weight, α = 0.5 as in the paper) rows get flatter and weights a little less so.
The division is folded into what makes the input (the RMSNorm gains before qkv, gate/up and the LM head, the
up-projection's rows before down), so the graph gains no op. onnxruntime's own SmoothQuant option inserts Mul
nodes for its static QDQ quantizer through neural-compressor; it does not apply to these graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from edgespec.quant.names import DecoderShape
from edgespec.quant.weight_only import LM_HEAD, quantized_linear_names

ALPHA = 0.5


def activation_maxima(model: onnx.ModelProto, token_lists: list[list[int]]) -> dict[str, np.ndarray]:
    """Linear node name -> per-input-channel max |x| over `token_lists`, each run as one causal pass from position 0."""
    names = set(quantized_linear_names(model))
    linears = {n.name: n.input[0] for n in model.graph.node if n.name in names}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in sorted(set(linears.values())):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    maxima: dict[str, np.ndarray] = {}
    for tokens in token_lists:
        n = len(tokens)
        feeds = {}
        for value in session.get_inputs():
            if value.name == "input_ids":
                feeds[value.name] = np.array([tokens], np.int64)
            elif value.name == "position_ids":
                feeds[value.name] = np.arange(n, dtype=np.int64)[None]
            elif value.name == "attention_mask":
                feeds[value.name] = np.tril(np.ones((n, n), bool))
            elif value.name in ("past_length", "logits_from"):
                feeds[value.name] = np.zeros(1, np.int64)
            else:  # the KV buffers, empty
                feeds[value.name] = np.zeros(value.shape, np.float32)
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        for name, tensor in linears.items():
            m = np.abs(outputs[tensor]).reshape(-1, outputs[tensor].shape[-1]).max(0)
            maxima[name] = np.maximum(maxima[name], m) if name in maxima else m
    return maxima


def smoothing_scales(activation_max: np.ndarray, weights: list[np.ndarray], alpha: float = ALPHA) -> np.ndarray:
    """s_k for one linear input shared by `weights` (torch layout [out, in]); 1 where a channel never fired."""
    w = np.max([np.abs(x).max(0) for x in weights], axis=0)
    a = activation_max.astype(np.float64)
    s = np.where((a > 0) & (w > 0), a ** alpha / np.maximum(w, 1e-12) ** (1 - alpha), 1.0)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def smooth_weights(weights: dict[str, np.ndarray], spec: DecoderShape, maxima: dict[str, np.ndarray],
                   alpha: float = ALPHA) -> dict[str, np.ndarray]:
    """A new weights dict (exporter names, torch layout) computing the same function with flatter linear inputs."""
    out = dict(weights)  # arrays are replaced, never changed in place: embed_tokens and lm_head may be one array

    def fold(norm: str, consumers: list[str], linear: str) -> None:
        s = smoothing_scales(maxima[linear], [weights[c] for c in consumers], alpha)
        out[norm] = (weights[norm] / s).astype(np.float32)
        for c in consumers:
            out[c] = (weights[c] * s[None, :]).astype(np.float32)

    for i in range(spec.num_layers):
        p = f"layers.{i}."
        fold(p + "input_norm", [p + "q_proj", p + "k_proj", p + "v_proj"], p + "qkv_proj")
        fold(p + "post_attention_norm", [p + "gate_proj", p + "up_proj"], p + "gate_up_proj")
        # down's input is silu(gate) * up, linear in up's output rows; fold after gate/up were scaled above
        s = smoothing_scales(maxima[p + "down_proj"], [weights[p + "down_proj"]], alpha)
        out[p + "up_proj"] = (out[p + "up_proj"] / s[:, None]).astype(np.float32)
        out[p + "down_proj"] = (weights[p + "down_proj"] * s[None, :]).astype(np.float32)
    if LM_HEAD in maxima:
        fold("final_norm", [LM_HEAD], LM_HEAD)
    return out
