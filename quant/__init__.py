"""Quantization passes over exported graphs, all through onnxruntime's own quantizers."""
