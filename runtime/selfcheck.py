"""Check once, on the user's machine, that a row's logits do not depend on how many rows its pass holds.

Speculative modes reproduce `ar` exactly only if the target computes a token's logits bit for bit alike
in the pass `ar` runs it in and in a pass of k rows (docs/speculative.md). Whether that holds is a
property of onnxruntime's kernels on this CPU, provider and thread count, not of the graph alone:
- GroupQueryAttention takes its own path for a one-row pass on every CPU we have tried; fused target
  graphs pad attention to two rows for that (export/graph.py).
- On AVX2 CPUs without VNNI, 4-bit MatMulNBits computes a one-row pass with a kernel that rounds apart
  from its multi-row kernel, while passes of two or more rows agree with each other. There every pass of
  the target is padded to two input rows, so `ar` and verification share one numerical path.
So the target is checked before its first generation: passes of every size up to `MAX_ROWS`, after a
short and after a long context, are compared bitwise with one-token passes, first unpadded, then (where
that fails) with one-token passes padded to two rows. The verdict (padding, largest safe pass) is kept in
the bundle cache under a key that names this CPU (runtime/machine.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import save_cache_json
from edgespec.runtime.model import ModelRunner

# The largest pass the target runs (prefill chunks and verification alike): every size up to it is checked,
# so no pass a mode can run is left unchecked. The modes' sizing stays far below it on CPUs (a longer verify
# pass costs more than its expected accepted tokens save), and prefill loses little in 32-row chunks.
MAX_ROWS = 32


def pass_size_mismatches(runner: ModelRunner, max_rows: int = MAX_ROWS, prefixes: tuple[int, ...] | None = None,
                         seed: int = 0) -> tuple[list[int], list[int]]:
    """(sizes checked, the first size whose rows differ from one-token passes, if any) with the runner's padding.

    Sizes 2..max_rows are tried in order after each context length in `prefixes` (default: a short one and
    half the buffer, at most 1024); each k-row pass is compared bitwise with one-token passes over the same
    tokens, and so is the pass after it (the K/V it wrote must match too). Stops at the first mismatch.
    Leaves the runner empty.
    """
    top = min(max_rows, runner.max_chunk)
    if prefixes is None:
        prefixes = (min(16, runner.max_context // 4), min(1024, runner.max_context // 2))
    checked: list[int] = []
    rng = np.random.default_rng(seed)
    for prefix in prefixes:
        sizes = [k for k in range(2, top + 1) if prefix + k + runner.input_rows + 1 < runner.max_context]
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
            if k not in checked:
                checked.append(k)
            if not (np.array_equal(rows, reference[:k]) and np.array_equal(after, reference[k])):
                runner.rollback(0)
                return checked, [k]
    runner.rollback(0)
    return checked, []


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
        tried[rows] = {"checked": checked, "mismatched": mismatched,
                       "max_rows": min(mismatched) - 1 if mismatched else max(checked, default=1)}
        if not mismatched:
            break
    rows = max(tried, key=lambda r: (tried[r]["max_rows"], -r))
    runner.pad_passes(rows)
    verdict = {"input_rows": rows, **tried[rows]}
    if rows != 1:
        verdict["unpadded_mismatched"] = tried[1]["mismatched"]
    return verdict


def cached_pass_check(runner: ModelRunner, cache_dir: Path, key: str) -> dict:
    """The verdict from the bundle cache (applied to `runner`), checking and saving it atomically when absent."""
    path = cache_dir / f"pass-check.{key}.json"
    if path.is_file():
        try:
            verdict = json.loads(path.read_text())
            if (isinstance(verdict, dict) and verdict.get("input_rows") in (1, 2)
                    and isinstance(verdict.get("max_rows"), int) and verdict["max_rows"] >= 1
                    and all(isinstance(verdict.get(k), list) for k in ("checked", "mismatched"))):
                runner.pad_passes(verdict["input_rows"])
                return verdict
        except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
            pass
        path.unlink(missing_ok=True)  # unreadable or from another layout: check again
    verdict = check_runner(runner)
    save_cache_json(path, verdict)
    return verdict
