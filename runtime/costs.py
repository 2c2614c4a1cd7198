"""The measured cost of one pass at each chunk length, on this machine, cached in the bundle.

On a CPU a pass over k tokens is not k-times free, and how much more it costs depends on the precision, the
kernels and the machine (docs/speculative.md has measured curves). How large a draft tree or chain pays
depends on this curve, so it is measured once per bundle, model and thread count, and reused.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgespec.runtime.cache import CacheKey, read_json, write_json
from edgespec.runtime.model import ModelRunner

SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
CURVE_FORMAT = 3  # in the cache file name: curves measured another way are measured again


def measure_cost_curves(target: ModelRunner, draft: ModelRunner | None = None, sizes: tuple[int, ...] = SIZES,
                        prefix: int = 192, rounds: int = 11) -> dict[str, dict[int, float]]:
    """Median seconds of one pass with k new tokens after a `prefix`-token context, per model.

    Decisions use ratios of these numbers (a 2-row pass against a 1-row one, a draft pass against a
    target pass), and on a shared machine the speed drifts within seconds. So every round times each
    (model, size) once, in a shuffled order, and the median over rounds is kept: a slow spell lands on all
    sizes and both models alike (timed a size at a time, with a short prefix, the ratios came out well
    below those seen inside decoding). Sizes run up to catch-up chunks. Each draft pass follows a one-row
    target pass, as when drafting: the target's pass pushes the draft's weights out of the caches, which
    makes a draft pass measurably slower than back to back. Overwrites both models' KV (left empty), so it
    runs before a generation. Medians of a few rounds still came out non-monotonic on a flat curve (a 2-row
    pass below a 1-row one), which made a one-token draft look cheaper than no draft; 11 rounds and a
    monotone fit (`monotone`) keep the shape.
    """
    runners = {"target": target} | ({"draft": draft} if draft is not None else {})
    prefix = min(prefix, target.max_context // 2)
    rng = np.random.default_rng(0)
    jobs = [(role, k) for role, runner in runners.items() for k in sizes
            if k <= runner.max_chunk and prefix + k + 1 <= runner.max_context]
    for runner in runners.values():
        runner.rollback(0)
        runner.prefill(rng.integers(0, runner.vocab_size, prefix))
    times: dict[tuple[str, int], list[float]] = {job: [] for job in jobs}
    for round_ in range(rounds + 1):  # round 0 warms up every size and is not kept
        for i in rng.permutation(len(jobs)):
            role, k = jobs[i]
            runner = runners[role]
            tokens = rng.integers(0, runner.vocab_size, k)
            if role == "draft":
                target.forward(tokens[:1])
                target.rollback(prefix)
            t0 = time.perf_counter()
            runner.forward(tokens)
            if round_:
                times[jobs[i]].append(time.perf_counter() - t0)
            runner.rollback(prefix)
    for runner in runners.values():
        runner.rollback(0)
    curves: dict[str, dict[int, float]] = {role: {} for role in runners}
    for (role, k), samples in times.items():
        curves[role][k] = float(np.median(samples))
    return {role: monotone(curve) for role, curve in curves.items()}


def monotone(curve: dict[int, float]) -> dict[int, float]:
    """The closest non-decreasing curve (least squares: pool adjacent violators), since a pass over more rows
    does all the work of a shorter one; a measured dip is noise. Written here because numpy has no isotonic
    fit and scipy/scikit-learn are not runtime dependencies."""
    blocks: list[list[float]] = []  # [mean, count] of pooled runs of sizes
    for k in sorted(curve):
        blocks.append([curve[k], 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    values = [m for m, n in blocks for _ in range(int(n))]
    return dict(zip(sorted(curve), values, strict=True))


def cached_cost_curves(target: ModelRunner, draft: ModelRunner | None, root: Path,
                       facts: tuple[str, ...]) -> dict[str, dict[int, float]]:
    """The curves from the bundle cache (runtime/cache.py), measuring and saving them when absent."""
    key = CacheKey(f"cost-curves.v{CURVE_FORMAT}", facts)
    roles = {"target"} | ({"draft"} if draft is not None else set())
    saved = read_json(root, key, lambda data: isinstance(data, dict) and set(data) == roles and all(
        isinstance(curve, dict) and curve for curve in data.values()))
    if saved is not None:
        return {role: {int(k): float(v) for k, v in curve.items()} for role, curve in saved.items()}
    curves = measure_cost_curves(target, draft)
    write_json(root, key, curves)
    return curves


def interpolate(curve: dict[int, float], k: int) -> float:
    """Seconds of a k-token pass: linear between measured sizes, and beyond the largest one along the
    last segment's slope (a 128-token catch-up chunk costs several 32-token passes, not one)."""
    xs = sorted(curve)
    if k > xs[-1] and len(xs) > 1:
        slope = (curve[xs[-1]] - curve[xs[-2]]) / (xs[-1] - xs[-2])
        return float(curve[xs[-1]] + slope * (k - xs[-1]))
    return float(np.interp(k, xs, [curve[x] for x in xs]))
