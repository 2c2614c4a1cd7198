"""The measured cost of one pass at each chunk length, on this machine, cached in the bundle.

On a CPU a pass over k tokens is not k-times free: int4 MatMulNBits GEMM costs ~4x its GEMV at
8 rows (feasibility.md). How large a draft tree or chain pays depends on this curve, so it is
measured once per bundle, model and thread count, and reused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import save_cache_json
from edgespec.runtime.model import ModelRunner

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def measure_cost_curve(runner: ModelRunner, sizes: tuple[int, ...] = SIZES, prefix: int = 64,
                       repeats: int = 3, between: ModelRunner | None = None) -> dict[int, float]:
    """Median seconds of one pass with k new tokens after a `prefix`-token context.

    `between`, if given, runs a one-token pass before each timed pass, as decoding interleaves them:
    the draft's passes follow the target's, which has pushed the draft's weights out of the caches.
    Back to back a one-token draft pass costs 1.65 ms, after a target pass 2.14 ms (int8, bench/bench_draft.py).
    Overwrites the KV of both runners: they are left empty (length 0), so callers measure before
    decoding and the next pass re-feeds the context.
    """
    prefix = min(prefix, runner.max_context // 2)
    sizes = tuple(k for k in sizes if k <= runner.max_chunk and prefix + k + 1 <= runner.max_context)
    rng = np.random.default_rng(0)
    for model in (runner, between):
        if model is not None:
            model.rollback(0)
            model.prefill(rng.integers(0, model.vocab_size, prefix))
    curve = {}
    for k in sizes:
        times = []
        for _ in range(repeats + 1):
            tokens = rng.integers(0, runner.vocab_size, k)
            if between is not None:
                between.forward(tokens[:1])
                between.rollback(prefix)
            t0 = time.perf_counter()
            runner.forward(tokens)
            times.append(time.perf_counter() - t0)
            runner.rollback(prefix)
        curve[k] = float(np.median(times[1:]))
    for model in (runner, between):
        if model is not None:
            model.rollback(0)
    return curve


def cached_cost_curve(runner: ModelRunner, cache_dir: Path, key: str,
                      between: ModelRunner | None = None) -> dict[int, float]:
    """The curve from the bundle cache, measuring (and saving atomically) when absent."""
    path = cache_dir / f"cost-curve.{key}.json"
    if path.is_file():
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, json.JSONDecodeError):
            path.unlink(missing_ok=True)
    curve = measure_cost_curve(runner, between=between)
    save_cache_json(path, curve)
    return curve


def interpolate(curve: dict[int, float], k: int) -> float:
    """Seconds of a k-token pass: linear between measured sizes, and beyond the largest one along the
    last segment's slope (a 128-token catch-up chunk costs about 4x a 32-token pass, not the same)."""
    xs = sorted(curve)
    if k > xs[-1] and len(xs) > 1:
        slope = (curve[xs[-1]] - curve[xs[-2]]) / (xs[-1] - xs[-2])
        return float(curve[xs[-1]] + slope * (k - xs[-1]))
    return float(np.interp(k, xs, [curve[x] for x in xs]))
