"""Measure a bundle's draft against its target: top-1 agreement and cost per token, and whether it can pay.

Speculation with one drafted token costs (c + 1) target-pass units for an expected (1 + α) tokens, so
it beats plain decoding only when the draft's acceptance α exceeds its cost ratio c (Leviathan et al.).
The numbers go into the manifest, where the runtime reads them as priors for its adaptive sizing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PROMPT_TOKENS = 48
DECODE_STEPS = 24


def measure_cost_ratio(bundle_root: Path, rounds: int = 3) -> dict:
    """Seconds of a one-token draft pass over a one-token target pass, on the exported graphs.

    Passes alternate between the two models, so load from other processes hits both alike, and each
    draft pass follows a target pass, as when drafting. The same draft passes run back to back are timed
    too: the runtime's draft cost curve is measured after target passes because back to back it
    understated the price drafting pays.
    """
    from edgespec.runtime.bundle import load_manifest
    from edgespec.runtime.model import ModelRunner, SessionConfig

    manifest = load_manifest(bundle_root, verify=False)
    graph = next(iter(manifest.target.graphs))
    runners = {role: ModelRunner.open(manifest, role, SessionConfig(), graph=graph) for role in ("target", "draft")}
    room = (manifest.max_context - 2) // 2  # prompt plus decode steps (and a padding row) fit any context
    prompt = np.arange(1, min(PROMPT_TOKENS, room) + 1) % manifest.target.vocab_size
    times: dict[str, list[float]] = {"target": [], "draft": [], "draft back to back": []}
    steps = min(DECODE_STEPS, room)
    for _ in range(rounds):
        for runner in runners.values():
            runner.rollback(0)
            runner.prefill(prompt)
        for step in range(steps):
            for role, runner in runners.items():
                t0 = time.perf_counter()
                runner.forward([(step + 1) % manifest.target.vocab_size])
                times[role].append(time.perf_counter() - t0)
        runners["draft"].rollback(len(prompt))
        for step in range(steps):
            t0 = time.perf_counter()
            runners["draft"].forward([(step + 1) % manifest.target.vocab_size])
            times["draft back to back"].append(time.perf_counter() - t0)
    target, draft = float(np.median(times["target"])), float(np.median(times["draft"]))
    return {"cost_ratio": draft / target, "target_pass_ms": target * 1e3, "draft_pass_ms": draft * 1e3,
            "draft_pass_back_to_back_ms": float(np.median(times["draft back to back"])) * 1e3}


def speculation_can_pay(agreement: float, cost_ratio: float) -> bool:
    """Leviathan's condition for one drafted token: expected gain (1 + α) / (1 + c) above 1."""
    return agreement > cost_ratio
