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
from edgespec.export.sources import LoadedModel, reduce_model

CALIBRATION_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain how a bicycle works.",
    "def merge_sorted(a, b):",
]


def student_from_layers(loaded: LoadedModel, layers: list[int]) -> LoadedModel:
    """A draft LoadedModel keeping only `layers` (in order); embeddings and head are the target's.

    The kept layers and the final norm are copies the draft owns (distillation trains them); the
    embedding table and LM head are the target's own tensors.
    """
    n = loaded.spec.num_layers
    if not layers or any(not 0 <= i < n for i in layers) or sorted(set(layers)) != list(layers):
        raise ExportError(f"draft layers must be increasing indices in 0..{n - 1}, got {layers}")
    model = _truncated_torch_model(loaded.model, layers, own_weights=True)
    return refresh_weights(LoadedModel(name=f"{loaded.name}-draft{len(layers)}",
                                       source=f"derived:{loaded.source}:{layers}", gguf_path=None, model=model,
                                       tokenizer=loaded.tokenizer, spec=loaded.spec, weights={},
                                       source_layers=list(layers)))


def refresh_weights(draft: LoadedModel) -> LoadedModel:
    """Re-read spec and canonical weights from the draft's torch model (after distillation changed it)."""
    spec, weights = reduce_model(draft.model, draft.model.config)
    return replace(draft, spec=spec, weights=weights)


def _truncated_torch_model(model, layers: list[int], own_weights: bool = False):
    """A torch copy with only `layers`; `own_weights` copies those layers and the final norm."""
    import torch

    draft = copy.copy(model)
    draft._modules = dict(model._modules)  # a shallow copy would share (and so edit) the target's children
    draft.model = copy.copy(model.model)
    draft.model._modules = dict(model.model._modules)
    pick = copy.deepcopy if own_weights else copy.copy
    draft.model.layers = torch.nn.ModuleList([pick(model.model.layers[i]) for i in layers])
    if own_weights:
        draft.model.norm = copy.deepcopy(model.model.norm)
    draft.config = copy.deepcopy(model.config)
    draft.config.num_hidden_layers = len(layers)
    if getattr(draft.config, "layer_types", None):
        draft.config.layer_types = [draft.config.layer_types[i] for i in layers]
    draft.model.config = draft.config
    for new, layer in enumerate(draft.model.layers):
        layer._modules = dict(layer._modules)
        layer.self_attn = copy.copy(layer.self_attn)
        layer.self_attn.layer_idx = new
    return draft


def calibration_tokens(tokenizer, prompts: list[str] = CALIBRATION_PROMPTS) -> list[list[int]]:
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else prompt
        out.append(tokenizer(text, add_special_tokens=False).input_ids)
    return out


def greedy_agreement(target, draft, token_lists: list[list[int]], new_tokens: int = 32,
                     head_ids: np.ndarray | None = None) -> tuple[float, float]:
    """Along the target's greedy path: share of positions where the draft's argmax equals the target's,
    and the draft's mean log-probability of the target's token (a smooth tie-breaker when both are near 0).

    `head_ids` measures a draft that runs with a head restricted to those tokens (the others get
    probability 0, as in the runtime).
    """
    import torch

    agree = total = 0
    logp = 0.0
    with torch.no_grad():
        for ids in token_lists:
            seq = target.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                  min_new_tokens=new_tokens, pad_token_id=0)
            t = target(seq).logits[0, len(ids) - 1:-1].argmax(-1)
            logits = draft(seq).logits[0, len(ids) - 1:-1].float()
            if head_ids is not None:
                listed = torch.full_like(logits, float("-inf"))
                listed[:, torch.from_numpy(np.asarray(head_ids))] = 0.0
                logits = logits + listed
            d = logits.log_softmax(-1)
            agree += int((t == d.argmax(-1)).sum())
            logp += float(d.gather(1, t[:, None]).clamp(min=-100.0).sum())
            total += len(t)
    return agree / max(total, 1), logp / max(total, 1)


def candidate_subsets(n_layers: int, k: int) -> list[list[int]]:
    """Layer subsets worth measuring: the first k, first k-1 plus the last, first k-2 plus the last two,
    and evenly spread."""
    cands = [list(range(k)), list(range(k - 1)) + [n_layers - 1], list(range(k - 2)) + [n_layers - 2, n_layers - 1],
             sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})]
    out = []
    for c in cands:
        if len(c) == k and c not in out and all(0 <= i < n_layers for i in c) and len(set(c)) == k:
            out.append(c)
    return out


