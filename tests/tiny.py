"""Tiny randomly initialised Hugging Face models for tests: seconds to build, deterministic.

A character-level tokenizer keeps the vocabulary small (down to a dozen tokens for the
statistical sampling tests) while still being a real `tokenizers` tokenizer.json.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer_json(chars: str) -> dict:
    """A WordLevel tokenizer over single characters plus three special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return json.loads(tok.to_str())


def make_byte_level_tokenizer_json(texts: list[str], vocab_size: int = 300) -> dict:
    """A byte-level BPE tokenizer (as GPT-2's and SmolLM2's) trained on `texts`, plus the three special tokens:
    characters it saw no merges for take one token per UTF-8 byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return json.loads(tok.to_str())


def make_tiny_model_dir(path: Path, chars: str | None = None, layers: int = 2, hidden: int = 64,
                        heads: int = 4, kv_heads: int = 2, intermediate: int = 128, seed: int = 0,
                        tie: bool = True, architecture: str = "llama", init_std: float | None = 0.3,
                        embed_scale: float = 1.0, tokenizer: dict | None = None) -> Path:
    """Save a random llama-style model with a char tokenizer (or `tokenizer`, a tokenizer.json's content) and a
    ChatML template to `path`.

    `init_std=None` keeps transformers' initialisation (small activations, as quantizers like);
    the default 0.3 gives varied greedy text for decoding tests.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    chars = chars if chars is not None else string.ascii_letters + string.digits + " \n.,:;()[]=+-*/_'\"#"
    tok_json = tokenizer or make_tokenizer_json(chars)
    vocab_size = len(tok_json["model"]["vocab"])
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(
        architecture, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the default init: varied text and top-2 logit gaps far above noise
        for weight in model.parameters():
            if weight.dim() == 2 and init_std is not None:
                weight.normal_(0.0, init_std)
        model.model.embed_tokens.weight.mul_(embed_scale)
    model.save_pretrained(path)
    write_char_tokenizer(path, tok_json)
    return path


def write_char_tokenizer(path: Path, tok_json: dict) -> None:
    """Save `tok_json` (from `make_tokenizer_json`) with a ChatML template as the tokenizer of the model at `path`."""
    (path / "tokenizer.json").write_text(json.dumps(tok_json))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096}))
    (path / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
