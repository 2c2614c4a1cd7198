"""What the graph builder (export/graph.py) and the quantizers agree on about a decoder graph: the domain of
onnxruntime's contrib operators and the names of the KV inputs; and the shape facts of a model the quantizers
read. They live here, below both, because `export` uses `quant` and `quant` must not use `export`."""

from __future__ import annotations

from typing import Protocol

MS_DOMAIN = "com.microsoft"


def kv_input_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


class DecoderShape(Protocol):
    """The facts of a model (export/spec.py `ModelSpec`) that a quantizer needs to lay its weights out."""

    num_layers: int
    num_heads: int
    num_kv_heads: int


class QuantError(Exception):
    """A quantizer cannot do what it was asked on this model; `edge-export` reports it in one line."""
