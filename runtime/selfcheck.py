"""Check once, on the user's machine, that a row's logits do not depend on how many rows its pass holds.

Speculative modes reproduce `ar` exactly only if the target computes a token's logits bit for bit alike
in a one-row pass and in a pass of k rows (docs/speculative.md). Our graphs are built for that, but
whether it holds is finally a property of onnxruntime's kernels on this CPU, provider and thread count:
on our machines passes of 1..128 rows agree and a 129-row pass computed its last row apart. So the
target is checked before its first generation, and the verdict is kept in the bundle cache next to
the cost curves: passes are capped below the smallest size that disagreed, and when even two rows
disagree the lossless modes refuse to run instead of silently drifting from `ar`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import save_cache_json
from edgespec.runtime.model import ModelRunner

SIZES = (2, 3, 4, 5, 8, 12, 16, 24, 32, 48, 64, 96, 127, 128)


def pass_size_mismatches(runner: ModelRunner, sizes: tuple[int, ...] = SIZES, prefix: int = 16,
                         seed: int = 0) -> tuple[list[int], list[int]]:
    """(sizes checked, sizes whose rows differ from one-row passes) after a `prefix`-token context.

    Each k-row pass is compared bitwise with one-row passes over the same tokens, and so is the pass
    after it (the K/V it wrote must match too). Leaves the runner empty (length 0).
    """
    prefix = min(prefix, runner.max_context // 4)
    sizes = [k for k in sizes if k <= runner.max_chunk and prefix + k + 1 < runner.max_context]
    if not sizes:
        return [], []
    tokens = np.random.default_rng(seed).integers(0, runner.vocab_size, prefix + max(sizes) + 1)
    runner.rollback(0)
    for t in tokens[:prefix]:
        runner.forward([t])
    reference = np.stack([runner.forward([t])[-1].copy() for t in tokens[prefix:]])
    mismatched = []
    for k in sizes:
        runner.rollback(prefix)
        rows = runner.forward(tokens[prefix:prefix + k]).copy()
        after = runner.forward([tokens[prefix + k]])[-1]
        if not (np.array_equal(rows, reference[:k]) and np.array_equal(after, reference[k])):
            mismatched.append(k)
    runner.rollback(0)
    return sizes, mismatched


def safe_rows(checked: list[int], mismatched: list[int], max_chunk: int) -> int:
    """The largest checked pass size below the smallest one that disagreed (1: no multi-row pass is safe)."""
    if not mismatched:
        return max_chunk
    return max([1] + [k for k in checked if k < min(mismatched)])


def cached_pass_check(runner: ModelRunner, cache_dir: Path, key: str) -> dict:
    """The verdict from the bundle cache, checking (and saving it atomically) when absent."""
    path = cache_dir / f"pass-check.{key}.json"
    if path.is_file():
        try:
            verdict = json.loads(path.read_text())
            if (isinstance(verdict, dict) and isinstance(verdict.get("max_rows"), int)
                    and all(isinstance(verdict.get(k), list) for k in ("checked", "mismatched"))):
                return verdict
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            pass
        path.unlink(missing_ok=True)  # unreadable or from another layout: check again
    checked, mismatched = pass_size_mismatches(runner)
    verdict = {"checked": checked, "mismatched": mismatched,
               "max_rows": safe_rows(checked, mismatched, runner.max_chunk)}
    save_cache_json(path, verdict)
    return verdict
