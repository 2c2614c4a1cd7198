"""`edgespec calibrate-ead`: choose EAD's entropy threshold τ from a quality target.

For each τ of a sweep, every prompt is decoded with `ead` and compared with the large model's
own greedy output (ROUGE-L over tokens); the chosen τ is the largest (most small-model tokens)
whose mean quality still reaches the target. It is written into the bundle manifest, where
`mode="ead"` and `mode="ead-spec"` read it as their default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import MANIFEST
from edgespec.runtime.cache import remove_dead_temporaries, temporary_name
from edgespec.runtime.engine import Engine
from edgespec.runtime.quality import rouge_l, token_agreement

DEFAULT_TAUS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}: a JSON line without a 'prompt' field: {line[:60]}") from exc
        prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def sweep(engine: Engine, prompts: list[str], taus=DEFAULT_TAUS, max_new_tokens: int = 64,
          chat: bool = True) -> list[dict]:
    """Quality and large-model share of `ead` at each τ, against the large model's greedy output."""
    references = [engine.generate(p, max_new_tokens=max_new_tokens, chat=chat).token_ids for p in prompts]
    rows = []
    for tau in taus:
        quality, agreement, share = [], [], []
        for prompt, ref in zip(prompts, references, strict=True):
            r = engine.generate(prompt, max_new_tokens=max_new_tokens, chat=chat, mode="ead", tau=tau)
            quality.append(rouge_l(ref, r.token_ids))
            agreement.append(token_agreement(ref, r.token_ids))
            share.append(r.stats["ead"]["large_share"])
        rows.append({"tau": tau, "rouge_l": float(np.mean(quality)), "token_agreement": float(np.mean(agreement)),
                     "large_share": float(np.mean(share))})
    return rows


def choose_tau(rows: list[dict], quality: float) -> dict:
    """The row with the largest τ whose ROUGE-L reaches `quality` (τ=0 always does: it is the large model)."""
    ok = [r for r in rows if r["rouge_l"] >= quality]
    if not ok:
        return min(rows, key=lambda r: r["tau"])
    return max(ok, key=lambda r: r["tau"])


def write_tau(bundle: str | Path, chosen: dict, rows: list[dict], quality: float) -> None:
    """Record τ in the manifest (which is not itself checksummed), atomically."""
    path = Path(bundle) / MANIFEST
    manifest = json.loads(path.read_text())
    manifest.setdefault("runtime", {})["ead"] = {"tau": chosen["tau"], "quality_target": quality,
                                                  "chosen": chosen, "sweep": rows}
    remove_dead_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)
    finally:  # a failed write (disk full) leaves no stray temporary file
        tmp.unlink(missing_ok=True)


def plot(rows: list[dict], chosen: dict, quality: float, out: str | Path) -> None:
    """Quality and large-model share against τ (needs matplotlib, from the [dev] extra)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ValueError("the calibration plot needs matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = [r["tau"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(taus, [r["rouge_l"] for r in rows], "o-", label="quality (ROUGE-L vs large greedy)")
    ax.plot(taus, [r["large_share"] for r in rows], "s-", label="large-model share of tokens")
    ax.axhline(quality, color="gray", linestyle=":", label=f"quality target {quality}")
    ax.axvline(chosen["tau"], color="red", linestyle="--", label=f"chosen τ = {chosen['tau']}")
    ax.set_xlabel("τ (bits, rolling mean entropy)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title("EAD calibration")
    fig.tight_layout()
    tmp = Path(out).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)


def add_parser(sub) -> None:
    p = sub.add_parser("calibrate-ead", help="choose EAD's entropy threshold for a quality target")
    p.add_argument("--bundle", required=True)
    p.add_argument("--prompts", required=True, help="text file: one prompt per line, or JSON lines with 'prompt'")
    p.add_argument("--quality", type=float, default=0.95, help="mean ROUGE-L vs the large model to keep")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--taus", help="comma-separated τ values to sweep")
    p.add_argument("--plot", default="ead-calibration.png")
    p.set_defaults(func=run)


def run(args) -> int:
    if not 0.0 < args.quality <= 1.0:
        raise ValueError(f"--quality must be in (0, 1], got {args.quality}")
    taus = tuple(float(t) for t in args.taus.split(",")) if args.taus else DEFAULT_TAUS
    engine = Engine.load(args.bundle)
    rows = sweep(engine, read_prompts(args.prompts), taus, args.max_new_tokens)
    chosen = choose_tau(rows, args.quality)
    plot(rows, chosen, args.quality, args.plot)
    write_tau(args.bundle, chosen, rows, args.quality)
    for r in rows:
        print(f"tau {r['tau']:4.1f}  quality {r['rouge_l']:.3f}  agreement {r['token_agreement']:.3f}  "
              f"large share {r['large_share']:.2f}")
    print(f"chosen tau {chosen['tau']} (quality {chosen['rouge_l']:.3f}, large share {chosen['large_share']:.2f}); "
          f"written to {Path(args.bundle) / MANIFEST}, plot {args.plot}")
    return 0
