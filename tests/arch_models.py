"""Tiny random models of each supported family, each config setting every feature the family has.

Windows (6 tokens) are shorter than the test prompts, so sliding-window layers really drop slots; norms and
biases are random too, so a missing `(1 + w)` or a dropped bias changes the tokens.
"""

from __future__ import annotations

import string
from pathlib import Path

from tiny import make_tokenizer_json, write_char_tokenizer

WINDOW = 6
CHARS = string.ascii_letters + string.digits + " \n.,:;()[]=+-*/_'\"#"
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)

FAMILY_CONFIGS: dict[str, dict] = {
    # llama3 RoPE with an original context whose band edges fall inside a 16-dim head's wavelengths
    "llama": dict(attention_bias=True, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512}),
    "mistral": dict(sliding_window=WINDOW, head_dim=16, tie_word_embeddings=True),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, tie_word_embeddings=True),
    # YaRN as Qwen3 enables it for long contexts, with an original context whose ramp spans a 16-dim head
    "qwen3": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2, head_dim=16,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                             "original_max_position_embeddings": 256}),
    "smollm3": dict(no_rope_layer_interval=2, use_sliding_window=True, sliding_window=WINDOW,
                    tie_word_embeddings=True),
    # half-rotary heads, longrope with an original context of 128 (short factors up to 128 tokens, long beyond)
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=WINDOW, tie_word_embeddings=False,
                 max_position_embeddings=512, original_max_position_embeddings=128, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 2.1, 3.5],
                     "long_factor": [1.2, 2.5, 5.0, 9.0]}),
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, attn_logit_softcapping=5.0,
                   final_logit_softcapping=20.0, layer_types=["sliding_attention", "full_attention"] * 2),
    # local layers with their own base, global ones with linear scaling; query_pre_attn_scalar != head_dim
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW, final_logit_softcapping=20.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                            "rope_theta": 1000000.0}}),
}


def make_family_dir(path: Path, model_type: str, seed: int = 0, **overrides) -> Path:
    """Save a random `model_type` model (every family feature on, see FAMILY_CONFIGS) with a char tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_json = make_tokenizer_json(CHARS)
    config = AutoConfig.for_model(model_type, vocab_size=len(tok_json["model"]["vocab"]),
                                  **{**BASE, **FAMILY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wide weights: varied text and top-2 logit gaps far above rounding noise
        for name, weight in model.named_parameters():
            if weight.dim() == 2:
                weight.normal_(0.0, 0.3)
            elif name.endswith("bias"):
                weight.normal_(0.0, 0.3)
            else:  # norm gains: around 1, or around 0 for Gemma's (1 + w)
                weight.add_(torch.randn_like(weight) * 0.2)
        # Gemma multiplies embeddings by sqrt(hidden): undo it in the table, or the embedding outweighs every
        # (normed) block output and the model repeats its input token
        model.model.embed_tokens.weight.div_(getattr(model.model.embed_tokens, "scalar_embed_scale", 1.0))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    write_char_tokenizer(path, tok_json)
    return path
