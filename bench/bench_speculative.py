"""Tokens/s of ar, spec, staged and ngram side by side, per prompt set, temperature and bundle.

Every prompt runs every mode in turn (interleaved), so machine noise hits all modes alike; the
table reports ratios to `ar` measured in the same run. Greedy runs also check that every mode's
token ids equal `ar`'s. Usage:

    python bench/bench_speculative.py --quants int4 w8a8 int8 --prompts 10 --write-docs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import cold, ensure_bundle, git_rev, machine, parse_with_common, prompt_set, write_section

from edgespec.runtime.engine import Engine

MODES = ("ar", "spec", "staged", "ngram")


def run(engines: dict[str, Engine], prompts: list[str], temperature: float, max_new_tokens: int) -> dict:
    """Per (bundle, mode) totals; every prompt runs every bundle's modes in turn, so noise hits them alike."""
    totals = {(b, m): {"tokens": 0, "seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0, "ttft": 0.0,
                       "hist": {}, "mismatch": 0, "passes": 0}
              for b in engines for m in MODES}
    for i, prompt in enumerate(prompts):
        for bundle, engine in engines.items():
            ar_ids = None
            for mode in MODES:
                cold(engine)
                r = engine.generate(prompt, max_new_tokens=max_new_tokens, chat=True, mode=mode,
                                    temperature=temperature, seed=i)
                acc = totals[(bundle, mode)]
                acc["tokens"] += len(r.token_ids)
                acc["seconds"] += r.stats["seconds"]
                acc["ttft"] += r.stats["time_to_first_token"]
                acc["decode_tokens"] += len(r.token_ids) - r.stats["first_chunk_tokens"]
                acc["decode_seconds"] += r.stats["seconds"] - r.stats["time_to_first_token"]
                acc["passes"] += r.stats["target_passes"]
                if mode == "ar":
                    ar_ids = r.token_ids
                elif temperature == 0 and r.token_ids != ar_ids:
                    acc["mismatch"] += 1
                spec = r.stats.get("speculative", {})
                for k, v in spec.get("accepted_histogram_all_steps", spec.get("accepted_histogram", {})).items():
                    acc["hist"][int(k)] = acc["hist"].get(int(k), 0) + v
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quants", nargs="+", default=["int4", "w8a8", "int8", "fp32"])
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--bundle", action="append", metavar="NAME=DIR", default=[], type=_named_bundle,
                    help="measure this bundle under NAME instead of exporting --quants (repeatable); with an older "
                         "edgespec first on PYTHONPATH, the same bundle measures older code. Not with --write-docs, "
                         "whose text describes the exported bundles")
    args, work = parse_with_common(ap)
    if args.bundle and args.write_docs:
        ap.error("--bundle measures bundles the docs' text does not describe; run it without --write-docs")
    if args.bundle:
        given = dict(args.bundle)
        engines = {name: Engine.load(folder) for name, folder in given.items()}
        args.quants = list(given)
    else:
        cache: dict = {}
        engines = {quant: Engine.load(ensure_bundle(work, quant, cache, derive_layers=args.draft_layers,
                                                    ngram_tokens=4000, distill_minutes=args.distill_minutes))
                   for quant in args.quants}
    import edgespec

    print(f"edgespec from {Path(edgespec.__file__).parent}", flush=True)
    first = args.quants[0]
    rows, hists = [], {}
    for set_name in ("humaneval", "prose"):
        prompts = prompt_set(set_name, args.prompts)
        for engine in engines.values():
            for mode in MODES:  # warm-up, and the one-time cost-curve measurement (cached in the bundle)
                engine.generate(prompts[0], max_new_tokens=8, chat=True, mode=mode)
        for temperature in (0.0, 0.8):
            res = run(engines, prompts, temperature, args.max_new_tokens)
            first_ar = res[(first, "ar")]["tokens"] / res[(first, "ar")]["seconds"]
            for quant in args.quants:
                base = res[(quant, "ar")]["tokens"] / res[(quant, "ar")]["seconds"]
                base_decode = res[(quant, "ar")]["decode_tokens"] / res[(quant, "ar")]["decode_seconds"]
                row = {"bundle": quant, "set": set_name, "temperature": temperature}
                for mode in MODES:
                    acc = res[(quant, mode)]
                    tps = acc["tokens"] / acc["seconds"]
                    row[mode] = {"tok_s": round(tps, 1), "ratio": round(tps / base, 2),
                                 "ratio_to_first_ar": round(tps / first_ar, 2),
                                 "decode_ratio": round(acc["decode_tokens"] / acc["decode_seconds"] / base_decode, 2),
                                 "ttft_ms": round(1000 * acc["ttft"] / len(prompts)),
                                 "tokens_per_target_pass": round(acc["tokens"] / max(acc["passes"], 1), 2),
                                 "greedy_mismatches": acc["mismatch"]}
                    hists[(quant, set_name, temperature, mode)] = acc["hist"]
                    row[mode]["accepted_histogram"] = dict(sorted(acc["hist"].items()))
                rows.append(row)
                print(json.dumps(row), flush=True)
    table = ["| bundle | prompts | T | ar tok/s | spec × | staged × | ngram × "
             f"| best mode × {first} ar | tokens/target pass (spec / staged / ngram) | decode-only × (spec / staged / "
             "ngram) | time to first token ms (ar / spec / staged / ngram) | greedy mismatches vs ar |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['bundle']} | {r['set']} | {r['temperature']} | {r['ar']['tok_s']} | {r['spec']['ratio']} | "
                     f"{r['staged']['ratio']} | {r['ngram']['ratio']} | {_best(r)} | "
                     f"{r['spec']['tokens_per_target_pass']} / "
                     f"{r['staged']['tokens_per_target_pass']} / {r['ngram']['tokens_per_target_pass']} | "
                     f"{' / '.join(str(r[m]['decode_ratio']) for m in MODES[1:])} | "
                     f"{' / '.join(str(r[m]['ttft_ms']) for m in MODES)} | "
                     f"{sum(r[m]['greedy_mismatches'] for m in MODES)} |")
    print("\n".join(table))
    if args.write_docs:
        plot_histograms(hists, Path("docs/acceptance-histograms.png"))
        body = [
            "## Speculative modes: ar, spec, staged, ngram",
            "",
            f"Machine: {machine()}. Commit {git_rev()}. Command: `python bench/bench_speculative.py "
            f"--quants {' '.join(args.quants)} --prompts {args.prompts} --max-new-tokens {args.max_new_tokens}"
            " --write-docs`.",
            f"Default pair: SmolLM2-135M-Instruct target, draft = {args.draft_layers} of its layers (the first "
            f"{args.draft_layers - 1} and the last when distilled), {_distilled(args.distill_minutes)}, trigram table "
            f"from {_table_text(engines[first])}. Ratios are tokens/s relative to the same bundle's `ar`, "
            "measured in the same run, end to end (prompt prefill included); 'decode-only' counts the tokens "
            "after the first step's and the time after it, like `ar`'s decode tok/s in section 'ar' (a draft's "
            "catch-up on the prompt falls in whichever step the mode does it); each prompt runs every bundle's "
            "modes in turn; "
            "'best mode' is the bundle's fastest mode "
            f"relative to the `{first}` bundle's `ar` (absolute speed across bundles); chat template; "
            f"{args.max_new_tokens} new tokens.",
            "",
            *table,
            "",
            "![accepted tokens per target pass](../acceptance-histograms.png)",
        ]
        write_section("speculative", "\n".join(body), "\n".join(summary(rows, first)))


