"""Shared pieces of the benchmarks: prompt sets, bundles, machine facts, and what `--write-docs` writes.

`--write-docs` writes two things (`write_section`): the benchmark's full report to docs/benchmark-log/<name>.md,
replaced by each run, and a short summary (the headline table, the exact command, the machine, the date) into the
section of docs/benchmarks.md between `<!-- begin <name> -->` and `<!-- end <name> -->`.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
LOG = ROOT / "docs" / "benchmark-log"
sys.path.insert(0, str(ROOT / "tests"))

from humaneval_prompts import humaneval_prompts  # noqa: E402

# A non-code prompt set: chat / prose requests of the kind an on-device assistant gets.
PROSE_PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain why the sky is blue to a ten-year-old.",
    "Give me five tips for sleeping better.",
    "Describe the water cycle in a few paragraphs.",
    "Write a polite email asking a colleague to review a document by Friday.",
    "What are the pros and cons of working from home?",
    "Summarize the plot of Romeo and Juliet.",
    "Write a poem about autumn leaves.",
    "How does a bicycle stay upright?",
    "Plan a three-day trip to a city with museums and parks.",
    "What is the difference between weather and climate?",
    "Explain what a budget is and how to make one.",
]


# More prose prompts than the hand-written twelve, for batch runs of 100: each request form over each subject.
PROSE_FORMS = ["Explain {} to someone who has never heard of it.", "Write a short blog post about {}.",
               "What are the most common misconceptions about {}?", "Give a beginner three practical tips about {}.",
               "Write a friendly paragraph for a newsletter on {}.", "Describe the history of {} in a few sentences.",
               "What would a day without {} look like?", "Compare two different views on {}."]
PROSE_SUBJECTS = ["public libraries", "bird migration", "composting at home", "learning a second language",
                  "night trains", "volcanoes", "saving money", "team sports", "bread baking", "solar panels",
                  "museums", "city parks", "handwriting"]


def prose_prompts(n: int) -> list[str]:
    """The twelve hand-written prose prompts, then PROSE_FORMS x PROSE_SUBJECTS (104 more), up to n."""
    more = [form.format(subject) for subject in PROSE_SUBJECTS for form in PROSE_FORMS]
    prompts = PROSE_PROMPTS + more
    if n > len(prompts):
        raise ValueError(f"the prose set has {len(prompts)} prompts, asked for {n}")
    return prompts[:n]


# English prose nobody here wrote, for perplexity: module docstrings of Python's standard library (CPython's authors).
PROSE_TEXT_MODULES = ("argparse", "asyncio.locks", "bisect", "calendar", "codecs", "collections", "contextlib",
                      "csv", "difflib", "doctest", "email.message", "ftplib", "heapq", "imaplib", "inspect",
                      "pickle", "pydoc", "queue", "sched", "shlex", "shutil", "smtplib", "string", "subprocess",
                      "tarfile", "threading", "timeit", "unittest", "uuid", "zipfile")


def prose_texts() -> list[str]:
    """The docstrings of PROSE_TEXT_MODULES (and of their public classes, for modules with a short one)."""
    import importlib
    import inspect

    texts = []
    for name in PROSE_TEXT_MODULES:
        module = importlib.import_module(name)
        docs = [inspect.getdoc(module) or ""] + [inspect.getdoc(obj) or "" for _, obj in
                                                  sorted(inspect.getmembers(module, inspect.isclass))
                                                  if getattr(obj, "__module__", "") == name]
        text = "\n\n".join(d for d in docs if len(d) > 200)
        if text:
            texts.append(text)
    return texts


def perplexity(engine, texts: list[str], tokens_per_text: int = 256) -> float:
    """The target's perplexity on the first `tokens_per_text` tokens of each text (teacher-forced, its own
    graphs, all-position logits), over all texts together."""
    import numpy as np

    runner, nll, count = engine.target, 0.0, 0
    for text in texts:
        ids = engine.tokenizer.encode(text)[:tokens_per_text]
        runner.rollback(0)
        for start in range(0, len(ids) - 1, runner.max_chunk):
            chunk = ids[start:start + runner.max_chunk]
            targets = ids[start + 1:start + 1 + len(chunk)]
            logits = runner.forward(chunk)[:len(targets)].astype(np.float64)
            peak = logits.max(axis=-1, keepdims=True)
            log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[:, 0]
            nll += float((log_norm - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
        runner.rollback(0)
    return float(np.exp(nll / count))


def cold(engine) -> None:
    """Empty the engine's KV buffers, so the next generation prefills its whole prompt. The engine keeps what its
    buffers hold of a previous generation's text; when several modes share one engine, the first to run a prompt
    would pay its prefill and the others reuse it, so every measured generation starts cold instead."""
    for runner in (engine.target, engine.draft):
        if runner is not None:
            runner.rollback(0)


def prompt_set(name: str, n: int) -> list[str]:
    if name == "humaneval":
        return humaneval_prompts(n)
    if name == "prose":
        return prose_prompts(n)
    raise ValueError(f"unknown prompt set {name}")


def is_current(bundle: Path) -> bool:
    """A bundle exported by the current graph code (a benchmark never measures graphs older code made)."""
    from edgespec.export.bundle import GRAPH_FORMAT

    if not (bundle / "manifest.json").is_file():
        return False
    from edgespec.export.ngram_table import TABLE_VERSION

    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest.get("graph_format") != GRAPH_FORMAT:
        print(f"{bundle} was exported by older graph code: exporting it again", flush=True)
        return False
    if "ngram" in manifest and manifest["ngram"].get("version", 1) != TABLE_VERSION:
        print(f"{bundle} has an older n-gram table: exporting it again", flush=True)
        return False
    return True


def ensure_bundle(work: Path, quant: str, loaded_cache: dict, **kwargs) -> Path:
    """The default model's bundle for `quant` under `work`, exported once and reused."""
    from edgespec.export.distill import DEFAULT_HEAD_TOKENS, DistillConfig, cache_key

    distill_minutes = kwargs.pop("distill_minutes", 0)
    out = work / f"smollm2-{quant}{''.join(f'-{k}{v}' for k, v in sorted(kwargs.items()))}"
    distill = None
    if kwargs.get("derive_layers") and distill_minutes:  # as `edge-export --target default` derives its draft
        distill = DistillConfig(minutes=distill_minutes, head_tokens=DEFAULT_HEAD_TOKENS)
        # Every setting that changes the distilled draft names the bundle, so a changed default (prompts, corpus
        # size) exports a new bundle instead of measuring the draft an older default made.
        settings = cache_key("", distill.key_fields())[:8]
        out = out.with_name(out.name + f"-distill{distill_minutes:g}-head{DEFAULT_HEAD_TOKENS}-{settings}")
    from edgespec.export.bundle import ExportOptions

    if is_current(out):
        return out
    from edgespec.export.cli import export_bundle
    from edgespec.export.sources import load

    if "default" not in loaded_cache:
        loaded_cache["default"] = load("default")
    return export_bundle("default", out, options=ExportOptions(quant=quant, max_context=2048), parity=False,
                         preloaded=loaded_cache, distill=distill, **kwargs)


