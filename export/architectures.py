"""Which decoder families edge-export builds, and how a transformers model reduces to a `ModelSpec` and weights.

Every feature the graph implements is read from the model's config (windows, RoPE variants per layer, layers
without RoPE, soft-capping, activation, attention scale) or from which weights exist (q/k norms, norms on the
attention and MLP outputs, fused projections, biases); the family (`model_type`) only says what neither
expresses: Gemma's `(1 + w)` RMSNorm and sqrt(hidden) embedding scale, and whether the family's transformers
code applies attention soft-capping. A config feature the builder does not implement is refused by name
instead of being ignored, and so is a `model_type` outside `FAMILIES`, with the closest family and what it lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgespec.export.errors import ExportError
from edgespec.export.rope import RopeSpec, rope_from_parameters
from edgespec.export.spec import ModelSpec

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Family:
    """A transformers decoder family and the facts about it that its config does not state."""

    model_type: str
    examples: str
    features: tuple[str, ...]  # what the builder implements for it, for --list-architectures
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w); the weights are stored as 1 + w
    scaled_embeddings: bool = False  # Gemma multiplies the embeddings by sqrt(hidden_size)
    attention_softcap: bool = False  # the family's transformers code applies attn_logit_softcapping


COMMON = ("grouped-query attention", "RoPE: default, linear, llama3, longrope, yarn (from rope_parameters)",
          "tied or separate LM head", "gated MLP (silu or gelu_pytorch_tanh)")
FAMILIES = {f.model_type: f for f in (
    Family("llama", "Llama 2, Llama 3.x, SmolLM2, TinyLlama",
           ("llama3 RoPE scaling", "q/k/v/o biases (attention_bias)")),
    Family("mistral", "Mistral 7B", ("sliding window on every layer (sliding_window)",)),
    Family("qwen2", "Qwen2, Qwen2.5", ("q/k/v biases", "sliding-window layers (layer_types)")),
    Family("qwen3", "Qwen3 dense", ("per-head q/k RMSNorm", "sliding-window layers (layer_types)")),
    Family("smollm3", "SmolLM3", ("layers without RoPE (no_rope_layers)", "sliding-window layers (layer_types)")),
    Family("phi3", "Phi-3, Phi-3.5-mini, Phi-4-mini", (
        "fused qkv_proj and gate_up_proj", "partial rotary (partial_rotary_factor)", "longrope/su scaling",
        "sliding window on every layer (sliding_window)")),
    Family("gemma2", "Gemma 2", (
        "sqrt(hidden) embedding scale", "(1 + w) RMSNorm", "norms before and after attention and MLP",
        "gelu_pytorch_tanh MLP", "sliding-window layers", "query_pre_attn_scalar",
        "attention and final logit soft-capping"), norm_offset=1.0, scaled_embeddings=True, attention_softcap=True),
    Family("gemma3_text", "Gemma 3 1B, the text model of Gemma 3", (
        "sqrt(hidden) embedding scale", "(1 + w) RMSNorm", "norms before and after attention and MLP",
        "gelu_pytorch_tanh MLP", "per-head q/k RMSNorm", "sliding-window layers with their own RoPE base",
        "query_pre_attn_scalar", "final logit soft-capping"), norm_offset=1.0, scaled_embeddings=True),
)}

# model_type -> (closest family, what it lacks); any other model_type gets a closest family by config fields
NOT_SUPPORTED = {
    "gemma3": ("gemma3_text", ["vision tower (multimodal checkpoint: export its text model, model_type gemma3_text)"]),
    "gemma3n": ("gemma3_text", ["per-layer embeddings", "AltUp", "LAuReL blocks", "KV sharing between layers"]),
    "mixtral": ("mistral", ["mixture-of-experts MLP"]),
    "qwen2_moe": ("qwen2", ["mixture-of-experts MLP", "shared expert"]),
    "qwen3_moe": ("qwen3", ["mixture-of-experts MLP"]),
    "phi": ("phi3", ["LayerNorm with bias", "parallel attention and MLP", "ungated GELU MLP", "separate biases"]),
    "phimoe": ("phi3", ["mixture-of-experts MLP", "LayerNorm with bias"]),
    "olmo2": ("qwen3", ["norms after attention and MLP only", "q/k RMSNorm over all heads together"]),
    "granite": ("llama", ["embedding, residual, attention and logit multipliers"]),
    "cohere": ("llama", ["LayerNorm with bias", "parallel attention and MLP", "logit scale"]),
    "starcoder2": ("mistral", ["LayerNorm with bias", "ungated GELU MLP", "biases on every linear"]),
    "gpt2": ("llama", ["learned absolute positions", "LayerNorm with bias", "ungated GELU MLP", "fused c_attn"]),
}


def family_of(config, source: str) -> Family:
    """The family of `config`, or an error naming the closest supported one and what it lacks."""
    model_type = getattr(config, "model_type", None)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    closest, missing = NOT_SUPPORTED.get(model_type) or _closest_by_fields(config)
    raise ExportError(f"unsupported architecture {model_type!r} in {source}: the closest supported family is "
                      f"{closest}, which lacks {', '.join(missing)} (edge-export --list-architectures)")


def _closest_by_fields(config) -> tuple[str, list[str]]:
    """The family whose default config shares most fields with `config`, and the fields it does not know."""
    from transformers import AutoConfig

    fields = {k for k, v in config.to_dict().items() if v not in (None, False, [], {})}
    known = {name: set(AutoConfig.for_model(name).to_dict()) for name in FAMILIES}
    name = max(known, key=lambda n: len(fields & known[n]) / len(fields | known[n]))
    extra = sorted(fields - known[name] - {"architectures", "transformers_version", "model_type", "dtype"})
    return name, [f"what the config fields {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''} set" if extra
                  else "this model's modeling code"]


def config_problems(config, family: Family) -> list[str]:
    """Names of config features the graph builder does not implement (empty when it implements them all)."""
    problems = []
    if getattr(config, "attn_logit_softcapping", None) and not family.attention_softcap:
        problems.append("attention logit soft-capping (attn_logit_softcapping; transformers' "
                        f"{family.model_type} code does not apply it either)")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention (use_bidirectional_attention)")
    if getattr(config, "mlp_bias", False):
        problems.append("MLP biases (mlp_bias)")
    activation = _activation_name(config)
    if activation not in ACTIVATIONS:
        problems.append(f"MLP activation {activation!r}")
    types = list(getattr(config, "layer_types", None) or [])
    problems += [f"attention layer type {t!r}" for t in sorted(set(types) - set(LAYER_TYPES))]
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        problems.append("sliding-window layers without a sliding_window size")
    for params in _rope_parameter_sets(config).values():
        try:
            rope_from_parameters(params, _head_dim(config), config.max_position_embeddings)
        except ExportError as exc:
            problems.append(str(exc).removeprefix("unsupported: "))
    return problems


def check_config(config, source: str) -> Family:
    """The family of `config` once every feature it sets is one the builder implements."""
    family = family_of(config, source)
    problems = config_problems(config, family)
    if problems:
        raise ExportError(f"unsupported: {'; '.join(problems)} (in {source})")
    return family


def _activation_name(config) -> str:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameter_sets(config) -> dict[str, dict]:
    """RoPE parameter dicts by name: one per layer type where the config nests them (Gemma 3), else 'default'."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise ExportError("unsupported: a config without rope_parameters (positions other than RoPE)")
    nested = {t: params[t] for t in set(getattr(config, "layer_types", None) or []) if isinstance(params.get(t), dict)}
    return nested or {"default": params}


