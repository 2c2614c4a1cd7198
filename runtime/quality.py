"""Quality of a lossy decode without a judge model: agreement with the large model, and its NLL.

- token agreement and ROUGE-L against the large model's own greedy output;
- the large model's mean negative log-likelihood of the produced text (how plausible the large
  model finds it), scored teacher-forced in one pass through the target's runner.
"""

from __future__ import annotations

import numpy as np

from edgespec.runtime.model import ModelRunner


def token_agreement(reference: list[int], produced: list[int]) -> float:
    """Share of reference positions where the produced sequence has the same token."""
    if not reference:
        return 1.0 if not produced else 0.0
    same = sum(a == b for a, b in zip(reference, produced, strict=False))
    return same / max(len(reference), len(produced))


def rouge_l(reference: list, produced: list) -> float:
    """ROUGE-L F1 over tokens (longest common subsequence).

    Written here rather than taken from `rouge-score` because that package tokenises text its own
    way; we score token ids, and an LCS is a dozen lines.
    """
    if not reference or not produced:
        return float(reference == produced)
    prev = [0] * (len(produced) + 1)
    for a in reference:
        cur = [0]
        for j, b in enumerate(produced):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(produced), lcs / len(reference)
    return 2 * p * r / (p + r)


def mean_nll(runner: ModelRunner, prompt: list[int], produced: list[int]) -> float:
    """Mean negative log-likelihood (nats/token) the runner's model assigns to `produced` after `prompt`."""
    if not produced:
        return 0.0
    runner.rollback(0)
    seq = list(prompt) + list(produced)
    rows = []
    for i in range(0, len(seq) - 1, runner.max_chunk):
        rows.append(runner.forward(seq[i:min(i + runner.max_chunk, len(seq) - 1)]).astype(np.float64))
    logits = np.concatenate(rows)[len(prompt) - 1:]
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    runner.rollback(0)
    return float(-logp[np.arange(len(produced)), produced].mean())
