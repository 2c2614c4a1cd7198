"""What the graph builder needs to know about a decoder, independent of where it came from.

Sources (Hugging Face directory, GGUF, hub id) all end as a `ModelSpec` plus a dict of
numpy weights with the canonical names below, so the builder never sees a framework type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from edgespec.export.rope import RopeSpec, RopeTable, rope_table


@dataclass
class ModelSpec:
    """Shape and feature facts of a pre-norm RMSNorm / RoPE / GQA / gated-MLP decoder (export/architectures.py)."""

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
    attention_bias: bool  # q, k and v biases
    bos_token_id: int | None
    eos_token_ids: list[int]
    param_count: int
    layer_windows: list[int]  # per layer: sliding-window size in tokens, 0 for none
    layer_rope: list[str | None]  # per layer: key into `rope`, None for no RoPE
    rope: dict[str, RopeSpec]
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma)
    attention_output_bias: bool = False
    activation: str = "silu"  # of the gated MLP: silu or gelu_tanh
    embedding_scale: float = 1.0  # Gemma: sqrt(hidden_size)
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    attention_softcap: float = 0.0  # 0: none; else scores become cap·tanh(scores/cap)
    final_logit_softcap: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    def rope_tables(self, max_context: int) -> dict[str, RopeTable]:
        return {name: rope_table(rope, self.head_dim, max_context) for name, rope in self.rope.items()}


def canonical_weight_names(spec: ModelSpec) -> list[str]:
    """Names the builder reads; optional ones only where the spec's features need them."""
    names = ["embed_tokens", "final_norm", "lm_head"]
    for i in range(spec.num_layers):
        p = f"layers.{i}."
        names += [p + n for n in ("input_norm", "q_proj", "k_proj", "v_proj", "o_proj",
                                  "post_attention_norm", "gate_proj", "up_proj", "down_proj")]
        if spec.attention_bias:
            names += [p + "q_bias", p + "k_bias", p + "v_bias"]
        if spec.attention_output_bias:
            names.append(p + "o_bias")
        if spec.qk_norm:
            names += [p + "q_norm", p + "k_norm"]
        if spec.sandwich_norms:
            names += [p + "attn_out_norm", p + "mlp_out_norm"]
    return names
