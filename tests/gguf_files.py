"""Tiny llama GGUF files in any common quantization, written with the `gguf` package, for round-trip tests.

gguf-py quantizes F16, BF16, Q8_0 and Q4_0..Q5_1 itself but only dequantizes k-quants, so Q4_K, Q5_K and Q6_K
blocks are encoded here (a plain min/max fit, not llama.cpp's search: any valid block is a valid test). The
tokenizer is stored as a byte-level vocabulary of single characters (no merges follow from it), with the ChatML
template, so transformers' GGUF loader rebuilds the same char tokenizer the other tests use.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tiny import CHAT_TEMPLATE, SPECIALS

Q = gguf.GGMLQuantizationType
QK_K = 256
# llama.cpp tensor name -> the torch state-dict name of layer i
LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape, 2)


def _kquant_scales(x: np.ndarray, levels: int) -> tuple:
    """Per 32-weight sub-block: 6-bit scale and min indices, the super-block's d and dmin, codes 0..levels."""
    sub = x.reshape(-1, 8, 32)
    mins = np.maximum(0.0, -sub.min(-1))
    scales = (sub.max(-1) + mins) / levels
    d = (scales.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scales / np.where(d == 0, 1, d)), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(mins / np.where(dmin == 0, 1, dmin)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    q = np.clip(np.rint((sub + (dmin * mn)[..., None]) / np.where(step == 0, 1, step)), 0, levels).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)], axis=-1)
    return d, dmin, packed, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Sub-blocks 2g and 2g+1 in the low and high nibbles of 32 bytes each (Q4_K and Q5_K order)."""
    pairs = q.reshape(-1, 4, 2, 32) & 0x0F
    return (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, 128)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _kquant_scales(x, 15)
    return np.concatenate([_fp16(d[:, 0]), _fp16(dmin[:, 0]), scales, _nibbles(q)], axis=-1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _kquant_scales(x, 31)
    high = (q.reshape(-1, 8, 32) >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1).astype(np.uint8)
    return np.concatenate([_fp16(d[:, 0]), _fp16(dmin[:, 0]), scales, qh, _nibbles(q)], axis=-1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    sub = x.reshape(-1, 16, 16)
    scales = np.abs(sub).max(-1) / 31
    d = (scales.max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(scales / np.where(d == 0, 1, d)), -128, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = (np.clip(np.rint(sub / np.where(step == 0, 1, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    low = q & 0x0F  # per half of 128: elements 0..63 in the low nibbles of 64 bytes, 64..127 in the high ones
    ql = (low[:, :, 0:2].reshape(-1, 2, 64) | (low[:, :, 2:4].reshape(-1, 2, 64) << 4)).reshape(-1, 128)
    qh = np.bitwise_or.reduce((q >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None], axis=2)
    return np.concatenate([ql, qh.reshape(-1, 64), sc.view(np.uint8), _fp16(d[:, 0])], axis=-1)


KQUANTS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """GGUF bytes of a [rows, cols] float32 matrix in `qtype` (F32 stays float)."""
    if qtype in (Q.F32, Q.F16):
        return w.astype(np.float32 if qtype == Q.F32 else np.float16)
    if qtype in KQUANTS:
        rows = w.shape[0]
        return KQUANTS[qtype](w.astype(np.float32).reshape(-1, QK_K)).reshape(rows, -1)
    return gguf.quants.quantize(w.astype(np.float32), qtype)


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's RoPE row permutation of attn_q/attn_k."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: Path, model, types: dict[str, Q], default: Q, chars: str,
                     extra: dict[str, np.ndarray] | None = None, feed_forward_length: int | None = None) -> Path:
    """Write the torch llama `model` as a GGUF: tensor `name` in `types.get(name, default)`, norms in F32.

    `types` keys are llama.cpp base names (`attn_v`, `ffn_down`, `output`, `token_embd`); `extra` adds float32
    tensors (`rope_freqs.weight`); `feed_forward_length` overrides the metadata's (to make it disagree).
    """
    config = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(feed_forward_length or config.intermediate_size)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    tokens = SPECIALS + [c for c in dict.fromkeys(chars) if c not in SPECIALS]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control
    writer.add_token_scores([0.0] * len(tokens))  # no merges: the loader derives none from single characters
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)

    def add(name: str, weight: np.ndarray) -> None:
        qtype = types.get(name.rsplit(".", 2)[-2] if name.startswith("blk.") else name.split(".")[0], default)
        data = quantize(weight, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    for name, tensor in (extra or {}).items():
        writer.add_tensor(name, tensor.astype(np.float32))
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if "lm_head.weight" in sd and not config.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(config.num_hidden_layers):
        src = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[src + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[src + "post_attention_layernorm.weight"])
        for name, hf in LAYER_TENSORS.items():
            w = sd[f"{src}{hf}.weight"]
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(name)
            add(f"blk.{i}.{name}.weight", llama_cpp_permute(w, heads) if heads else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
