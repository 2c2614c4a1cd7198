"""The JavaScript decode loop in the browser: tokens/s of `ar`, `ngram` and `staged` in headless Chromium with a
phone profile (Pixel 7 viewport and user agent, no cross-origin isolation, so onnxruntime-web runs on one WASM
thread as in Android's WebView), side by side in one run, each answer checked token for token against the Python
runtime's greedy answer on the same bundle; and the loop's own cost per token (time outside onnxruntime's runs)
next to the Python runtime's. Usage:

    edge-export --target default --quant int4 --derive-draft --max-context 512 --out bundles/phone-int4
    python bench/bench_web.py --bundle bundles/phone-int4 --write-docs

Needs Debian's chromium and `npm ci` in apps/web (docs/web-and-android.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, git_rev, machine, prompt_set, write_section

sys.path.insert(0, str(ROOT / "tests"))
from test_web import CHROMIUM_ARGS, StaticServer  # noqa: E402

from edgespec.runtime.engine import Engine  # noqa: E402

MODES = {"ar": {}, "ngram": {"k": 4}, "staged": {"depth": 3}}  # the JS loop's defaults (apps/web/src/decode.js)
DONE = "['done', 'error'].includes(document.querySelector('#status').dataset.state)"


def python_runs(bundle: Path, prompts: list[str], max_tokens: int) -> dict:
    """Per mode: the Python runtime's greedy ids per prompt, tokens/s and its cost per token outside the passes."""
    engine = Engine.load(bundle)
    out = {}
    for mode, settings in MODES.items():
        ids, tokens, seconds, outside = [], 0, 0.0, 0.0
        for prompt in prompts:
            engine.generate(prompt, max_new_tokens=4, mode=mode, chat=True, temperature=0, **settings)  # warm
            for runner in (engine.target, engine.draft):
                if runner is not None:
                    runner.rollback(0)
            passes = engine.target.stats.seconds + (engine.draft.stats.seconds if engine.draft else 0.0)
            result = engine.generate(prompt, max_new_tokens=max_tokens, mode=mode, chat=True, temperature=0,
                                     **settings)
            passes = engine.target.stats.seconds + (engine.draft.stats.seconds if engine.draft else 0.0) - passes
            ids.append(result.token_ids)
            tokens += len(result.token_ids)
            seconds += result.stats["seconds"]
            outside += result.stats["seconds"] - passes
        out[mode] = {"ids": ids, "tokens_per_second": tokens / seconds, "outside_ms": 1000 * outside / tokens}
    return out


def browser_runs(bundle: Path, prompts: list[str], max_tokens: int) -> dict:
    """Per mode, in Chromium with a phone profile: ids per prompt and the page's stats; and the load."""
    from playwright.sync_api import sync_playwright

    site = Path(tempfile.mkdtemp(prefix="bench-web-"))
    subprocess.run(["node", str(ROOT / "apps" / "web" / "build.mjs"), "--out", str(site), "--bundle", str(bundle)],
                   check=True, capture_output=True)
    server = StaticServer(site)
    out: dict = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_context(**p.devices["Pixel 7"]).new_page()
            t0 = time.perf_counter()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true]", timeout=1_800_000)
            out["load_seconds"] = time.perf_counter() - t0
            out["status"] = page.inner_text("#status")
            out["backend"] = page.inner_text("#stat-backend")
            for mode in MODES:
                runs = []
                for prompt in prompts:
                    page.click("#new-chat")
                    page.select_option("#mode", mode)
                    page.fill("#max-tokens", str(max_tokens))
                    page.fill("#prompt", prompt)
                    page.click("#send")
                    page.wait_for_function(DONE, timeout=1_800_000)
                    if page.get_attribute("#status", "data-state") != "done":
                        raise SystemExit(f"{mode}: {page.inner_text('#conversation')}")
                    runs.append({"ids": json.loads(page.get_attribute(".msg.assistant", "data-token-ids")),
                                 "stats": json.loads(page.get_attribute(".msg.assistant", "data-stats"))})
                    print(mode, runs[-1]["stats"]["tokens_per_second"], flush=True)
                out[mode] = runs
            browser.close()
    finally:
        server.close()
    return out


