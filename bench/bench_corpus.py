"""Distillation corpus generation: `CorpusGenerator` next to the path it replaced, side by side in one run.

All generate the same sampled batch (distillation prompts, chat template, same seed) in alternating rounds:
the oldest path is `generate(output_logits=True)` on the fp32 target under bf16 autocast with the top-k taken
afterwards; then export/distill.py's CorpusGenerator with transformers' SDPA attention, and as it is now (its
own grouped-query attention). Reported: answer tokens/s of each, the ratios of the current one to the others,
and how often each one's top-1 label equals fp32 teacher forcing of the target over its own text. Usage:

    python bench/bench_corpus.py --batch 32 --new-tokens 64 --rounds 2 --write-docs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import git_rev, machine, write_section

from edgespec.export.distill import CorpusGenerator, _encode
from edgespec.export.distill_prompts import distill_prompts
from edgespec.export.sources import load


def autocast_generate(model, ids, mask, new_tokens: int, pad: int, top_k: int):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=True, temperature=0.8, top_k=0, top_p=1.0, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=pad)
    top = torch.stack(out.logits, dim=1).float().log_softmax(-1).topk(top_k, dim=-1)
    return out.sequences, top.indices


def label_agreement(model, prompts: list[list[int]], width: int, sequences, top_ids) -> float:
    """Share of answer positions whose top-1 label is the fp32 target's argmax over the unpadded row."""
    hits = total = 0
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            start = width - len(prompt)
            ref = model(sequences[row, start:][None]).logits[0, len(prompt) - 1:-1].argmax(-1)
            hits += int((top_ids[row, :, 0] == ref).sum())
            total += len(ref)
    return hits / total


def _text_and_top_ids(generated):
    sequences, _top_logp, top_ids = generated
    return sequences, top_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    target = load("default")
    model, tokenizer = target.model.eval(), target.tokenizer
    prompts = [_encode(tokenizer, p) for p in distill_prompts()[:args.batch]]
    width, pad = max(map(len, prompts)), tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, x in enumerate(prompts):
        ids[row, width - len(x):], mask[row, width - len(x):] = torch.tensor(x), 1
    sdpa, fast = CorpusGenerator(model, 32, attention="sdpa"), CorpusGenerator(model, 32)
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 0, "top_p": 1.0, "min_new_tokens": args.new_tokens}
    systems = {"autocast + output_logits (before 2026-11-30)":
               lambda: autocast_generate(model, ids, mask, args.new_tokens, pad, 32),
               "CorpusGenerator, SDPA attention (before 2026-12-02)":
               lambda: _text_and_top_ids(sdpa.generate(ids, mask, args.new_tokens, pad, sampling)),
               "CorpusGenerator, gqa_attention (now)": lambda: _text_and_top_ids(fast.generate(ids, mask,
                                                                                                args.new_tokens, pad,
                                                                                                sampling))}
    speed: dict[str, list[float]] = {name: [] for name in systems}
    agree: dict[str, float] = {}
    for r in range(args.rounds):
        for name, run in systems.items():
            torch.manual_seed(r)
            t0 = time.perf_counter()
            sequences, top_ids = run()
            speed[name].append(len(prompts) * args.new_tokens / (time.perf_counter() - t0))
            agree.setdefault(name, label_agreement(model, prompts, width, sequences, top_ids))
            print(f"round {r} {name}: {speed[name][-1]:.0f} tok/s, labels = fp32 at {agree[name]:.1%}", flush=True)
    names = list(systems)
    now = statistics.median(speed[names[-1]])
    ratios = {n: now / statistics.median(speed[n]) for n in names[:-1]}
    print("ratios", ratios)
    if args.write_docs:
        lines = ["## Distillation corpus generation", "",
                 f"Machine: {machine()}. Commit {git_rev()}. Command: `python bench/bench_corpus.py "
                 f"--batch {args.batch} "
                 f"--new-tokens {args.new_tokens} --rounds {args.rounds} --write-docs`. One batch of {len(prompts)} "
                 f"distillation prompts (chat template), {args.new_tokens} sampled tokens each (T = 0.8), the "
                 f"{len(systems)} paths alternating per round in one process; labels compared with fp32 teacher "
                 "forcing of the target over each path's own text.", ""]
        table = ["| path | answer tokens/s (median) | top-1 label = fp32 target |", "|---|---|---|"]
        table += [f"| {n} | {statistics.median(speed[n]):.0f} | {agree[n]:.1%} |" for n in names]
        lines += [*table, "", "Now / " + ", now / ".join(f"{n}: **{r:.2f}×**" for n, r in ratios.items()) + "."]
        write_section("corpus", "\n".join(lines), "\n".join(table))


if __name__ == "__main__":
    main()
