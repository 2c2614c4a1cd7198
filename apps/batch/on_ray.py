"""The same batch job on a Ray cluster: Ray Data maps the records over an actor pool, one engine per actor.

The driver reads the input (a local path or any URI pyarrow's filesystems open, as Ray Data's readers do), checks
it and drops the records the output already holds, exactly as a local job does; the actors generate; the driver
appends each output line as it streams back, flushed and fsynced. So the output file, and with it resuming, is the
driver's, on the driver's machine: a job whose driver or cluster died is resumed by running the same command
again. Every actor needs the bundle at the same path (a shared or copied directory).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict

from edgespec.apps.batch.generate import BatchSettings, bad_line_output, generate_record
from edgespec.apps.batch.jobs import shared_cost_curves
from edgespec.apps.batch.records import BadLine, Record


def read_lines(path: str) -> list[str]:
    """The input's lines, from a local path or a URI (s3://, gs://, hdfs://, file://) through pyarrow."""
    if "://" not in path:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()
    import pyarrow.fs

    filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
    with filesystem.open_input_stream(inner) as f:
        return f.read().decode("utf-8").splitlines()


class EngineActor:
    """A Ray Data actor: loads the bundle once, then generates the records of each batch it is given."""

    def __init__(self, bundle: str, settings: BatchSettings, threads: int, device: str, curves: dict):
        from edgespec.runtime.engine import Engine

        self.engine = Engine.load(bundle, device=device, threads=threads)
        self.engine.cost_curves = curves
        self.settings = settings

    def __call__(self, batch: dict) -> dict:
        outputs = [generate_record(self.engine, Record(**json.loads(text)), self.settings)
                   for text in batch["record"]]
        return {"output": [json.dumps(o, ensure_ascii=False) for o in outputs]}


def run_on_ray(bundle: str, items: list[Record | BadLine], settings: BatchSettings, *, address: str | None,
               workers: int, threads: int, device: str = "auto") -> Iterator[dict]:
    """Output lines of `items` as the actors finish them (bad lines first); `address` None starts a local Ray
    instance for the job (and stops it after), else joins that cluster ("auto": the one this machine belongs to)."""
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")  # read when ray.data is imported: the job reports progress
    import ray

    yield from (bad_line_output(item) for item in items if isinstance(item, BadLine))
    records = [item for item in items if isinstance(item, Record)]
    if not records:
        return
    curves = shared_cost_curves(bundle, device)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.from_items([{"record": json.dumps(asdict(r))} for r in records])
        with warnings.catch_warnings():  # Ray's own way to set max_restarts, which warns that it will change
            warnings.simplefilter("ignore", DeprecationWarning)
            outputs = dataset.map_batches(
                EngineActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads,
                max_restarts=0,  # a failed actor fails the job, which a re-run resumes
                fn_constructor_kwargs={"bundle": str(bundle), "settings": settings, "threads": threads,
                                       "device": device, "curves": curves})
        for row in outputs.iter_rows():
            yield json.loads(row["output"])
    finally:
        if started:
            ray.shutdown()
