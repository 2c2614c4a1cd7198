"""The default mode against every fixed mode, the fastest plain decoding we have, and onnxruntime-genai's int4.

What a user gets without flags: the bundle `edge-export --target default` writes (the target and its n-gram table),
decoded with the default mode (`auto`). Next to it, in the same run: `ar` and `ngram` on the same bundle; `auto`,
`ngram`, `spec` and `staged` on a `--derive-draft` bundle (the same target plus the derived, distilled draft, whose
distillation corpus also feeds its n-gram table); our plain decoding on an `--ar-only` bundle of the same weights
(one-row passes, no padding: the fastest `ar` we have); and onnxruntime-genai's own int4 model of the same model
with its plain greedy loop. Every prompt runs every system in turn, the order rotated per prompt so that drift and
position cancel (a prompt count that is a multiple of the nine systems gives each the same positions), every
generation starting with empty KV buffers; greedy, chat template, same prompt token ids, the same thread count.
Reported: end-to-end tokens/s (prefill included) and each system's ratio to genai's int4, and whether each mode's
token ids equal the same bundle's `ar` on every prompt (the two bundles hold the same target graph). Usage:

    python bench/bench_default.py --prompts 9 --write-docs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from bench_ar import build_genai_model, genai_decode
from common import cold, git_rev, machine, prompt_set, write_section

from edgespec.runtime.engine import Engine
from edgespec.runtime.model import physical_cores


def export(out: Path, *flags: str) -> Path:
    """A bundle of the default model as the CLI writes it (the README's command, plus `flags`)."""
    if not (out / "manifest.json").is_file():
        subprocess.run(["edge-export", "--target", "default", "--quant", "int4", "--out", str(out), *flags],
                       check=True)
    return out


def systems(work: Path) -> dict[str, object]:
    """name -> a callable (prompt ids, prompt text) -> (token ids, seconds)."""
    import onnxruntime_genai as og

    default = Engine.load(export(work / "default-int4"))
    derived = Engine.load(export(work / "default-int4-derived", "--derive-draft"))
    plain = Engine.load(export(work / "default-int4-ar-only", "--ar-only"))
    genai = og.Model(str(build_genai_model(work, {})))
    eos = set(default.tokenizer.eos_token_ids)
    runs = {}
    for mode in ("auto", "ar", "ngram"):
        runs[f"edgespec {mode}"] = _engine_run(default, mode)
    for mode in ("auto", "ngram", "spec", "staged"):
        runs[f"edgespec {mode}, --derive-draft bundle"] = _engine_run(derived, mode)
    runs["edgespec ar, --ar-only bundle"] = _engine_run(plain, "ar")

    def genai_run(ids: list[int], _prompt: str, max_new_tokens: int) -> tuple[list[int], float]:
        t0 = time.perf_counter()
        tokens, _, _ = genai_decode(genai, ids, max_new_tokens, eos)
        return tokens, time.perf_counter() - t0

    runs["onnxruntime-genai int4"] = genai_run
    return runs


def _engine_run(engine: Engine, mode: str):
    def run(_ids: list[int], prompt: str, max_new_tokens: int) -> tuple[list[int], float]:
        cold(engine)
        r = engine.generate(prompt, max_new_tokens=max_new_tokens, chat=True, mode=mode)
        return r.token_ids, r.stats["seconds"]

    run.engine = engine
    return run


def measure(runs: dict, prompts: list[str], tokenizer_engine: Engine, max_new_tokens: int) -> dict:
    names = list(runs)
    totals = {name: {"tokens": 0, "seconds": 0.0, "outputs": []} for name in names}
    for name in names:  # warm-up: first loads, pass-size check, cost curves
        runs[name](tokenizer_engine.prompt_tokens(prompts[0], chat=True), prompts[0], 8)
    for i, prompt in enumerate(prompts):
        ids = tokenizer_engine.prompt_tokens(prompt, chat=True)
        for name in names[i % len(names):] + names[:i % len(names)]:
            tokens, seconds = runs[name](ids, prompt, max_new_tokens)
            totals[name]["tokens"] += len(tokens)
            totals[name]["seconds"] += seconds
            totals[name]["outputs"].append(tokens)
    return totals


def rows(totals: dict, eos: set[int]) -> dict[str, tuple[float, float, str]]:
    """Per system: tokens/s, its ratio to genai's int4 in the same run, and how many prompts gave `ar`'s ids."""
    peer = totals["onnxruntime-genai int4"]
    peer_tps = peer["tokens"] / peer["seconds"]
    ar = [[t for t in out if t not in eos] for out in totals["edgespec ar"]["outputs"]]
    result = {}
    for name, acc in totals.items():
        tps = acc["tokens"] / acc["seconds"]
        outs = [[t for t in out if t not in eos] for out in acc["outputs"]]
        same = f"{sum(a == b for a, b in zip(outs, ar, strict=True))}/{len(ar)}" if name.startswith("edgespec") \
            and "--ar-only" not in name else "–"
        result[name] = (tps, tps / peer_tps, same)
    return result


def table(per_set: dict[str, dict[str, tuple[float, float, str]]]) -> list[str]:
    """One row per system, the prompt sets side by side."""
    sets = list(per_set)
    lines = ["| system | " + " | ".join(f"{s} tokens/s | × genai | = ar" for s in sets) + " |",
             "|---|" + "---|---|---|" * len(sets)]
    for name in per_set[sets[0]]:
        cells = [f"{tps:.1f} | {ratio:.2f} | {same}" for tps, ratio, same in (per_set[s][name] for s in sets)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = systems(work)
    engine = runs["edgespec auto"].engine
    eos = set(engine.tokenizer.eos_token_ids)
    report = [f"Machine: {machine()}; {physical_cores()} threads. Commit {git_rev()}. Greedy, chat template, up to "
              f"{args.max_new_tokens} new tokens, systems interleaved per prompt with the order rotated. "
              f"`edgespec <mode>` rows decode the bundle `edge-export --target default --quant int4` writes; "
              f"genai's model is its builder's int4 (RTN, block 32) of the same weights."]
    per_set = {}
    for name in ("humaneval", "prose"):
        prompts = prompt_set(name, args.prompts)
        per_set[name] = rows(measure(runs, prompts, engine, args.max_new_tokens), eos)
    lines = table(per_set)
    print("\n".join(lines), flush=True)
    note = (f"{args.prompts} prompts per set; tokens/s end to end; \"= ar\": prompts whose greedy ids equal the same "
            "bundle's `ar`.")
    if args.write_docs:
        write_section("default", "\n".join(["## The default mode against every fixed mode and onnxruntime-genai",
                                            "", *report, "", *lines]), "\n".join([*lines, "", note]))


if __name__ == "__main__":
    sys.exit(main())
