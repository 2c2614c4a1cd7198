"""Batch output: JSON lines appended one record at a time, and read back to resume a job.

Each line is written with one `write` of the whole line, flushed and fsynced before the next record starts, so
after a crash, `kill -9` or a power cut the file holds whole records plus at most one torn last line (a write the
kernel took only part of). Opening the file for a job cuts a torn tail back to the last newline and reads the keys
of the records already there, which the job then skips: nothing is written twice or lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgespec.apps.batch.records import output_key


class OutputError(ValueError):
    """The output file exists but is not a batch job's output (it is not ours to cut or append to)."""


class OutputFile:
    """An output JSONL file opened for appending; `done` holds the keys of the records it already has."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.repaired_bytes = 0  # bytes of a torn last line cut off on opening
        self.done: set[str] = set()
        if self.path.exists():
            self.repaired_bytes = _cut_torn_tail(self.path)
            self.done = _written_keys(self.path)
        self.file = open(self.path, "ab")

    def append(self, result: dict) -> None:
        """Write one record's line and make it durable before returning."""
        self.file.write(json.dumps(result, ensure_ascii=False).encode() + b"\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done.add(output_key(result.get("id"), result["line"]))

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> int:
    """Truncate bytes after the last newline (a line the writer was killed in the middle of); returns how many."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def _written_keys(path: Path) -> set[str]:
    keys = set()
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                obj = json.loads(raw)
                keys.add(output_key(obj.get("id"), obj["line"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise OutputError(f"{path} line {n} is not a batch output record; give another output path "
                                  "(a job appends to its own output only)") from None
    return keys
