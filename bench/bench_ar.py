"""`ar` decoding speed of our fp32 / int8 / int4 bundles next to onnxruntime-genai's int4, in one run.

For each HumanEval prompt (chat template) every system decodes in turn (interleaved), greedy,
same prompt token ids, same thread count. Reported: decode tokens/s, time to first token, the
memory bandwidth the decode implies (bytes of weights a pass reads × passes / seconds) and a
measured memcpy bandwidth of this machine. Usage:

    python bench/bench_ar.py --prompts 10 --write-docs
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import ensure_bundle, git_rev, is_current, machine, perplexity, prompt_set, prose_texts, write_section

from edgespec.runtime.engine import Engine
from edgespec.runtime.model import physical_cores


def memcpy_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Best-of copy bandwidth in GB/s (read + write counted once each, as a decode reads weights once)."""
    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def weight_bytes_per_pass(bundle: Path) -> int:
    """Bytes of weights one decode pass streams: the target's initializers minus its embedding table, of which a
    Gather reads one row (fp32 in older bundles, 8-bit blocks now)."""
    import onnx

    manifest = json.loads((bundle / "manifest.json").read_text())
    total = 0
    for graph in manifest["models"]["target"]["graphs"].values():
        model = onnx.load(str(bundle / graph["file"]), load_external_data=False)
        for t in model.graph.initializer:
            if not t.name.startswith("embed_tokens.weight"):
                ext = {e.key: e.value for e in t.external_data}
                total += int(ext["length"]) if "length" in ext else len(t.raw_data)
    return total


# Both print KiB of VmHWM (the engine's own stat reads it too), not getrusage's ru_maxrss: Linux carries
# ru_maxrss across exec, so a child of this big process would report the parent's peak.
HWM = "print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')))"
PEAK_RSS = """import sys
from edgespec import Engine
result = Engine.load(sys.argv[1]).generate(sys.argv[2], max_new_tokens=int(sys.argv[3]), chat=True)
print(result.stats["peak_rss_bytes"] // 1024)"""
GENAI_PEAK_RSS = """import sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=2048, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(tokenizer.encode(sys.argv[2]))
for _ in range(int(sys.argv[3])):
    gen.generate_next_token()
""" + HWM