def layer_windows(config) -> list[int]:
    """Sliding-window size of each layer (0: none), as transformers' masks apply it: on the `sliding_attention`
    layers where the config has `layer_types`, else on every layer when it sets `sliding_window` (Mistral, Phi-3)."""
    window = int(getattr(config, "sliding_window", None) or 0)
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * config.num_hidden_layers
    return [window if t == "sliding_attention" else 0 for t in types]


def layer_ropes(config, layers) -> tuple[list[str | None], dict[str, RopeSpec]]:
    """Each layer's RoPE name (None: no RoPE) and the named RoPE variants.

    Whether a layer rotates is read from its attention module (`use_rope`, which SmolLM3 sets from
    `no_rope_layers`): a draft derived from a subset of the target's layers keeps its modules' flags, while the
    config's list still describes the target's layers.
    """
    sets = _rope_parameter_sets(config)
    specs = {name: rope_from_parameters(p, _head_dim(config), config.max_position_embeddings)
             for name, p in sets.items()}
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    names = [(t if t in specs else "default") if getattr(layer.self_attn, "use_rope", True) else None
             for t, layer in zip(types, layers, strict=True)]
    return names, {n: s for n, s in specs.items() if n in names}


def model_spec(model, config, family: Family, sd: dict[str, np.ndarray]) -> ModelSpec:
    """The shape and feature facts of a loaded transformers model."""
    n = config.num_hidden_layers
    layer_rope, rope = layer_ropes(config, model.model.layers)
    attention_scale = getattr(config, "query_pre_attn_scalar", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    return ModelSpec(
        architecture=config.model_type, num_layers=n, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads, head_dim=_head_dim(config), vocab_size=config.vocab_size,
        rms_norm_eps=float(config.rms_norm_eps), tie_word_embeddings=bool(config.tie_word_embeddings),
        attention_bias=_has(sd, "self_attn.q_proj.bias") or _has(sd, "self_attn.qkv_proj.bias"),
        bos_token_id=config.bos_token_id, eos_token_ids=eos_token_ids(model, config),
        param_count=int(sum(p.numel() for p in model.parameters())),
        layer_windows=layer_windows(config), layer_rope=layer_rope, rope=rope,
        qk_norm=_has(sd, "self_attn.q_norm.weight"), sandwich_norms=_has(sd, "post_feedforward_layernorm.weight"),
        attention_output_bias=_has(sd, "self_attn.o_proj.bias"), activation=ACTIVATIONS[_activation_name(config)],
        embedding_scale=float(np.float32(config.hidden_size ** 0.5)) if family.scaled_embeddings else 1.0,
        attention_scale=float(attention_scale) ** -0.5 if attention_scale else None,
        attention_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        final_logit_softcap=float(softcap or 0.0))


def eos_token_ids(model, config) -> list[int]:
    eos = config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if e not in ids:
            ids.append(e)
    return ids


def _has(sd: dict, suffix: str) -> bool:
    return f"model.layers.0.{suffix}" in sd


def canonical_weights(sd: dict[str, np.ndarray], spec: ModelSpec, family: Family) -> dict[str, np.ndarray]:
    """The builder's weight names (export/spec.py), with fused projections split and Gemma norms as 1 + w."""
    def norm(name: str) -> np.ndarray:
        return (sd[name] + np.float32(family.norm_offset)).astype(np.float32) if family.norm_offset else sd[name]

    w = {"embed_tokens": sd["model.embed_tokens.weight"], "final_norm": norm("model.norm.weight"),
         "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        w[dst + "input_norm"] = norm(src + "input_layernorm.weight")
        if spec.sandwich_norms:  # Gemma: post_attention_layernorm is on the attention output
            w[dst + "attn_out_norm"] = norm(src + "post_attention_layernorm.weight")
            w[dst + "post_attention_norm"] = norm(src + "pre_feedforward_layernorm.weight")
            w[dst + "mlp_out_norm"] = norm(src + "post_feedforward_layernorm.weight")
        else:
            w[dst + "post_attention_norm"] = norm(src + "post_attention_layernorm.weight")
        w.update(_attention_weights(sd, src + "self_attn.", dst, spec))
        w.update(_mlp_weights(sd, src + "mlp.", dst, spec))
        if spec.qk_norm:
            w[dst + "q_norm"] = norm(src + "self_attn.q_norm.weight")
            w[dst + "k_norm"] = norm(src + "self_attn.k_norm.weight")
    return w


def _attention_weights(sd: dict, src: str, dst: str, spec: ModelSpec) -> dict[str, np.ndarray]:
    """q/k/v/o weights and biases; Phi-3's fused qkv_proj is split into its q, k and v rows."""
    out = {dst + "o_proj": sd[src + "o_proj.weight"]}
    if spec.attention_output_bias:
        out[dst + "o_bias"] = sd[src + "o_proj.bias"]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    for kind in ("weight", "bias") if spec.attention_bias else ("weight",):
        suffix = "proj" if kind == "weight" else "bias"
        if src + f"qkv_proj.{kind}" in sd:
            parts = np.split(sd[src + f"qkv_proj.{kind}"], [q, q + kv])
        else:
            parts = [sd[src + f"{p}_proj.{kind}"] for p in "qkv"]
        out.update({f"{dst}{p}_{suffix}": part for p, part in zip("qkv", parts, strict=True)})
    return out


def _mlp_weights(sd: dict, src: str, dst: str, spec: ModelSpec) -> dict[str, np.ndarray]:
    """gate/up/down weights; Phi-3's fused gate_up_proj holds the gate rows first."""
    if src + "gate_up_proj.weight" in sd:
        gate, up = np.split(sd[src + "gate_up_proj.weight"], [spec.intermediate_size])
    else:
        gate, up = sd[src + "gate_proj.weight"], sd[src + "up_proj.weight"]
    return {dst + "gate_proj": gate, dst + "up_proj": up, dst + "down_proj": sd[src + "down_proj.weight"]}


def describe_families() -> str:
    """The text of `edge-export --list-architectures`."""
    lines = ["Supported model_type values (every family: " + "; ".join(COMMON) + "):"]
    for f in FAMILIES.values():
        lines.append(f"  {f.model_type:<12} {f.examples}: {'; '.join(f.features)}")
    lines.append("Not supported (closest family: what it lacks):")
    for name, (closest, missing) in NOT_SUPPORTED.items():
        lines.append(f"  {name:<12} {closest}: {'; '.join(missing)}")
    return "\n".join(lines)
