"""Soak: many generations in one process, and the process's memory, descriptors and threads stay flat.

One engine runs N generations (default 500) of a rotating mix: every mode the bundle supports, greedy and seeded
sampling, `generate`, `stream` read to the end, streams abandoned half-way (closed, or dropped as CPython lets a
caller do), prompts that fill the context, three chat sessions sent turns in turn until each one's context is full
(then, as a user would, a new chat takes its place), and now and then two generations from two threads at once.

The process's RSS (VmRSS, and its anonymous and file-backed parts), open descriptors (/proc/self/fd) and OS threads
are read at the start, at the end of the warm-up and at the end, with samples in between. The warm-up is the first
fifth of the generations and lasts at least until a chat has filled the context: the KV buffers are allocated whole
but their pages become resident only as the context first grows, and the first generations also measure pass costs
and create each mode's pass shapes. After it, the bound (`ANON_BOUND_MIB`, `check`): anonymous RSS (the heap,
onnxruntime's arenas, numpy's buffers: where a leak lands) grows by at most 16 MiB, and descriptors and threads end
equal to their warm-up counts. A run that exceeds it exits with status 1. Linux only (/proc).

File-backed RSS is reported, not bounded: onnxruntime memory-maps the weights it reads in place (the embedding
table), whose pages become resident the first time a token id is embedded, so it grows with every token id not
seen before, up to the size of those files (feeding the real target every id once adds about 30 MiB), and the
kernel can drop those pages at any time.

    python bench/bench_soak.py                    # a tiny random bundle, built once under --work-dir (CI's run)
    python bench/bench_soak.py --bundle bench/.work/default-int4-derived --max-new-tokens 32 --write-docs

`--leak-for-test` makes the loop keep 1 MiB and one open file per step: tests/test_soak.py runs it to show that
the check fails on a leak.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from common import PROSE_PROMPTS, git_rev, is_current, machine, write_section

from edgespec.runtime.engine import Engine, ModeError, PromptError
from edgespec.runtime.modes import MODES

# A leak that survives the warm-up shows as steady growth: 16 MiB over 400 generations is 40 KiB each (about one
# real-model logits row of 49,152 floats per 5 generations). Allocator noise after the warm-up stays well below it.
ANON_BOUND_MIB = 16
SLOTS = ("generate", "chat", "stream", "chat", "stream-closed", "chat", "fill", "chat", "threads", "stream-dropped")
SAMPLED = {"temperature": 0.8, "top_p": 0.9}  # with seed=<generation index>
CHATS = 3


def build_tiny(out: Path) -> None:
    """A tiny random target, a draft derived from its first layer and an n-gram table: every mode runs."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from tiny import make_tiny_model_dir

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    model = make_tiny_model_dir(out.with_name(out.name + "-model"))
    export_bundle(str(model), out, derive_layers=1, ngram_tokens=200, parity=False,
                  options=ExportOptions(quant="fp32", max_context=256, log=lambda _: None))


def tiny_bundle(work: Path) -> Path:
    """The tiny bundle under `work`, built in a child process: torch and transformers never enter the measured one."""
    out = work / "soak-tiny"
    if not is_current(out):
        child = multiprocessing.get_context("spawn").Process(target=build_tiny, args=(out,))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"building the tiny bundle failed (exit {child.exitcode})")
    return out


def usage(generations: int) -> dict:
    """This process's resident memory (KiB: all, anonymous, file-backed), open descriptors and OS threads, after a
    full garbage collection (an object only a collection frees is not a leak)."""
    gc.collect()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = {key: int(status[name].split()[0]) for key, name in (("rss", "VmRSS"), ("anon", "RssAnon"),
                                                                 ("file", "RssFile"))}
    return {"generations": generations, **kib, "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"])}