def peak_rss_mb(path: Path, prompt: str, max_new_tokens: int, genai: bool = False) -> float:
    """Peak resident memory of a fresh process that loads the model and generates: weights, KV, arenas."""
    out = subprocess.run([sys.executable, "-c", GENAI_PEAK_RSS if genai else PEAK_RSS, str(path), prompt,
                          str(max_new_tokens)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


RTN_LIKE_GENAI = {"gguf_exact": False, "lm_head_bits": 4}  # genai builder's default int4: RTN block 32, 4-bit head
VARIANTS = {"int4-ar-only": ("int4", {"ar_only": True}),
            "int4-rtn": ("int4", RTN_LIKE_GENAI),
            "int4-rtn-ar-only": ("int4", {**RTN_LIKE_GENAI, "ar_only": True})}


def bundle_for(work: Path, quant: str, loaded_cache: dict) -> Path:
    """Our bundle for a `--quants` entry: a plain quantization, or one of VARIANTS (target only)."""
    if quant not in VARIANTS:
        return ensure_bundle(work, quant, loaded_cache)
    out = work / f"smollm2-{quant}"
    if is_current(out):
        return out
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle
    from edgespec.export.sources import load

    if "default" not in loaded_cache:
        loaded_cache["default"] = load("default")
    base, extra = VARIANTS[quant]
    return export_bundle("default", out, options=ExportOptions(quant=base, max_context=2048, **extra),
                         parity=False, preloaded=loaded_cache)


def build_genai_model(work: Path, loaded_cache: dict) -> Path:
    """onnxruntime-genai's int4 CPU model of the default model, built offline from an HF directory."""
    out = work / "genai-int4"
    if (out / "genai_config.json").is_file():
        return out
    from edgespec.export.sources import load

    if "default" not in loaded_cache:
        loaded_cache["default"] = load("default")
    loaded = loaded_cache["default"]
    hf_dir = work / "smollm2-hf"
    if not (hf_dir / "config.json").is_file():
        if getattr(loaded.model, "hf_quantizer", None) is not None:
            loaded.model.hf_quantizer.remove_quantization_config(loaded.model)
        loaded.model.save_pretrained(hf_dir)
        loaded.tokenizer.save_pretrained(hf_dir)
        config = json.loads((hf_dir / "config.json").read_text())  # older readers ignore rope_parameters
        config.setdefault("rope_theta", config.get("rope_parameters", {}).get("rope_theta", 100000.0))
        (hf_dir / "config.json").write_text(json.dumps(config, indent=1))
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                    "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True)
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = physical_cores()
    config_path.write_text(json.dumps(config, indent=1))
    return out


def genai_decode(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> tuple[list[int], float, float]:
    """(new token ids, time to first token, decode seconds after it) with the og.Generator loop, greedy."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    t_first = time.perf_counter()
    tokens = [int(gen.get_next_tokens()[0])]
    while len(tokens) < max_new_tokens and not gen.is_done() and tokens[-1] not in eos:
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, t_first - t0, time.perf_counter() - t_first


def same_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two greedy outputs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def fidelity_cells(outputs: list[list[int]], reference: list[list[int]] | None, eos: set[int]) -> str:
    """Greedy outputs identical to the fp32 bundle's (which equals torch on the GGUF model) and the mean number of
    tokens before the first difference: what a quantization costs in faithfulness, next to what it buys in speed."""
    if reference is None:
        return "– | –"
    strip = [[t for t in out if t not in eos] for out in outputs]
    ref = [[t for t in out if t not in eos] for out in reference]
    same = sum(a == b for a, b in zip(strip, ref, strict=True))
    prefix = statistics.mean(same_prefix(a, b) for a, b in zip(strip, ref, strict=True))
    return f"{same}/{len(ref)} | {prefix:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--quants", nargs="+", default=["fp32", "int8", "int4", "w8a8", *VARIANTS])
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    engines = {q: Engine.load(bundle_for(work, q, cache)) for q in args.quants}
    genai = None
    if not args.no_genai:
        import onnxruntime_genai as og

        genai_path = build_genai_model(work, cache)
        genai = og.Model(str(genai_path))
    cache.clear()
    prompts = prompt_set("humaneval", args.prompts)
    any_engine = next(iter(engines.values()))
    eos = set(any_engine.tokenizer.eos_token_ids)
    results: dict[str, dict[str, list[float]]] = {}
    for engine in engines.values():
        engine.generate(prompts[0], max_new_tokens=8, chat=True)  # warm-up
    for prompt in prompts:
        ids = any_engine.prompt_tokens(prompt, chat=True)
        for quant, engine in engines.items():
            r = engine.generate(prompt, max_new_tokens=args.max_new_tokens, chat=True)
            acc = results.setdefault(f"edgespec {quant}", {"tps": [], "ttft": [], "tokens": []})
            acc["tps"].append(r.stats["decode_tokens_per_second"] or 0.0)
            acc["ttft"].append(r.stats["time_to_first_token"])
            acc["tokens"].append(r.token_ids)
        if genai is not None:
            tokens, ttft, dec = genai_decode(genai, ids, args.max_new_tokens, eos)
            acc = results.setdefault("onnxruntime-genai int4", {"tps": [], "ttft": [], "tokens": []})
            acc["tps"].append((len(tokens) - 1) / dec if dec > 0 else 0.0)
            acc["ttft"].append(ttft)
            acc["tokens"].append(tokens)
    bandwidth = memcpy_bandwidth()
    texts = prose_texts()
    ppl = {f"edgespec {quant}": perplexity(engine, texts) for quant, engine in engines.items()}
    reference = results.get("edgespec fp32", {}).get("tokens")
    lines = ["| system | decode tok/s (median) | time to first token ms (median) | weights read per pass MB "
             "| implied bandwidth GB/s | peak RSS MB | greedy output = fp32's | tokens before first difference "
             "(mean) | prose perplexity |", "|---|---|---|---|---|---|---|---|---|"]
    peer = statistics.median(results["onnxruntime-genai int4"]["tps"]) if "onnxruntime-genai int4" in results else None
    short = ["| system | decode tok/s | × genai int4 | time to first token ms | peak RSS MB | greedy output = fp32's "
             "| tokens before first difference | prose perplexity |", "|---|---|---|---|---|---|---|---|"]
    for name, acc in results.items():
        tps, ttft = statistics.median(acc["tps"]), statistics.median(acc["ttft"]) * 1000
        faithful = fidelity_cells(acc["tokens"], reference, eos)
        ppl_cell = f"{ppl[name]:.2f}" if name in ppl else "–"
        if name.startswith("edgespec"):
            root = engines[name.split()[1]].manifest.root
            wb = weight_bytes_per_pass(root)
            rss = peak_rss_mb(root, prompts[0], args.max_new_tokens)
            lines.append(f"| {name} | {tps:.1f} | {ttft:.0f} | {wb / 1e6:.0f} | {wb * tps / 1e9:.1f} | {rss:.0f} "
                         f"| {faithful} | {ppl_cell} |")
        else:
            rss = peak_rss_mb(genai_path, prompts[0], args.max_new_tokens, genai=True)
            lines.append(f"| {name} | {tps:.1f} | {ttft:.0f} | – | – | {rss:.0f} | {faithful} | {ppl_cell} |")
        short.append(f"| {name} | {tps:.1f} | {f'{tps / peer:.2f}' if peer else '–'} | {ttft:.0f} | {rss:.0f} "
                     f"| {faithful} | {ppl_cell} |")
    tps = {name: statistics.median(acc["tps"]) for name, acc in results.items()}
    verdict = "; ".join(f"{name.split()[1]} / genai int4: {value / peer:.2f}" for name, value in tps.items()
                        if peer and name.startswith("edgespec int4"))
    print("\n".join(lines))
    print(f"memcpy bandwidth: {bandwidth:.1f} GB/s. {verdict}")
    if args.write_docs:
        body = ["## Autoregressive decoding (ar) and onnxruntime-genai", "",
                f"Machine: {machine()}; {physical_cores()} threads used. Commit {git_rev()}."
                f" Command: `python bench/bench_ar.py --prompts {args.prompts} --write-docs`. First {args.prompts} "
                f"HumanEval prompts in the chat template, greedy, up to {args.max_new_tokens} new tokens, "
                "systems interleaved per prompt; genai's model is its builder's default int4 (RTN, block 32, accuracy "
                "level 4, 4-bit LM head). Peak RSS: a fresh process per system loads the model and generates "
                f"{args.max_new_tokens} tokens for the first prompt (KV buffers of 2048 slots are allocated "
                "whole but only the pages written count). Faithfulness: each system's greedy token ids against "
                "the fp32 bundle's for the same prompt (the fp32 bundle equals torch greedy on the GGUF model, "
                "tests/test_export.py::test_default_fp32_greedy_matches_torch), trailing EOS ignored. Prose "
                "perplexity: each bundle's target, teacher-forced through its own graphs, on the first 256 tokens "
                "of each of 26 module docstrings of Python's standard library (English prose we did not write; "
                "bench/common.py `prose_texts`).",
                "", *lines, "", f"Measured memcpy bandwidth of this machine: {bandwidth:.1f} GB/s. {verdict}.", "",
                "Rows: `int4` is our default, the GGUF-exact Q4_1 carry-over with the file's 8-bit (Q8_0) LM head; "
                "`int4-rtn` re-quantizes like genai's builder (RTN, block 32, 4-bit LM head: `edge-export "
                "--no-gguf-exact --lm-head-bits 4`), so it is the like-for-like row; its greedy output drifts from "
                "the GGUF model's (column \"tokens before first difference\"). `-ar-only` rows are the same weights "
                "in a target graph for plain decoding (`--ar-only`): no attention padding, which the other target "
                "graphs carry so that their logits do not depend on pass size (needed for lossless speculation, "
                "docs/kv-interface.md). `w8a8` is the speculation-oriented target (`--quant w8a8`: int8 weights per "
                "channel, activations quantized per row; docs/speculative.md). The Q4_1 rows also pay an exact "
                "per-block offset term `blocksum(A) @ (m + 8d)ᵀ` per linear that symmetric RTN weights do not need "
                "(~2 ms per pass)."]
        write_section("ar", "\n".join(body), "\n".join(short))


if __name__ == "__main__":
    main()
