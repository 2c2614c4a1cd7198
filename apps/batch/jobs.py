"""`edgespec.batch.run`: a batch of records through one engine per worker process, results as they finish or in
input order.

Every worker decodes with the same pass-cost curves, measured once per bundle and machine with one thread
(runtime/costs.py; cached in the bundle): `auto` and the adaptive modes size their proposals from those curves, so
with one set for every worker a record's steps, and therefore its seeded sampled text, do not depend on how many
workers ran the job or which one took the record. (Greedy text never depends on them: every mode is lossless.)
"""

from __future__ import annotations

import multiprocessing
import os
import queue
from collections.abc import Iterable, Iterator

from edgespec.apps.batch.generate import BatchSettings, bad_line_output, generate_record
from edgespec.apps.batch.records import BadLine, Record, check_unique, parse_object
from edgespec.runtime.bundle import BundleError
from edgespec.runtime.engine import Engine

POLL_SECONDS = 0.5  # how often the parent looks for a worker that died while it waits for results


class WorkerError(RuntimeError):
    """A worker process died or could not load the bundle; written records stay, a re-run does the rest."""


def as_items(records: Iterable[dict | Record | BadLine]) -> list[Record | BadLine]:
    """Records given to the API as dicts (the JSONL objects) are numbered from 1 like input lines."""
    return check_unique([r if isinstance(r, Record | BadLine) else parse_object(r, n)
                         for n, r in enumerate(records, 1)])


def shared_cost_curves(bundle: str, device: str | dict = "auto") -> dict:
    """The pass-cost curves every worker decodes with (module docstring): the bundle's, measured with one thread."""
    engine = Engine.load(bundle, device=device, threads=1)
    return engine.measure_costs()


def run(bundle: str, records: Iterable[dict | Record | BadLine], settings: BatchSettings | None = None, *,
        workers: int = 1, threads: int | None = None, device: str | dict = "auto", ordered: bool = True,
        skip: frozenset[str] | set[str] = frozenset()) -> Iterator[dict]:
    """Generate every record, yielding its output line (in input order when `ordered`, else as each finishes).

    `records` are dicts like the JSONL input's lines (`id` and `prompt` or `messages`, optional settings); a record
    that cannot run yields an `error` line and the batch goes on; duplicate ids raise InputError before anything
    runs. `threads` (default: all cores) are split between the `workers` processes; `skip` holds output keys
    (Record.key) already done, for resuming."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    settings = settings or BatchSettings()
    items = [item for item in as_items(records) if item.key not in skip]
    per_worker = max(1, (threads or os.cpu_count() or 1) // workers)
    curves = shared_cost_curves(bundle, device) if any(isinstance(i, Record) for i in items) else {}
    if workers == 1:
        yield from _run_here(bundle, items, settings, per_worker, device, curves)
    else:
        yield from _run_in_processes(bundle, items, settings, workers, per_worker, device, curves, ordered)


def _run_here(bundle: str, items: list[Record | BadLine], settings: BatchSettings, threads: int,
              device: str | dict, curves: dict) -> Iterator[dict]:
    engine = None
    for item in items:
        if isinstance(item, BadLine):
            yield bad_line_output(item)
            continue
        if engine is None:
            engine = Engine.load(bundle, device=device, threads=threads)
            engine.cost_curves = curves
        yield _generate_or_stop(engine, item, settings)


def _run_in_processes(bundle: str, items: list[Record | BadLine], settings: BatchSettings, workers: int,
                      threads: int, device: str | dict, curves: dict, ordered: bool) -> Iterator[dict]:
    context = multiprocessing.get_context("spawn")  # no forked onnxruntime thread pools
    tasks, results = context.Queue(), context.Queue()
    ready: dict[int, dict] = {}
    for index, item in enumerate(items):
        if isinstance(item, BadLine):
            ready[index] = bad_line_output(item)
        else:
            tasks.put((index, item))
    running = len(items) - len(ready)
    procs = [context.Process(target=_worker, args=(bundle, settings, threads, device, curves, tasks, results),
                             daemon=True) for _ in range(min(workers, running))]
    for _ in procs:
        tasks.put(None)
    for p in procs:
        p.start()
    try:
        next_index = 0
        while True:
            if ordered:
                while next_index in ready:
                    yield ready.pop(next_index)
                    next_index += 1
            else:
                for index in list(ready):
                    yield ready.pop(index)
            if running == 0:
                return
            index, output = _next_result(results, procs)
            ready[index] = output
            running -= 1
    finally:
        for p in procs:
            p.kill()
            p.join()


def _next_result(results, procs: list) -> tuple[int, dict]:
    while True:
        try:
            index, output = results.get(timeout=POLL_SECONDS)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise WorkerError(f"a batch worker died (exit code {dead[0].exitcode}); the records already "
                                  "written are kept, and running the job again does the rest") from None
            continue
        if index < 0:
            raise WorkerError(output["error"])
        return index, output


def _worker(bundle: str, settings: BatchSettings, threads: int, device: str | dict, curves: dict,
            tasks, results) -> None:
    try:
        engine = Engine.load(bundle, device=device, threads=threads)
    except (BundleError, ValueError, OSError) as exc:
        results.put((-1, {"error": f"a batch worker could not load the bundle: {exc}"}))
        return
    engine.cost_curves = curves
    while (task := tasks.get()) is not None:
        index, record = task
        try:
            output = _generate_or_stop(engine, record, settings)
        except WorkerError as exc:
            results.put((-1, {"error": str(exc)}))
            return
        results.put((index, output))


def _generate_or_stop(engine: Engine, record: Record, settings: BatchSettings) -> dict:
    """The record's output line; a failure that is not the record's fault (generate_record) stops the job with a
    WorkerError naming the record, and what is written stays for a re-run."""
    try:
        return generate_record(engine, record, settings)
    except Exception as exc:
        raise WorkerError(f"a batch worker failed on the record on line {record.line}: "
                          f"{type(exc).__name__}: {exc}") from exc
