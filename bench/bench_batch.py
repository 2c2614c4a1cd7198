"""`edgespec batch` throughput: records/s and tokens/s over HumanEval and prose prompts, with `ar` and the default
lossless mode, one worker (all threads), two workers (a thread each) and Ray Data with two local actors.

Each configuration is the whole `edgespec batch` command in a subprocess, timed from start to exit, so the
figures include loading the bundle in every worker (and, on Ray, starting the local Ray instance): what a user
waits for. The configurations run one after another on the same bundle (the default `edge-export --target default
--quant int4` bundle), greedy, the chat template. Usage:

    python bench/bench_batch.py --records 100 --max-tokens 64 --write-docs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench_default import export
from common import git_rev, machine, prompt_set, write_section

from edgespec.runtime.engine import Engine

CONFIGS = {  # name -> extra command-line flags
    "1 worker, 2 threads": ["--workers", "1", "--threads", "2"],
    "2 workers, 1 thread each": ["--workers", "2", "--threads", "2"],
    "Ray Data, 2 local actors, 1 thread each": ["--ray", "--workers", "2", "--threads", "1"],
}


def write_input(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": p}]}) + "\n"
                            for i, p in enumerate(prompts)))
    return path


def warm_up(bundle: Path) -> None:
    """Make the one-time measurements every configuration would otherwise pay in its first job: the pass-size check
    at one and two threads, and the pass costs the workers share (runtime/cache.py keeps them in the bundle)."""
    for threads in (1, 2):
        engine = Engine.load(bundle, threads=threads)
        engine.check_pass_sizes()
        engine.measure_costs()


def run_job(bundle: Path, src: Path, out: Path, mode: str, max_tokens: int, flags: list[str]) -> dict:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "batch", "--bundle", str(bundle), str(src),
                    str(out), "--mode", mode, "--max-tokens", str(max_tokens), *flags], check=True)
    seconds = time.perf_counter() - t0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    errors = [r for r in lines if "error" in r]
    if errors:
        raise SystemExit(f"{len(errors)} records failed, e.g. {errors[0]}")
    tokens = sum(r["usage"]["completion_tokens"] for r in lines)
    passes = sum(r["stats"]["target_passes"] for r in lines)
    return {"records": len(lines), "tokens": tokens, "seconds": seconds, "passes": passes,
            "ids": {r["id"]: r["token_ids"] for r in lines}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=100, help="prompts per set")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default="ar,auto", help="comma-separated modes")
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bundle = export(work / "default-int4")
    warm_up(bundle)
    modes = args.modes.split(",")
    lines = ["| prompts | mode | configuration | records/s | tokens/s | tokens per target pass | ids = 1 worker |",
             "|---|---|---|---|---|---|---|"]
    for name in ("humaneval", "prose"):
        src = write_input(work / f"batch-{name}.jsonl", prompt_set(name, args.records))
        for mode in modes:
            first = None
            for config, flags in CONFIGS.items():
                r = run_job(bundle, src, work / "batch-out.jsonl", mode, args.max_tokens, flags)
                first = first or r["ids"]
                same = sum(r["ids"][i] == first[i] for i in first)
                row = (f"| {name} | {mode} | {config} | {r['records'] / r['seconds']:.2f} | "
                       f"{r['tokens'] / r['seconds']:.1f} | {r['tokens'] / r['passes']:.2f} | {same}/{len(first)} |")
                print(row, flush=True)
                lines.append(row)
    report = [f"Machine: {machine()}. Commit {git_rev()}. {args.records} prompts per set, up to {args.max_tokens} new "
              "tokens, greedy, chat template; each row is a whole `edgespec batch` command timed from start to exit "
              "(bundle loading in every worker and Ray's start included; the one-time pass-size checks and pass "
              "costs measured before, as after a first job). Tokens per target pass counts prefill passes too.",
              "", *lines]
    print("\n".join(report))
    if args.write_docs:
        summary = [*lines[:2], *(line for line in lines[2:] if "2 workers" in line)]  # the fastest local setup
        write_section("batch", "\n".join(["## Offline batch jobs (`edgespec batch`)", "", *report]), "\n".join(summary))


if __name__ == "__main__":
    sys.exit(main())
