"""The derived draft of the default model: top-1 agreement with the target before and after distillation,
and its cost per token relative to the target on the exported graphs.

Agreement is teacher-forced along the target's own greedy continuation (torch fp32 models, EOS
suppressed so every prompt gives `--agree-tokens` positions), on HumanEval prompts and on the prose
set; neither set is in the distillation corpus (export/distill_prompts.py). The distilled weights come
from the cache that `edge-export` fills (distilled once, here or by an earlier export). Usage:

    python bench/bench_draft.py --prompts 10 --quants int8 int4 --write-docs
"""

from __future__ import annotations

import argparse

from common import ensure_bundle, git_rev, machine, parse_with_common, prompt_set, write_section

from edgespec.export.derive import calibration_tokens, derive_draft, greedy_agreement, student_from_layers
from edgespec.export.distill import DEFAULT_HEAD_TOKENS, DistillConfig
from edgespec.export.draft_check import measure_cost_ratio
from edgespec.export.sources import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--quants", nargs="+", default=["int8", "int4"])
    args, work = parse_with_common(ap)
    target = load("default")
    distilled, info = derive_draft(target, args.draft_layers,
                                   DistillConfig(minutes=args.distill_minutes, head_tokens=DEFAULT_HEAD_TOKENS),
                                   log=print)
    undistilled = student_from_layers(target, info["layers"])  # the same layers before distillation
    rows = []
    for set_name in ("humaneval", "prose"):
        tokens = calibration_tokens(target.tokenizer, prompt_set(set_name, args.prompts))
        before = greedy_agreement(target.model, undistilled.model, tokens, args.agree_tokens)[0]
        after = greedy_agreement(target.model, distilled.model, tokens, args.agree_tokens, distilled.head_ids)[0]
        rows.append((set_name, before, after))
        print(f"{set_name}: agreement {before:.1%} -> {after:.1%}")
    costs = {}
    for quant in args.quants:
        bundle = ensure_bundle(work, quant, {"default": target}, derive_layers=args.draft_layers, ngram_tokens=4000,
                               distill_minutes=args.distill_minutes)
        costs[quant] = measure_cost_ratio(bundle, rounds=5)
        print(f"{quant}: cost ratio {costs[quant]['cost_ratio']:.3f}")
    if args.write_docs:
        write_section("draft", _report(args, info, rows, costs), _summary(info, rows, costs))


def _summary(info: dict, rows: list, costs: dict) -> str:
    """The headline table of docs/benchmarks.md: held-out agreement and cost ratio in one row."""
    d = info.get("distillation", {})
    minutes = (d.get("corpus_seconds", 0) + d.get("train_seconds", 0)) / 60
    ratios = " / ".join(f"{c['cost_ratio']:.3f}" for c in costs.values())
    return "\n".join([
        "| draft | " + " | ".join(f"{name} agreement (before → after distillation)" for name, _, _ in rows)
        + " | cost ratio (" + " / ".join(costs) + ") | distillation minutes |",
        "|---|" + "---|" * (len(rows) + 2),
        f"| layers {info['layers']} | " + " | ".join(f"{before:.1%} → {after:.1%}" for _, before, after in rows)
        + f" | {ratios} | {minutes:.1f} |"])


def _report(args, info: dict, rows: list, costs: dict) -> str:
    d = info.get("distillation", {})
    lines = [
        "## The derived draft: agreement and cost",
        "",
        f"Machine: {machine()}. Commit {git_rev()}. Command: `python bench/bench_draft.py --prompts {args.prompts} "
        f"--quants {' '.join(args.quants)} --write-docs`.",
        f"Draft: layers {info['layers']} of the target's 30 (the first N-1 and the last, export/derive.py "
        "`distilled_layers`), the "
        f"target's embeddings and an LM head over the {DEFAULT_HEAD_TOKENS} tokens the target writes most; distilled "
        "through that head on the CPU against the target's top-32 distributions on "
        f"{d.get('corpus_answer_tokens', '?')} tokens the target wrote for a mixed code/prose prompt set "
        f"({d.get('corpus_seconds', '?')} s generating, {d.get('train_seconds', '?')} s / {d.get('train_steps', '?')} "
        f"steps training: {(d.get('corpus_seconds', 0) + d.get('train_seconds', 0)) / 60:.1f} min within a "
        f"{args.distill_minutes:g}-minute budget). Top-1 agreement is teacher-forced along the target's greedy "
        f"continuation ({args.agree_tokens} tokens per prompt, first {args.prompts} prompts of each set, chat "
        "template); neither set is part of the distillation corpus.",
        "",
        "| prompt set | agreement before distillation | after |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {before:.1%} | {after:.1%} |" for name, before, after in rows]
    lines += ["", "| bundle | draft pass ms (after a target pass) | draft pass ms (back to back) | target pass ms | "
              "cost ratio (draft / target, one-token passes) |", "|---|---|---|---|---|"]
    lines += [f"| {q} | {c['draft_pass_ms']:.2f} | {c['draft_pass_back_to_back_ms']:.2f} | {c['target_pass_ms']:.2f} "
              f"| {c['cost_ratio']:.3f} |" for q, c in costs.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
