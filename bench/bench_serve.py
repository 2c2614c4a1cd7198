"""`edgespec serve` under 1, 2 and 4 concurrent clients on loopback: requests/s, tokens/s and latency percentiles.

The server runs as users run it (`edgespec serve`, its own process); each client is a thread here that sends
streamed, greedy chat requests one after another until the level's requests are done. Generations queue on the
engine, so more clients add waiting time, not speed: the table shows what a client waits (latency and time to
first token, p50/p90/p99) and that the server's throughput holds while they wait. Every answer is compared with
the same prompt's answer at one client (a shared engine must give each conversation what it gives alone). Usage:

    python bench/bench_serve.py --write-docs                    # the default bundle (int4, derived draft)
    python bench/bench_serve.py --bundle DIR --requests 8       # any bundle
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import ensure_bundle, git_rev, machine, parse_with_common, prompt_set, write_section


def start_server(bundle: Path, max_queue: int, mode: str | None) -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "edgespec.runtime.cli", "serve", "--bundle", str(bundle), "--port", "0",
               "--max-queue", str(max_queue)] + (["--mode", mode] if mode else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    found = re.search(r"at http://([\d.]+):(\d+)/ ", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, found.group(1), int(found.group(2))


def chat(host: str, port: int, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy request: its latency, time to first token, completion tokens and text."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    conn = http.client.HTTPConnection(host, port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {response.read()[:300]!r}")
    first, text, tokens = None, [], 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = first or time.perf_counter()
            text.append(chunk["choices"][0]["delta"]["content"])
    conn.close()
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": tokens, "text": "".join(text)}


def level(host: str, port: int, model: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    """`clients` threads sharing one list of requests; wall time from the first request to the last answer."""
    pending = list(enumerate(prompts))
    results: list[tuple[int, dict]] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index, prompt = pending.pop(0)
            result = chat(host, port, model, prompt, max_tokens)
            with lock:
                results.append((index, result))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    answers = [r for _, r in sorted(results, key=lambda item: item[0])]
    latency = np.percentile([r["latency"] for r in answers], [50, 90, 99])
    ttft = np.percentile([r["ttft"] for r in answers], [50, 90, 99])
    tokens = sum(r["tokens"] for r in answers)
    return {"clients": clients, "requests": len(answers), "seconds": round(wall, 2),
            "requests_per_second": round(len(answers) / wall, 3), "tokens_per_second": round(tokens / wall, 1),
            "tokens": tokens, "latency_s": [round(x, 2) for x in latency], "ttft_ms": [round(1000 * x) for x in ttft],
            "texts": [r["text"] for r in answers]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a bundle directory (default: the default model's bundle, exported once)")
    ap.add_argument("--quant", default="int4", help="the default bundle's precision, when --bundle is not given")
    ap.add_argument("--mode", help="the server's default mode (default: its own)")
    ap.add_argument("--prompts", default="prose", choices=("prose", "humaneval"))
    ap.add_argument("--requests", type=int, default=12, help="requests per concurrency level")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    args, work = parse_with_common(ap)
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        bundle = ensure_bundle(work, args.quant, {}, derive_layers=args.draft_layers, ngram_tokens=4000,
                               distill_minutes=args.distill_minutes)
    prompts = prompt_set(args.prompts, 12)
    prompts = (prompts * (args.requests // len(prompts) + 1))[:args.requests]
    proc, host, port = start_server(bundle, max(args.clients), args.mode)
    try:
        model = bundle.resolve().name
        warm = chat(host, port, model, prompts[0], 8)  # the one-time pass-size check and cost curves
        print(f"warm-up: {warm['latency']:.1f} s", flush=True)
        rows = []
        for clients in args.clients:
            row = level(host, port, model, prompts, clients, args.max_new_tokens)
            row["answers_differ_from_one_client"] = (sum(a != b for a, b in zip(row["texts"], rows[0]["texts"],
                                                                               strict=True)) if rows else 0)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "texts"}), flush=True)
        mode = json.loads(_get(host, port, "/v1/models"))["data"][0]["edgespec"]["default_mode"]
    finally:
        proc.terminate()
        proc.wait(30)
    table = ["| clients | requests | requests/s | tokens/s | latency p50 / p90 / p99 (s) | "
             "first token p50 / p90 / p99 (ms) | answers ≠ one client's |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['clients']} | {r['requests']} | {r['requests_per_second']} | {r['tokens_per_second']} | "
                     f"{' / '.join(map(str, r['latency_s']))} | {' / '.join(map(str, r['ttft_ms']))} | "
                     f"{r['answers_differ_from_one_client']} |")
    print("\n".join(table))
    if args.write_docs:
        body = ["## Local server under concurrent clients", "",
                f"Machine: {machine()}. Commit {git_rev()}. Bundle `{bundle.name}`, server mode `{mode}`, "
                f"{args.prompts} prompts as chat requests, greedy, up to {args.max_new_tokens} new tokens, streamed; "
                f"{args.requests} requests per level, each client sending its next request when its answer ends. "
                "Generations run one at a time on the engine, so latency grows with the clients while throughput "
                "holds; with this few requests p99 is close to the slowest request.", "", *table]
        write_section("serve", "\n".join(body))


def _get(host: str, port: int, path: str) -> str:
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    body = conn.getresponse().read().decode()
    conn.close()
    return body


if __name__ == "__main__":
    main()
