"""Compare runtime greedy output with torch greedy output, allowing only proven numerical ties."""

from __future__ import annotations

import numpy as np

TIE = 1e-3


def torch_greedy(loaded, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens from the torch model (stopping at EOS like the runtime) and the logits of every step."""
    import inspect

    import torch

    # transformers 5.25 calls the cache argument and output `cache` and warns that 5.40 drops `past_key_values`:
    # take whichever name the installed release uses.
    cache_name = "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    eos = set(loaded.spec.eos_token_ids)
    ids = list(prompt_ids)
    out, logits_seen = [], []
    with torch.no_grad():
        past = None
        step = torch.tensor([ids])
        for _ in range(max_new_tokens):
            res = loaded.model(step, use_cache=True, **{cache_name: past})
            past = getattr(res, cache_name)
            logits = res.logits[0, -1].float().numpy()
            logits_seen.append(logits)
            tok = int(logits.argmax())
            out.append(tok)
            if tok in eos:
                break
            step = torch.tensor([[tok]])
    return out, np.stack(logits_seen)


def top2_gap(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def check_same_or_tie(expected: list[int], expected_logits: np.ndarray, got: list[int],
                      got_logits_at) -> tuple[bool, str]:
    """True when `got` equals `expected`, or first differs where both models see a top-2 tie (< 1e-3).

    `got_logits_at(j)` returns the runtime's logits for new position j given the shared prefix.
    """
    for j, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            t_gap = top2_gap(expected_logits[j])
            r_gap = top2_gap(got_logits_at(j))
            if t_gap < TIE and r_gap < TIE:
                return True, f"tie at new token {j} (top-2 gaps torch {t_gap:.2e}, runtime {r_gap:.2e})"
            return False, f"differs at new token {j}: torch {a} vs runtime {b} (top-2 gaps {t_gap:.3g}, {r_gap:.3g})"
    if len(expected) != len(got):
        return False, f"lengths differ: torch {len(expected)} vs runtime {len(got)}"
    return True, "identical"
