"""Derive a draft model from the target itself: a subset of its layers with its embeddings and head.

Speculation needs a draft with the target's tokenizer, and most targets have no small sibling.
Keeping a few of the target's own layers (plus its embeddings, final norm and LM head) gives one
that already agrees with the target more often than chance; which layers to keep is decided by
measuring greedy agreement on a few prompts rather than guessed.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from edgespec.export.errors import ExportError
from edgespec.export.sources import LoadedModel

CALIBRATION_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain how a bicycle works.",
    "def merge_sorted(a, b):",
]


def layer_subset(loaded: LoadedModel, layers: list[int]) -> LoadedModel:
    """A LoadedModel whose decoder keeps only `layers` (in order); embeddings and head are the target's."""
    n = loaded.spec.num_layers
    if not layers or any(not 0 <= i < n for i in layers) or sorted(set(layers)) != list(layers):
        raise ExportError(f"draft layers must be increasing indices in 0..{n - 1}, got {layers}")
    weights = {k: v for k, v in loaded.weights.items() if not k.startswith("layers.")}
    for new, old in enumerate(layers):
        prefix = f"layers.{old}."
        for k, v in loaded.weights.items():
            if k.startswith(prefix):
                weights[f"layers.{new}." + k[len(prefix):]] = v
    per_layer = sum(v.size for k, v in loaded.weights.items() if k.startswith("layers.0."))
    spec = replace(loaded.spec, num_layers=len(layers),
                   param_count=loaded.spec.param_count - per_layer * (n - len(layers)))
    model = _truncated_torch_model(loaded.model, layers)
    return LoadedModel(name=f"{loaded.name}-draft{len(layers)}", source=f"derived:{loaded.source}:{layers}",
                       gguf_path=None, model=model, tokenizer=loaded.tokenizer, spec=spec, weights=weights,
                       source_layers=list(layers))


def _truncated_torch_model(model, layers: list[int]):
    """A torch copy with only `layers`, for parity checks and for measuring agreement."""
    import torch

    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # a shallow copy would share (and so edit) the target's children
    draft.model = copy.copy(model.model)
    draft.model._modules = dict(model.model._modules)
    draft.model.layers = torch.nn.ModuleList([copy.copy(model.model.layers[i]) for i in layers])
    draft.config = copy.deepcopy(model.config)
    draft.config.num_hidden_layers = len(layers)
    draft.model.config = draft.config
    for new, layer in enumerate(draft.model.layers):
        layer._modules = dict(layer._modules)
        layer.self_attn = copy.copy(layer.self_attn)
        layer.self_attn.layer_idx = new
    return draft


def greedy_agreement(target, draft, token_lists: list[list[int]], new_tokens: int = 32) -> float:
    """Share of positions where the draft's argmax equals the target's along the target's greedy path."""
    import torch

    agree = total = 0
    with torch.no_grad():
        for ids in token_lists:
            seq = target.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                  min_new_tokens=new_tokens, pad_token_id=0)
            t = target(seq).logits[0, len(ids) - 1:-1].argmax(-1)
            d = draft(seq).logits[0, len(ids) - 1:-1].argmax(-1)
            agree += int((t == d).sum())
            total += len(t)
    return agree / max(total, 1)


def candidate_subsets(n_layers: int, k: int) -> list[list[int]]:
    """Layer subsets worth measuring: the first k, first k-1 plus the last, and evenly spread."""
    cands = [list(range(k)), list(range(k - 1)) + [n_layers - 1],
             sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})]
    out = []
    for c in cands:
        if len(c) == k and c not in out:
            out.append(c)
    return out


def derive_draft(loaded: LoadedModel, n_layers: int = 4, log=print) -> tuple[LoadedModel, dict]:
    """Pick the layer subset that agrees best with the target; returns the draft and what was measured."""
    if not 1 <= n_layers < loaded.spec.num_layers:
        raise ExportError(f"--draft-layers must be in 1..{loaded.spec.num_layers - 1}, got {n_layers}")
    tok = loaded.tokenizer
    token_lists = []
    for p in CALIBRATION_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) \
            if tok.chat_template else p
        token_lists.append(tok(text, add_special_tokens=False).input_ids)
    results = {}
    for layers in candidate_subsets(loaded.spec.num_layers, n_layers):
        draft = _truncated_torch_model(loaded.model, layers)
        results[tuple(layers)] = greedy_agreement(loaded.model, draft, token_lists)
        log(f"draft layers {layers}: greedy agreement {results[tuple(layers)]:.1%}")
    best = max(results, key=results.get)
    derived = layer_subset(loaded, list(best))
    return derived, {"layers": list(best), "agreement_before_distillation": results[best],
                     "candidates": {",".join(map(str, k)): v for k, v in results.items()}}
