"""What the graph builder needs to know about a decoder, independent of where it came from.

Sources (Hugging Face directory, GGUF, hub id) all end as a `ModelSpec` plus a dict of
numpy weights with the canonical names below, so the builder never sees a framework type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "smollm3")


@dataclass
class ModelSpec:
    """Shape facts of a llama-style decoder (pre-norm, RMSNorm, RoPE, GQA, SwiGLU MLP)."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: list[int]
    param_count: int

    def to_json(self) -> dict:
        return asdict(self)


def canonical_weight_names(spec: ModelSpec) -> list[str]:
    """Names the builder reads; sources must provide each (biases only with attention_bias)."""
    names = ["embed_tokens", "final_norm", "lm_head"]
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        names += [p + n for n in ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj",
                                  "post_attention_norm", "gate_proj", "up_proj", "down_proj")]
        if spec.attention_bias:
            names += [p + "q_bias", p + "k_bias", p + "v_bias"]
    return names


@dataclass
class RopeTable:
    """cos/sin rows for positions 0..max_context-1, as RotaryEmbedding wants them: [max_ctx, head_dim/2]."""

    cos: np.ndarray
    sin: np.ndarray

    @staticmethod
    def from_inv_freq(inv_freq: np.ndarray, max_context: int, scaling: float = 1.0) -> RopeTable:
        pos = np.arange(max_context, dtype=np.float64)[:, None]
        angles = pos * inv_freq.astype(np.float64)[None, :]
        return RopeTable(cos=(np.cos(angles) * scaling).astype(np.float32),
                         sin=(np.sin(angles) * scaling).astype(np.float32))
