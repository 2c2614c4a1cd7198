"""A bundle's `cache/`: what this machine measured or compiled for the bundle, kept between runs.

Three kinds of entry live there: optimized graphs (onnxruntime's own optimization of a bundle graph), pass-cost
curves (runtime/costs.py) and the pass-size check's verdict (runtime/selfcheck.py). They share one scheme:

- **Named by what they depend on.** A `CacheKey` is the entry's kind and the facts its content depends on, each
  tagged (`target`, `d<graph checksum>`, `cpu`, `t2`, `cpu<CPU tag>`, `ort<version>`, ...), and the file name is the
  kind followed by the facts, so a changed fact (another CPU, thread count, onnxruntime, a re-export) names another
  file and nothing stale is ever read; the names stay readable in a directory listing.
- **Checked before use.** The cache is not covered by the manifest's checksums (it is written after export, on the
  machine that runs the bundle), so every entry carries its own: a JSON entry holds the sha256 of its data beside
  the data, a graph has a `.sha256` file beside it holding the digests of the graph and of its weights file. An
  entry that is truncated, altered or half-written is dropped and made again, never trusted.
- **Written atomically**, to a temporary name renamed into place; a graph's digest file is written last, so a graph
  without one was never finished. A read-only bundle is not written to: it measures again next time. A writer
  killed mid-write leaves only its temporary file (named after its process id), which the next writer in that
  folder removes (`remove_dead_temporaries`).

Devices (devices/placement.py) keep compiled EP-context and provider blob caches in `cache/<provider>/`, named by
the providers' own rules; those are the providers' formats, outside this scheme.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_DIR = "cache"  # inside the bundle


@dataclass(frozen=True)
class CacheKey:
    """An entry's kind and the facts its content depends on, in a fixed order."""

    kind: str
    facts: tuple[str, ...]

    def filename(self, suffix: str) -> str:
        return f"{self.kind}.{'-'.join(self.facts)}{suffix}"


def entry_path(root: Path, key: CacheKey, suffix: str) -> Path:
    return Path(root) / CACHE_DIR / key.filename(suffix)


def _digest(data: Any) -> str:
    """The checksum of `data` as JSON reads it back (integer keys become strings, which sort differently)."""
    normal = json.loads(json.dumps(data))
    return hashlib.sha256(json.dumps(normal, sort_keys=True).encode()).hexdigest()


def read_json(root: Path, key: CacheKey, valid: Callable[[Any], bool] = lambda _: True) -> Any | None:
    """The entry's data, or None when it is absent, unreadable, fails its checksum or `valid`; a bad entry is
    removed so that it is made again."""
    path = entry_path(root, key, ".json")
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        if isinstance(entry, dict) and entry.get("sha256") == _digest(entry.get("data")) and valid(entry["data"]):
            return entry["data"]
    except (ValueError, UnicodeDecodeError, OSError):  # JSONDecodeError is a ValueError
        pass
    path.unlink(missing_ok=True)
    return None


def write_json(root: Path, key: CacheKey, data: Any) -> None:
    """Store `data` (JSON) with its checksum, atomically; nothing is written into a read-only bundle."""
    path = entry_path(root, key, ".json")
    if not _writable(path):
        return
    _replace(path, json.dumps({"sha256": _digest(data), "data": data}).encode())


def verified_graph(root: Path, key: CacheKey) -> Path | None:
    """The optimized graph of `key` when it and its weights file match the digests written after them; else None
    (and a graph that does not match is removed)."""
    path = entry_path(root, key, ".onnx")
    sums = path.with_name(path.name + ".sha256")
    if not path.is_file():
        return None
    try:
        if sums.read_text().split() == _file_digests(path):
            return path
    except OSError:
        pass
    for stale in (path, sums, _weights_file(path)):
        stale.unlink(missing_ok=True)
    return None


def graph_target(root: Path, key: CacheKey) -> Path | None:
    """Where to write the optimized graph of `key`, or None in a read-only bundle."""
    path = entry_path(root, key, ".onnx")
    return path if _writable(path) else None


def weights_name(graph: Path) -> str:
    """The name of the file an optimized graph's initializers go to, beside it."""
    return graph.name + ".data"


def seal_graph(path: Path) -> None:
    """Record the digests of a just-written optimized graph and its weights, making the entry valid."""
    _replace(path.with_name(path.name + ".sha256"), " ".join(_file_digests(path)).encode())


def _weights_file(graph: Path) -> Path:
    return graph.with_name(weights_name(graph))


def _file_digests(graph: Path) -> list[str]:
    digests = []
    for path in (graph, _weights_file(graph)):
        h = hashlib.sha256()
        if path.is_file():
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        digests.append(h.hexdigest())
    return digests


def _writable(path: Path) -> bool:
    return os.access(path.parent.parent, os.W_OK)


def temporary_name(path: Path, suffix: str = "") -> Path:
    """Where a writer in this process stages `path`: the process id in the name tells a killed writer's leftovers
    from a running one's."""
    return path.with_name(f"{path.stem if suffix else path.name}.tmp{os.getpid()}{suffix}")


_TEMPORARY = re.compile(r"\.tmp(\d+)(\.[A-Za-z]+)?$")


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of writers that no longer run (killed mid-write), so that repeated kills cannot
    fill the disk with half-written optimized graphs; returns what was removed."""
    removed = []
    for path in Path(folder).glob("*.tmp*"):
        match = _TEMPORARY.search(path.name)
        if match and int(match.group(1)) != os.getpid() and not _running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _replace(path: Path, content: bytes) -> None:
    path.parent.mkdir(exist_ok=True)
    remove_dead_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:  # a failed write (disk full) leaves neither a half file nor a stray temporary one
        tmp.unlink(missing_ok=True)
