"""edgespec: fast on-device LLM inference on ONNX Runtime.

The runtime (`edgespec.runtime`) needs only numpy, onnxruntime, tokenizers and jinja2;
`edgespec.export` and `edgespec.quant` need the `[export]` extra (torch, transformers, onnx, gguf).
"""

__all__ = ["Engine", "GenerationResult"]


def __getattr__(name: str):
    # Lazy so that `import edgespec.export` does not load the runtime, and vice versa.
    if name in __all__:
        from edgespec.runtime import engine

        return getattr(engine, name)
    if name == "batch":  # edgespec.batch.run(...): the batch API, which lives with its command in apps/batch
        from edgespec.apps import batch

        return batch
    raise AttributeError(name)