def distilled_layers(n_layers: int, k: int) -> list[int]:
    """The layers a draft that will be distilled keeps: the first k-1 and the last.

    Measuring the candidates before distillation cannot rank them for it: every few-layer subset agrees on ~0 %
    of tokens then. Distilled for the same time on the same corpus (SmolLM2-135M, 6 layers, docs/drafts.md), the
    first five plus the last agreed with the target on 54.4 % / 31.4 % of held-out HumanEval / prose positions,
    the first six on 52.0 % / 28.3 % (50.3 / 28.4 against 48.3 / 25.5 at a lower learning rate): the last layer
    already writes the residual stream the final norm and head read.
    """
    return list(range(k - 1)) + [n_layers - 1]


def derive_draft(loaded: LoadedModel, n_layers: int = 4, distill_config=None, log=print) -> tuple[LoadedModel, dict]:
    """Pick the layer subset that agrees best with the target (or, when distilling, `distilled_layers`), then
    distil it if `distill_config` asks to.

    Returns the draft and what was measured (agreement before and after distillation, on prompts that
    are neither the distillation corpus nor the benchmarks'). `distill_config.head_tokens` cuts the draft's
    LM head to the tokens the target actually writes (chosen from the distillation corpus): in a shallow
    draft of a large-vocabulary model the head costs more than the layers.
    """
    if not 1 <= n_layers < loaded.spec.num_layers:
        raise ExportError(f"--draft-layers must be in 1..{loaded.spec.num_layers - 1}, got {n_layers}")
    head = distill_config.head_tokens if distill_config is not None else 0
    if head and not 1 <= head < loaded.spec.vocab_size:  # checked before the distillation runs, not after
        raise ExportError(f"--draft-head-tokens must be in 1..{loaded.spec.vocab_size - 1}, got {head}")
    token_lists = calibration_tokens(loaded.tokenizer)
    distilling = distill_config is not None and distill_config.enabled
    candidates = [distilled_layers(loaded.spec.num_layers, n_layers)] if distilling else \
        candidate_subsets(loaded.spec.num_layers, n_layers)
    results = {}
    for layers in candidates:
        draft = _truncated_torch_model(loaded.model, layers)
        results[tuple(layers)] = greedy_agreement(loaded.model, draft, token_lists)
        agree, logp = results[tuple(layers)]
        log(f"draft layers {layers}: greedy agreement {agree:.1%}, mean log-prob of the target's token {logp:.2f}")
    best = list(max(results, key=results.get))
    derived = student_from_layers(loaded, best)
    info = {"layers": best, "agreement_before_distillation": results[tuple(best)][0],
            "candidates": {",".join(map(str, k)): v[0] for k, v in results.items()}}
    if distilling:
        from edgespec.export.distill import distill

        info["distillation"] = distill(loaded.model, loaded.tokenizer, derived.model, best, distill_config, log=log)
        derived = refresh_weights(derived)
        if distill_config.head_tokens:
            derived = _restrict_head(derived, distill_config, info, log)
        info["agreement_after_distillation"] = greedy_agreement(loaded.model, derived.model, token_lists,
                                                                head_ids=derived.head_ids)[0]
        log(f"draft agreement with the target: {info['agreement_before_distillation']:.1%} before distillation, "
            f"{info['agreement_after_distillation']:.1%} after")
    return derived, info


def _restrict_head(draft: LoadedModel, distill_config, info: dict, log) -> LoadedModel:
    from edgespec.export.distill import Corpus, default_cache_dir, draft_head_ids

    n = distill_config.head_tokens
    cache = distill_config.cache_dir or default_cache_dir()
    path = cache / f"{info['distillation']['corpus_key']}.corpus.npz"
    if not path.is_file():
        raise ExportError(f"the distillation corpus {path} is gone from the cache; delete the matching "
                          f"{info['distillation']['cache_key']}.draft.safetensors there to distil again")
    corpus = Corpus.load(path)
    ids = draft_head_ids(corpus, draft.model, draft.tokenizer, n)  # the head distillation trained through
    weights = dict(draft.weights, lm_head=draft.weights["lm_head"][ids])
    covered = float(np.isin(corpus.topk_ids[:, 0], ids).mean())
    info["head_tokens"] = {"count": int(len(ids)), "corpus_top1_covered": covered}
    log(f"draft head: {len(ids)} of {draft.spec.vocab_size} tokens, covering {covered:.1%} of the target's "
        "top-1 choices in the corpus")
    return replace(draft, weights=weights, head_ids=ids)