def _named_bundle(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not (sep and name and folder):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, folder


def summary(rows: list[dict], first: str) -> list[str]:
    """The headline table of docs/benchmarks.md: greedy rows, tokens/s ratios to the same bundle's `ar`."""
    out = ["| bundle | prompts | ar tok/s | spec × | staged × | ngram × "
           f"| best mode × {first} ar | greedy output = ar's |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["temperature"] == 0:
            same = "yes" if not sum(r[m]["greedy_mismatches"] for m in MODES) else "**no**"
            out.append(f"| {r['bundle']} | {r['set']} | {r['ar']['tok_s']} | {r['spec']['ratio']} | "
                       f"{r['staged']['ratio']} | {r['ngram']['ratio']} | {_best(r)} | {same} |")
    return out


def _best(row: dict) -> str:
    mode = max(MODES, key=lambda m: row[m]["ratio_to_first_ar"])
    return f"{row[mode]['ratio_to_first_ar']} ({mode})"


def _distilled(minutes: float) -> str:
    if not minutes:
        return "not distilled"
    return (f"distilled for {minutes:g} minutes with an 8192-token head (its measured agreement and cost: section "
            "'draft' and docs/drafts.md)")


def _table_text(engine) -> str:
    table = engine.manifest.raw.get("ngram", {})
    corpus = table.get("corpus_tokens", 0)
    generated = f"{table.get('tokens', 0)} generated tokens"
    return generated + (f" and {corpus} distillation corpus tokens" if corpus else "")


def plot_histograms(hists: dict, out: Path) -> None:
    """One panel per prompt set and mode; colour names the bundle and the line style the temperature, so that
    sixteen curves stay tellable apart (matplotlib's ten-colour cycle repeats otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in hists if k[3] != "ar" and hists[k]]
    if not keys:
        return
    sets = sorted({k[1] for k in keys})
    bundles = list(dict.fromkeys(k[0] for k in keys))
    colours = dict(zip(bundles, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    styles = {0.0: "-", 0.8: "--"}
    fig, axes = plt.subplots(len(sets), 3, figsize=(12, 3.2 * len(sets)), sharey=True, squeeze=False)
    for row, set_name in zip(axes, sets, strict=True):
        for ax, mode in zip(row, ("spec", "staged", "ngram"), strict=True):
            for k in [k for k in keys if k[1] == set_name and k[3] == mode]:
                h = hists[k]
                total = sum(h.values())
                xs = sorted(h)
                ax.plot(xs, [h[x] / total for x in xs], marker="o", markersize=3, color=colours[k[0]],
                        linestyle=styles.get(k[2], ":"), label=f"{k[0]} T={k[2]}")
            ax.set_title(f"{mode}, {set_name}")
            ax.set_xlabel("tokens committed per target pass")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(fontsize=6)
        row[0].set_ylabel("share of target passes")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