class Soak:
    """The rotating workload on one engine; `slot(i)` runs the i-th slot and returns how many generations it ran."""

    def __init__(self, engine: Engine, max_new_tokens: int):
        self.engine, self.n = engine, max_new_tokens
        self.words = " ".join(PROSE_PROMPTS).split()
        self.modes = [name for name in MODES if self.supports(name)]
        self.chats = [engine.chat() for _ in range(CHATS)]
        self.counts = {"chat sends": 0, "chats started": CHATS, "chats filled": 0, "streams abandoned": 0,
                       "two-thread slots": 0, "new tokens": 0, "context-full stops": 0}

    def supports(self, mode: str) -> bool:
        try:
            self.engine.generate("Hello", max_new_tokens=1, mode=mode)
        except ModeError:  # no draft in the bundle, or this machine cannot verify passes exactly
            return False
        return True

    def text(self, tokens: int, start: int) -> str:
        """The most words of the prompt set that encode to at most `tokens` tokens, from word `start` on (so
        successive texts differ)."""
        words = []
        for i in range(start, start + tokens + 1):
            if len(self.engine.tokenizer.encode(" ".join(words + [self.words[i % len(self.words)]]))) > tokens:
                break
            words.append(self.words[i % len(self.words)])
        return " ".join(words)

    def settings(self, i: int, mode: str) -> dict:
        return {"mode": mode, "max_new_tokens": self.n, **({**SAMPLED, "seed": i} if i % 3 == 0 else {})}

    def slot(self, i: int) -> int:
        kind, mode = SLOTS[i % len(SLOTS)], self.modes[(i + i // len(SLOTS)) % len(self.modes)]  # every pair
        engine, settings = self.engine, self.settings(i, mode)
        if kind == "chat":
            return self.send(i, settings)
        if kind == "generate":
            self.counted(engine.generate(self.text(12, i), **settings))
        elif kind == "fill":  # a prompt that leaves room for fewer tokens than asked for: a context-full stop
            self.counted(engine.generate(self.text(engine.max_context - max(2, self.n // 4), i), **settings))
        elif kind == "stream":
            "".join(engine.stream(self.text(12, i), chat=True, **settings))
        elif kind.startswith("stream-"):  # read half, then close it or drop it: either releases the engine
            stream = engine.stream(self.text(12, i), chat=True, **settings)
            for _ in zip(range(self.n // 2), stream, strict=False):
                pass
            if kind == "stream-closed":
                stream.close()
            del stream
            self.counts["streams abandoned"] += 1
        else:
            return self.two_threads(i)
        return 1

    def send(self, i: int, settings: dict) -> int:
        """A turn of one of the chats in turn; a chat whose context is full is replaced by a new one, and a turn
        that no longer fits is sent again to the new chat."""
        index = self.counts["chat sends"] % CHATS
        self.counts["chat sends"] += 1
        message = self.text(self.engine.max_context // 8, 7 * i)
        try:
            result = self.chats[index].send(message, **settings)
        except PromptError:
            self.replace(index)
            result = self.chats[index].send(message, **settings)
        self.counted(result)
        if "context full" in result.message:
            self.replace(index)
        return 1

    def replace(self, index: int) -> None:
        self.chats[index] = self.engine.chat()
        self.counts["chats filled"] += 1
        self.counts["chats started"] += 1

    def two_threads(self, i: int) -> int:
        """Two generations at once from two threads (the engine's lock runs them one after the other)."""
        errors: list[BaseException] = []

        def run(j: int) -> None:
            try:
                self.counted(self.engine.generate(self.text(12, j), chat=True,
                                                  **self.settings(j, self.modes[j % len(self.modes)])))
            except BaseException as exc:  # re-raised in the soak's thread
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(j,)) for j in (i, i + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        self.counts["two-thread slots"] += 1
        return 2

    def counted(self, result) -> None:
        self.counts["new tokens"] += len(result.token_ids)
        self.counts["context-full stops"] += "context full" in result.message


def soak(engine: Engine, generations: int, max_new_tokens: int, samples: int, leak: bool) -> dict:
    """Run the workload; usage at the start, at the end of the warm-up, every generations/samples and at the end."""
    start = usage(0)
    work = Soak(engine, max_new_tokens)
    kept: list = []
    warm, trace, done, i, t0 = None, [start], 0, 0, time.perf_counter()
    while done < generations:
        done += work.slot(i)
        i += 1
        if leak:
            kept += [np.ones(1 << 20, np.uint8), open(os.devnull)]  # noqa: SIM115 (kept open on purpose)
        if warm is None and done >= generations // 5 and work.counts["chats filled"]:
            warm = usage(done)
            trace.append(warm)
        elif done // max(1, generations // samples) > trace[-1]["generations"] // max(1, generations // samples):
            trace.append(usage(done))
        else:
            continue
        print(f"soak: {trace[-1]}", file=sys.stderr, flush=True)
    end = usage(done)
    if trace[-1]["generations"] != done:
        trace.append(end)
    return {"generations": done, "modes": work.modes, "seconds": round(time.perf_counter() - t0, 1),
            "max_new_tokens": max_new_tokens, "max_context": engine.max_context, "start": start,
            "warmed_up": warm is not None, "warm": warm or end, "end": end, "trace": trace, **work.counts}


def check(result: dict) -> list[str]:
    """What exceeds the bound: anonymous RSS growth after the warm-up, and any change in descriptors or threads."""
    warm, end = result["warm"], result["end"]
    failures = [] if result["warmed_up"] else ["no chat filled its context, so the warm-up never ended: run more "
                                                 "generations"]
    growth = (end["anon"] - warm["anon"]) / 1024
    if growth > ANON_BOUND_MIB:
        failures.append(f"anonymous RSS grew {growth:.1f} MiB after the warm-up (bound {ANON_BOUND_MIB} MiB)")
    for key in ("fds", "threads"):
        if end[key] != warm[key]:
            failures.append(f"{key}: {warm[key]} after the warm-up, {end[key]} at the end")
    return failures


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def three(start: dict, warm: dict, end: dict, key: str, scale=mib) -> str:
    return " / ".join(scale(u[key]) for u in (start, warm, end))


def report(result: dict, bundle: Path, failures: list[str], rev: str) -> str:
    start, warm, end = result["start"], result["warm"], result["end"]
    anon, file = ((end[key] - warm[key]) / 1024 for key in ("anon", "file"))
    table = ["| generations | RSS start / after warm-up / end (MiB) | anonymous RSS growth after warm-up (bound) | "
             "file-backed growth | open fds start / warm-up / end | threads start / warm-up / end | result |",
             "|---|---|---|---|---|---|---|",
             f"| {result['generations']} (warm-up {warm['generations']}) | {three(start, warm, end, 'rss')} | "
             f"{anon:+.1f} MiB (≤ {ANON_BOUND_MIB}) | {file:+.1f} MiB | {three(start, warm, end, 'fds', str)} | "
             f"{three(start, warm, end, 'threads', str)} | {'; '.join(failures) or 'pass'} |"]
    counts = ", ".join(f"{k} {result[k]}" for k in ("chat sends", "chats started", "chats filled",
                                                     "streams abandoned", "two-thread slots", "context-full stops",
                                                     "new tokens"))
    trace = ["| generations | RSS (MiB) | anonymous | file-backed | open fds | threads |", "|---|---|---|---|---|---|"]
    trace += [f"| {u['generations']} | {mib(u['rss'])} | {mib(u['anon'])} | {mib(u['file'])} | {u['fds']} | "
              f"{u['threads']} |" for u in result["trace"]]
    return "\n".join([
        "## Soak: generations in one process, memory and descriptors", "",
        f"Machine: {machine()}. Commit {rev}. Bundle `{bundle.name}` (context {result['max_context']}), "
        f"modes {', '.join(result['modes'])}, up to {result['max_new_tokens']} new tokens, {result['seconds']} s. "
        "A rotating mix of generate, streams (read whole, closed half-way, dropped half-way), prompts that fill "
        "the context, three interleaved chats sent turns until their context is full, and two-thread slots; "
        f"greedy and seeded sampling. {counts}. Memory is read from /proc/self/status after a garbage collection; "
        "the warm-up ends after a fifth of the generations, once a chat has filled the context (the KV buffers' "
        "pages become resident as the context first grows). The bound is on anonymous memory: file-backed pages "
        "are the memory-mapped weights, resident as token ids are first embedded, at most the files' size "
        "(bench/bench_soak.py).", "", *table, "", "Samples along the way:", "", *trace])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a bundle directory (default: a tiny random bundle built under --work-dir)")
    ap.add_argument("--generations", type=int, default=500)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--samples", type=int, default=10, help="usage samples between the start and the end")
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--json", help="also write the result (usage samples, counts, failures) to this file")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--leak-for-test", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    bundle = Path(args.bundle) if args.bundle else tiny_bundle(work)
    rev = git_rev()  # of the code that runs (a long run may end after a newer commit)
    engine = Engine.load(bundle)
    result = soak(engine, args.generations, args.max_new_tokens, args.samples, args.leak_for_test)
    failures = check(result)
    text = report(result, bundle, failures, rev)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "failures": failures}, indent=1))
    if args.write_docs:
        write_section("soak", text)
    if failures:
        raise SystemExit("soak: " + "; ".join(failures))


if __name__ == "__main__":
    main()
