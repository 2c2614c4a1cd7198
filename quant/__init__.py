"""Quantization passes over exported graphs: onnxruntime's own quantizers, plus a GGUF block repacker."""
