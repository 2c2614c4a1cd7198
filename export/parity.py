"""Parity of exported graphs with the torch fp32 model, run through the real runtime path.

Teacher-forced: torch greedily continues a few chat prompts; each graph then scores the same
token sequences through `ModelRunner` (chunked like the runtime does) and we compare logits at
the generated positions: top-1 agreement and max absolute logit error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespec.export.sources import LoadedModel
from edgespec.runtime.bundle import load_manifest
from edgespec.runtime.model import ModelRunner, SessionConfig

PARITY_PROMPTS = [
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "List three fruits.",
    "def fibonacci(n):",
]


@dataclass
class Reference:
    sequences: list[list[int]]  # prompt + continuation
    prompt_lengths: list[int]
    logits: list[np.ndarray]  # torch logits at the continuation positions [n, V]


def torch_reference(loaded: LoadedModel, new_tokens: int = 32, prompts: list[str] | None = None) -> Reference:
    """Greedy continuations and their teacher-forced fp32 logits from the torch model.

    A draft with a restricted head continues greedily over its head's tokens only, as its graph does:
    trained through that head, its other logits are untrained and would lead the text astray.
    """
    import torch

    tok = loaded.tokenizer
    seqs, plens, logits = [], [], []
    restrict = {}
    if loaded.head_ids is not None:
        restrict["suppress_tokens"] = np.setdiff1d(np.arange(loaded.spec.vocab_size), loaded.head_ids).tolist()
    for prompt in prompts or PARITY_PROMPTS:
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                        min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id or 0, **restrict)
            full = out[0].tolist()
            lg = loaded.model(torch.tensor([full])).logits[0].float().numpy()
        seqs.append(full)
        plens.append(len(ids))
        logits.append(lg[len(ids) - 1:len(full) - 1])
    return Reference(seqs, plens, logits)


def graph_parity(bundle_root: Path, role: str, graph: str, ref: Reference) -> dict:
    """Top-1 agreement and max |Δlogit| of one bundle graph against the torch reference."""
    manifest = load_manifest(bundle_root, verify=False)
    runner = ModelRunner.open(manifest, role, SessionConfig(cache_optimized=False), graph=graph, max_chunk=64)
    agree = total = 0
    max_err = 0.0
    for seq, plen, ref_logits in zip(ref.sequences, ref.prompt_lengths, ref.logits, strict=True):
        runner.rollback(0)
        got = []
        for i in range(0, len(seq) - 1, runner.max_chunk):
            got.append(runner.forward(seq[i:min(i + runner.max_chunk, len(seq) - 1)]).copy())
        logits = np.concatenate(got)[plen - 1:]
        if runner.head_ids is not None:  # a restricted draft head: compare the columns it has
            logits, ref_logits = logits[:, runner.head_ids], ref_logits[:, runner.head_ids]
        agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        total += len(ref_logits)
        max_err = max(max_err, float(np.abs(logits - ref_logits).max()))
    return {"top1_agreement": agree / total, "positions": total, "max_logit_error": max_err}