def node_runs(bundle: Path, prompts: list[str], max_tokens: int) -> dict:
    """The same JavaScript loop in node on onnxruntime-node, whose CPU kernels are the Python runtime's: `ar` ids."""
    done = subprocess.run(["node", "test/generate.mjs", str(bundle.resolve()), "node", "ar", str(max_tokens)],
                          cwd=ROOT / "apps" / "web", input=json.dumps(prompts), capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def bundle_size(bundle: Path) -> tuple[int, dict]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    sizes = {rel: (bundle / rel).stat().st_size for rel in manifest["files"]}
    return sum(sizes.values()), manifest


def report(bundle: Path, prompts: list[str], max_tokens: int, py: dict, web: dict, node: dict) -> str:
    total, manifest = bundle_size(bundle)
    browser_ar = [r["ids"] for r in web["ar"]]
    rows = []
    ar_tps = None
    for mode in MODES:
        runs = web[mode]
        tokens = sum(r["stats"]["new_tokens"] for r in runs)
        seconds = sum(r["stats"]["seconds"] for r in runs)
        passes = sum(r["stats"]["target_passes"] for r in runs)
        drafted = sum(r["stats"]["drafted"] for r in runs)
        accepted = sum(r["stats"]["accepted"] for r in runs)
        loop = sum(r["stats"]["loop_seconds"] for r in runs)
        same = sum(r["ids"] == ids for r, ids in zip(runs, py[mode]["ids"], strict=True))
        lossless = sum(r["ids"] == ids for r, ids in zip(runs, browser_ar, strict=True))
        tps = tokens / seconds
        ar_tps = ar_tps or tps
        acceptance = f"{accepted / drafted:.0%}" if drafted else "–"
        rows.append(f"| `{mode}` | {tps:.2f} | {tps / ar_tps:.2f}x | {tokens / passes:.2f} | {acceptance} | "
                    f"{lossless}/{len(runs)} | {same}/{len(runs)} | {1000 * loop / tokens:.1f} | "
                    f"{py[mode]['outside_ms']:.1f} | {py[mode]['tokens_per_second']:.1f} |")
    node_same = sum(a == b for a, b in zip(node["answers"], py["ar"]["ids"], strict=True))
    models = manifest["models"]
    shape = ", ".join(f"{role} {m['quantization']['method']} ({m['spec']['num_layers']} layers)"
                      for role, m in models.items())
    return "\n".join([
        "## The JavaScript loop in the browser (bench/bench_web.py)", "",
        f"Headless Chromium ({web['backend']}), Pixel 7 profile, no cross-origin isolation (as Android's WebView); "
        f"{len(prompts)} HumanEval prompts as chat turns, {max_tokens} new tokens, greedy; the same bundle in the "
        "Python runtime on the same machine for the last three columns.", "",
        "| mode | browser tokens/s | vs ar | tokens per target pass | acceptance | tokens = browser ar's | "
        "tokens = Python's | JS loop ms/token outside onnxruntime | Python ms/token outside onnxruntime | "
        "Python tokens/s |",
        "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
        f"The same JavaScript loop in node on onnxruntime-node (the native CPU kernels the Python runtime runs): "
        f"`ar` gives the Python runtime's tokens on {node_same}/{len(prompts)} prompts (pass-size check: input rows "
        f"{node['passCheck']['inputRows']}). Where the browser's answers differ from Python's, onnxruntime-web's "
        "WASM kernels compute the logits apart from the native x86 ones, and greedy text follows a near-tie the "
        "other way; within the browser every mode gives `ar`'s tokens.", "",
        f"Bundle: {shape}, n-gram table: {'yes' if manifest.get('ngram') else 'no'}, max_context "
        f"{manifest['max_context']}, {total / 1e6:.0f} MB. Page load to ready in the browser: "
        f"{web['load_seconds']:.1f} s ({web['status']}; it includes reading and hashing the bundle, creating the "
        "sessions and the pass-size check).", "",
        "onnxruntime-web's WASM backend has no IO binding, so each pass copies the whole KV buffer into the WASM heap "
        "and the present K/V back out (docs/web-and-android.md): that copy is part of each pass's time here, which is "
        "why fewer target passes pay off more in the browser than in the Python runtime.", "",
        f"Machine: {machine()}; commit {git_rev()}."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default="bundles/phone-int4")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle} is not a bundle; export it first: edge-export --target default --quant int4 "
                         "--derive-draft "
                         f"--max-context 512 --out {bundle}")
    prompts = prompt_set("humaneval", args.prompts)
    py = python_runs(bundle, prompts, args.max_new_tokens)
    web = browser_runs(bundle, prompts, args.max_new_tokens)
    node = node_runs(bundle, prompts, args.max_new_tokens)
    body = report(bundle, prompts, args.max_new_tokens, py, web, node)
    print(body)
    if args.write_docs:
        write_section("bench_web", body)


if __name__ == "__main__":
    main()
