"""Check once, on the user's machine, that a row's logits do not depend on how many rows its pass holds.

Speculative modes reproduce `ar` exactly only if the target computes a token's logits bit for bit alike
in the pass `ar` runs it in and in a pass of k rows (docs/speculative.md). Whether that holds is a
property of onnxruntime's kernels on this CPU, provider and thread count, not of the graph alone:
- GroupQueryAttention takes its own path for a one-row pass on every CPU we have tried; fused target
  graphs pad attention to two rows for that (export/graph.py).
- On AVX2 CPUs without VNNI, 4-bit MatMulNBits computes a one-row pass with a kernel that rounds apart
  from its multi-row kernel, while passes of two or more rows agree with each other. There every pass of
  the target is padded to two input rows, so `ar` and verification share one numerical path.
So the target is checked before its first generation: passes of every size a mode can verify and of
the prefill chunk sizes, after a short and after a long context, are compared bitwise with one-token
passes, first unpadded, then (where that fails) with one-token passes padded to two rows. The verdict
(padding, largest safe pass) is kept in the bundle cache under a key that names this CPU (runtime/machine.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgespec.runtime.cache import CacheKey, read_json, write_json
from edgespec.runtime.model import ModelRunner

# Pass sizes checked after a short context: every size a mode can verify (a proposal holds at most
# MAX_PROPOSAL tokens, runtime/decoding.py) and prefill chunk sizes up to the largest pass, MAX_ROWS.
# After a long context (attention takes other paths there) fewer sizes are tried.
MAX_ROWS = 128
SHORT_SIZES = tuple(range(2, 33)) + (48, 64, 96, 127, 128)
LONG_SIZES = tuple(range(2, 17)) + (32, 64, 128)


def pass_size_mismatches(runner: ModelRunner, plan: tuple[tuple[int, tuple[int, ...]], ...] | None = None,
                         seed: int = 0) -> tuple[list[int], list[int]]:
    """(sizes checked, the first size whose rows differ from one-token passes, if any) with the runner's padding.

    `plan` holds (context length, pass sizes) pairs; by default `SHORT_SIZES` after 16 tokens and `LONG_SIZES`
    after half the buffer (at most 1024). Each k-row pass is compared bitwise with one-token passes over the
    same tokens, and so is the pass after it (the K/V it wrote must match too). Sizes run in increasing order
    and the check stops at the first mismatch. Leaves the runner empty.
    """
    if plan is None:
        plan = ((min(16, runner.max_context // 4), SHORT_SIZES), (min(1024, runner.max_context // 2), LONG_SIZES))
    checked: list[int] = []
    rng = np.random.default_rng(seed)
    for prefix, wanted in plan:
        sizes = [k for k in wanted if k <= runner.max_chunk and prefix + k + runner.input_rows + 1 < runner.max_context]
        if not sizes:
            continue
        tokens = rng.integers(0, runner.vocab_size, prefix + sizes[-1] + 1)
        runner.rollback(0)
        runner.prefill(tokens[:prefix])
        reference = np.stack([runner.forward([t])[-1].copy() for t in tokens[prefix:]])
        for k in sizes:
            runner.rollback(prefix)
            rows = runner.forward(tokens[prefix:prefix + k]).copy()
            after = runner.forward([tokens[prefix + k]])[-1]
            if not (np.array_equal(rows, reference[:k]) and np.array_equal(after, reference[k])):
                runner.rollback(0)
                return sorted(set(checked) | {k}), [k]
            checked.append(k)
    runner.rollback(0)
    return sorted(set(checked)), []


def check_runner(runner: ModelRunner) -> dict:
    """Find the cheapest padding under which passes of every size agree, and apply it to `runner`.

    Unpadded one-token passes are cheapest; padding them to two rows costs a fraction of a pass and is
    chosen only where it makes more pass sizes safe. Static (NPU) graphs run one-token and k-token
    passes through different graphs, so padding cannot help them and only the unpadded check runs.
    """
    tried = {}
    for rows in (1, 2) if runner.fused else (1,):
        runner.pad_passes(rows)
        checked, mismatched = pass_size_mismatches(runner)
        safe = [k for k in checked if not mismatched or k < mismatched[0]]
        tried[rows] = {"checked": checked, "mismatched": mismatched, "max_rows": max(safe, default=1)}
        if not mismatched:
            break
    rows = max(tried, key=lambda r: (tried[r]["max_rows"], -r))
    runner.pad_passes(rows)
    verdict = {"input_rows": rows, **tried[rows]}
    if rows != 1:
        verdict["unpadded_mismatched"] = tried[1]["mismatched"]
    return verdict


def cached_pass_check(runner: ModelRunner, root: Path, facts: tuple[str, ...]) -> dict:
    """The verdict from the bundle cache (runtime/cache.py), applied to `runner`; checked and saved when absent."""
    key = CacheKey("pass-check", facts)
    verdict = read_json(root, key, _well_formed)
    if verdict is not None:
        runner.pad_passes(verdict["input_rows"])
        return verdict
    verdict = check_runner(runner)
    write_json(root, key, verdict)
    return verdict


def _well_formed(verdict: object) -> bool:
    return (isinstance(verdict, dict) and verdict.get("input_rows") in (1, 2)
            and isinstance(verdict.get("max_rows"), int) and verdict["max_rows"] >= 1
            and all(isinstance(verdict.get(k), list) for k in ("checked", "mismatched")))
