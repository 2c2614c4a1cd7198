"""Greedy losslessness on every HumanEval prompt: spec, staged, ngram and auto token ids must equal ar's.

    python bench/bench_lossless.py --quant int8 --max-new-tokens 128 [--limit N] [--write-docs]
    python bench/bench_lossless.py --bundle bench/.work/default-int4-derived --max-new-tokens 128 --write-docs

Exits non-zero on the first mismatch (after printing it), so it can gate a release.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import command, ensure_bundle, git_rev, machine, parse_with_common, prompt_set, write_section

from edgespec.runtime.engine import Engine

MODES = ("spec", "staged", "ngram", "auto")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quant", default="int8")
    ap.add_argument("--limit", type=int, default=164)
    ap.add_argument("--bundle", help="a bundle with a draft (default: the --quant bundle with a derived draft)")
    args, work = parse_with_common(ap)
    bundle = args.bundle or ensure_bundle(work, args.quant, {}, derive_layers=args.draft_layers, ngram_tokens=4000,
                                          distill_minutes=args.distill_minutes)
    name = args.bundle or args.quant
    engine = Engine.load(bundle)
    commit, host = git_rev(), machine()  # the code that runs, before later commits move HEAD
    prompts = prompt_set("humaneval", args.limit)
    t0 = time.perf_counter()
    tokens = {m: 0 for m in ("ar", *MODES)}
    passes = dict(tokens)
    for i, prompt in enumerate(prompts):
        ar = engine.generate(prompt, max_new_tokens=args.max_new_tokens, chat=True, mode="ar")
        tokens["ar"] += len(ar.token_ids)
        passes["ar"] += ar.stats["target_passes"]
        for mode in MODES:
            r = engine.generate(prompt, max_new_tokens=args.max_new_tokens, chat=True, mode=mode)
            if r.token_ids != ar.token_ids:
                first = next((j for j, (a, b) in enumerate(zip(ar.token_ids, r.token_ids, strict=False)) if a != b),
                             min(len(ar.token_ids), len(r.token_ids)))
                print(f"MISMATCH prompt {i} mode {mode} at new token {first}", flush=True)
                return 1
            tokens[mode] += len(r.token_ids)
            passes[mode] += r.stats["target_passes"]
        if i % 10 == 0:
            print(f"{i + 1}/{len(prompts)} prompts identical ({time.perf_counter() - t0:.0f}s)", flush=True)
    summary = (f"{len(prompts)} HumanEval prompts × up to {args.max_new_tokens} new tokens, {name} bundle: "
               f"`spec`, `staged`, `ngram` and `auto` produced token ids identical to `ar` on every prompt "
               f"({tokens['ar']} tokens each). Target passes: " +
               ", ".join(f"{m} {passes[m]}" for m in ("ar", *MODES)) + ".")
    print(summary)
    if args.write_docs:
        write_section("lossless", "\n".join([
            "## Greedy losslessness on HumanEval", "",
            f"Machine: {host}. Commit {commit}. Command: `{command()}` (chat template, adaptive sizes).",
            "", summary]),
            "\n".join(["| bundle | HumanEval prompts | `spec`, `staged`, `ngram`, `auto` = `ar` | tokens each "
                       "| target passes (ar / spec / staged / ngram / auto) |", "|---|---|---|---|---|",
                       f"| {name} | {len(prompts)} | every prompt | {tokens['ar']} | "
                       f"{' / '.join(str(passes[m]) for m in ('ar', *MODES))} |"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