def parse_with_common(ap) -> tuple[object, Path]:
    """Add the options every benchmark shares, parse, and return (args, the created work directory)."""
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--draft-layers", type=int, default=6)
    ap.add_argument("--distill-minutes", type=float, default=15.0,
                    help="distillation budget of the derived draft (cached across bundles and runs; 0: none)")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


# The instruction sets the CPU kernels choose between (4-bit MatMulNBits computes one-row passes differently on
# AVX2 without VNNI), in the order they are reported.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "bf16",
             "amx_tile": "AMX"}


def isa() -> str:
    """e.g. "AVX2 + FMA, no AVX-512/VNNI/bf16/AMX", from /proc/cpuinfo ("ISA unknown" elsewhere)."""
    try:
        flags = next(line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return "ISA unknown"
    have = [name for flag, name in ISA_FLAGS.items() if flag in flags]
    lack = [name for flag, name in ISA_FLAGS.items() if flag not in flags]
    return " + ".join(have) + (f", no {'/'.join(lack)}" if lack else "")


def short_machine() -> str:
    """The machine as the summary in docs/benchmarks.md names it: CPU, instruction sets, cores, onnxruntime."""
    return f"{cpu_name()} ({isa()}), {os.cpu_count()} logical CPUs, onnxruntime {ort.__version__}"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_name()} ({isa()}), {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"onnxruntime {ort.__version__}, load average at start {load:.2f}, {time.strftime('%Y-%m-%d')}")


def command() -> str:
    """The exact command line of this run, as typed from the repository root (the interpreter named by its path
    when it lives in the repository, as the OpenVINO environment does)."""
    python = Path(sys.executable)
    python = str(python.relative_to(ROOT)) if python.is_relative_to(ROOT) else "python"
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else Path(sys.argv[0])
    return shlex.join([python, str(script), *sys.argv[1:]])


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def first_table(text: str) -> str:
    """The first markdown table of `text` (the summary of a report that names none)."""
    match = re.search(r"(?m)(^\|.*\|[ \t]*\n?)+", text)
    return match.group(0).rstrip() if match else ""


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_section(name: str, body: str, summary: str | None = None) -> None:
    """What `--write-docs` writes, each file replaced atomically: the full report `body` (markdown, its title a
    `## ` heading) to docs/benchmark-log/<name>.md, overwriting the previous run's, and into the section `name` of
    docs/benchmarks.md (between marker comments; appended with the report's title if missing) the `summary`, the
    headline table of a few rows (by default the report's first table), under the exact command, the machine and
    the date, with a link to the full report."""
    date, cmd = time.strftime("%Y-%m-%d"), command()
    LOG.mkdir(parents=True, exist_ok=True)
    _replace(LOG / f"{name}.md", f"*Full report of the latest run, replaced by the next `--write-docs` run; its "
             f"summary is in [../benchmarks.md](../benchmarks.md).*\n\n{body.rstrip()}\n")
    summary = first_table(body) if summary is None else summary
    short = "\n".join([f"Run on {date}, {short_machine()}. Command: `{cmd}`", "", summary.rstrip(), "",
                        f"Full report: [benchmark-log/{name}.md](benchmark-log/{name}.md)."])
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    text = DOCS.read_text() if DOCS.is_file() else "# Benchmarks\n\nMeasured on our 2-core machines; " \
        "ratios are measured side by side in one run because the machines are shared and noisy.\n"
    block = f"{begin}\n{short}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        title = next((line for line in body.splitlines() if line.startswith("## ")), f"## {name}")
        text = text.rstrip() + f"\n\n{title}\n\n{block}\n"
    _replace(DOCS, text)
