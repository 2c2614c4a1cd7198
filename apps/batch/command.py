"""`edgespec batch`: a JSONL job that resumes where it stopped, on local worker processes or on Ray."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from edgespec.apps.batch.generate import BatchSettings
from edgespec.apps.batch.jobs import WorkerError
from edgespec.apps.batch.output import OutputFile
from edgespec.apps.batch.records import read_records


def add_parser(sub) -> None:
    from edgespec.runtime.cli import add_sampling_flags
    from edgespec.runtime.modes import DEFAULT_MODE, MODES

    p = sub.add_parser("batch", help="generate for every record of a JSONL file, resumably (extra: batch)",
                       description="Each input line is a JSON object with an 'id' and a 'prompt' or 'messages', "
                       "optionally max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, mode, "
                       "settings (the mode's) and chat. Output lines are appended as records finish; running the "
                       "same command again skips the ids already written.")
    p.add_argument("--bundle", required=True)
    p.add_argument("input", help="JSONL input (with --ray also a URI pyarrow reads: s3://, gs://, ...)")
    p.add_argument("output", help="JSONL output, appended to (and resumed from) when it exists")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=list(MODES))
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="a setting of the mode for every record (records may give their own 'settings')")
    p.add_argument("--max-tokens", type=int, default=256)
    add_sampling_flags(p, seed_default=0, seed_help="job seed: a record without 'seed' samples with a hash of this "
                       "and its id, whichever worker runs it")
    p.add_argument("--chat", action="store_true", help="wrap 'prompt' records in the chat template")
    p.add_argument("--workers", type=int, default=1, help="worker processes (Ray actors with --ray)")
    p.add_argument("--threads", type=int, help="threads in all, split between workers (default: all cores; "
                   "with --ray, threads per actor, default 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="run on Ray Data: a local Ray instance, or the cluster at ADDRESS ('auto', 'ray://...')")
    p.set_defaults(func=main)


@dataclass
class Summary:
    records: int = 0
    errors: int = 0
    tokens: int = 0
    target_passes: int = 0

    def add(self, output: dict) -> None:
        self.records += 1
        if "error" in output:
            self.errors += 1
            return
        self.tokens += output["usage"]["completion_tokens"]
        self.target_passes += output["stats"].get("target_passes", 0)


def main(args: argparse.Namespace) -> int:
    """Run the job; bad settings, an unreadable input or duplicate ids stop it before anything is written."""
    settings = _settings(args)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    items = read_records(_input_lines(args))
    with OutputFile(args.output) as out:
        if out.repaired_bytes:
            print(f"edgespec batch: cut a torn last line ({out.repaired_bytes} bytes) from {args.output}",
                  file=sys.stderr)
        pending = [item for item in items if item.key not in out.done]
        skipped = len(items) - len(pending)
        if skipped:
            print(f"edgespec batch: resuming: {skipped} of {len(items)} records are already in {args.output}",
                  file=sys.stderr)
        summary, start = Summary(), time.perf_counter()
        try:
            for output in _progress(_outputs(args, pending, settings), len(pending), summary, start):
                out.append(output)
        except WorkerError as exc:
            print(f"edgespec: error: {exc}", file=sys.stderr)
            return 1
    seconds = time.perf_counter() - start
    per_pass = (f", {summary.tokens / summary.target_passes:.2f} tokens per target pass (prefill included)"
                if summary.target_passes else "")
    print(f"edgespec batch: {summary.records} records ({summary.errors} errors, {skipped} already done), "
          f"{summary.tokens} tokens in {seconds:.1f} s, {summary.tokens / max(seconds, 1e-9):.1f} tokens/s{per_pass}",
          file=sys.stderr)
    return 0


def _settings(args: argparse.Namespace) -> BatchSettings:
    from edgespec.runtime.modes import make_request, parse_setting

    mode_settings = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        mode_settings[name] = parse_setting(args.mode, name, value)
    settings = BatchSettings(args.mode, args.max_tokens, args.temperature, args.top_p, args.top_k,
                             args.repetition_penalty, tuple(args.stop), args.chat, mode_settings, args.seed)
    # the job's own settings fail here, once, rather than on every record
    make_request(args.mode, {**mode_settings, "temperature": args.temperature, "top_p": args.top_p,
                             "top_k": args.top_k, "repetition_penalty": args.repetition_penalty,
                             "seed": args.seed, "stop": tuple(args.stop)})
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return settings


def _input_lines(args: argparse.Namespace) -> list[str]:
    from edgespec.apps.batch.on_ray import read_lines

    if "://" in args.input and not args.ray:
        raise ValueError("an input URI needs --ray (a local job reads local files)")
    try:
        return read_lines(args.input)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{args.input} is not UTF-8 text (byte offset {exc.start})") from None


def _outputs(args: argparse.Namespace, pending: list, settings: BatchSettings) -> Iterator[dict]:
    if args.ray:
        try:
            import ray  # noqa: F401

            from edgespec.apps.batch.on_ray import run_on_ray
        except ImportError:
            raise ValueError("--ray needs the ray extra: pip install 'edgespec[ray]'") from None
        return run_on_ray(args.bundle, pending, settings, address=None if args.ray == "local" else args.ray,
                          workers=args.workers, threads=args.threads or 1, device=args.device)
    from edgespec.apps.batch.jobs import run

    return run(args.bundle, pending, settings, workers=args.workers, threads=args.threads or os.cpu_count(),
               device=args.device, ordered=False)


def _progress(outputs: Iterator[dict], total: int, summary: Summary, start: float) -> Iterator[dict]:
    """Count each output into the summary under a progress bar of records, with tokens/s and an ETA."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise ValueError("edgespec batch needs the batch extra for its progress bar: "
                         "pip install 'edgespec[batch]'") from None
    with tqdm(total=total, unit="rec", file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        for output in outputs:
            summary.add(output)
            bar.set_postfix(tok_s=f"{summary.tokens / max(time.perf_counter() - start, 1e-9):.1f}",
                            errors=summary.errors, refresh=False)
            bar.update(1)
            yield output
