"""Checks and fixes for GGUF sources before transformers loads them.

transformers dequantizes a GGUF's blocks with the `gguf` package and rebuilds config and tokenizer (chat template,
special tokens) from its metadata. Three things are settled here first, so that bad input fails with one clear
line instead of a deep traceback or a silently different model:
- every tensor's type is one edge-export reads (an unknown type is refused by name);
- every weight's shape agrees with the metadata (a file whose metadata lies would load into the wrong shapes);
- Llama 3.1+ RoPE scaling, which llama.cpp stores as a `rope_freqs` tensor of per-frequency divisors and
  transformers' GGUF loader drops, is put back into the config (export/rope.py applies it as explicit factors).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgespec.export.errors import ExportError, first_line

# llama.cpp architectures whose GGUFs transformers loads into a family edge-export builds
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def field(reader, key: str, default=None):
    """A metadata value: a string, a number, or a list for arrays."""
    f = reader.fields.get(key)
    if f is None:
        return default
    values = [f.parts[i] for i in f.data]
    if f.types and f.types[-1].name == "STRING":
        values = [bytes(v).decode() for v in values]
    else:
        values = [v.tolist()[0] if len(v) == 1 else v.tolist() for v in values]
    return values[0] if len(values) == 1 and f.types[0].name != "ARRAY" else values


def check_gguf(path: Path):
    """Open `path` with the gguf package and check architecture, tensor types and shapes; returns the reader."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise ExportError(f"{path} is not a readable GGUF file (truncated or corrupt): {first_line(exc)}") from exc
    arch = field(reader, "general.architecture")
    if arch is None:
        raise ExportError(f"{path} has no general.architecture field")
    if arch not in ARCHITECTURES:
        raise ExportError(f"unsupported architecture {arch!r} in {path}; edge-export reads GGUFs of "
                          f"{', '.join(ARCHITECTURES)}")
    unknown = [(t.name, t.tensor_type.name) for t in reader.tensors if t.tensor_type.name not in TYPES]
    if unknown:
        raise ExportError(f"unsupported GGUF quantization type {unknown[0][1]} (tensor {unknown[0][0]}) in {path}; "
                          f"edge-export reads {', '.join(TYPES)}")
    _check_shapes(reader, arch, path)
    return reader


def _check_shapes(reader, arch: str, path: Path) -> None:
    """The weights' shapes against the sizes the metadata states (GGUF lists dims innermost first)."""
    hidden = field(reader, f"{arch}.embedding_length")
    heads = field(reader, f"{arch}.attention.head_count")
    kv_heads = field(reader, f"{arch}.attention.head_count_kv", heads)
    ff = field(reader, f"{arch}.feed_forward_length")
    if None in (hidden, heads, ff):
        raise ExportError(f"{path} lacks {arch}.embedding_length, .attention.head_count or .feed_forward_length")
    head_dim = field(reader, f"{arch}.attention.key_length", hidden // heads)
    expected = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
                "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
                "ffn_gate": (ff, hidden), "ffn_down": (hidden, ff), "attn_norm": (hidden,), "ffn_norm": (hidden,),
                "output_norm": (hidden,), "token_embd": (None, hidden), "output": (None, hidden)}
    for tensor in reader.tensors:
        kind = tensor.name.split(".")[-2]
        want = expected.get(kind) if tensor.name.endswith(".weight") else None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if want is not None and not _fits(shape, want):
            raise ExportError(f"tensor {tensor.name} of {path} has shape {shape}, but the metadata (hidden {hidden}, "
                              f"heads {heads}/{kv_heads} of {head_dim}, feed-forward {ff}) makes it "
                              f"{tuple('vocab' if w is None else w for w in want)}")


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w in (None, s) for w, s in zip(want, shape, strict=True))


def rope_factors(reader) -> np.ndarray | None:
    """The `rope_freqs` divisors of the rotary frequencies (llama.cpp's form of Llama 3.1+ scaling), if any."""
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if tensor is None else np.asarray(tensor.data, np.float32).reshape(-1)


def apply_rope_factors(config, factors: np.ndarray) -> None:
    """Give transformers' config the file's frequency divisors: `longrope` with one factor set for every length
    and no attention factor computes inv_freq / factor, which is what llama.cpp does with `rope_freqs`."""
    params = dict(config.rope_parameters)
    factors = [float(f) for f in factors]
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": params["rope_theta"],
                              "partial_rotary_factor": params.get("partial_rotary_factor", 1.0),
                              "short_factor": factors, "long_factor": factors, "factor": 1.0,
                              "attention_factor": 1.0,
                              "original_max_position_embeddings": config.max_position_embeddings}

