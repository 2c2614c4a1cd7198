"""Batch input: one JSON object per line, read and checked before any generation starts.

A line that is not a JSON object, or whose fields are wrong, becomes a `BadLine` (the job writes an `error` for it
and goes on); duplicate ids refuse the whole input up front, since resuming skips ids already written and two
records with one id would make that ambiguous.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

RECORD_SETTINGS = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "mode",
                   "settings", "chat")
FIELDS = ("id", "prompt", "messages", *RECORD_SETTINGS)


class InputError(ValueError):
    """The input as a whole cannot run (duplicate ids, an unreadable file); one line says why."""


@dataclass(frozen=True)
class Record:
    """One generation asked for: `prompt` (text) or `messages` (OpenAI chat format), and its own settings."""

    id: str | int
    line: int  # 1-based line of the input, for messages
    prompt: str | None = None
    messages: list[dict] | None = None
    settings: dict = field(default_factory=dict)  # the RECORD_SETTINGS the record gave

    @property
    def key(self) -> str:
        return output_key(self.id, self.line)


@dataclass(frozen=True)
class BadLine:
    """A line the job cannot run; its output line carries the id when the line had a usable one."""

    line: int
    error: str
    id: str | int | None = None

    @property
    def key(self) -> str:
        return output_key(self.id, self.line)


def output_key(record_id: str | int | None, line: int) -> str:
    """What a resumed job matches written output by: the id, or the line number of a line without a usable id."""
    return f"id:{json.dumps(record_id)}" if record_id is not None else f"line:{line}"


def parse_line(text: str, line: int) -> Record | BadLine:
    """One input line as a record, or why it cannot be one (the types are strict: a string is not a number)."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        return BadLine(line, f"line {line} is not JSON: {exc}")
    return parse_object(obj, line)


def parse_object(obj: object, line: int) -> Record | BadLine:
    """A decoded input object as a record (the Python API passes dicts here directly)."""
    if not isinstance(obj, dict):
        return BadLine(line, f"line {line} is a JSON {type(obj).__name__}, not an object")
    record_id = obj.get("id")
    if isinstance(record_id, bool) or not isinstance(record_id, str | int):
        return BadLine(line, f"line {line}: 'id' must be a string or an integer, got {record_id!r:.60}")
    problem = _problem(obj)
    if problem:
        return BadLine(line, f"line {line}: {problem}", record_id)
    return Record(record_id, line, obj.get("prompt"), obj.get("messages"),
                  {k: obj[k] for k in RECORD_SETTINGS if k in obj})


def _problem(obj: dict) -> str:
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        names = ", ".join(map(repr, unknown))
        return f"unknown field{'s' if len(unknown) > 1 else ''} {names}; fields: {', '.join(FIELDS)}"
    if ("prompt" in obj) == ("messages" in obj):
        return "give either 'prompt' (text) or 'messages' (a list of chat messages), not both or neither"
    if "prompt" in obj and not isinstance(obj["prompt"], str):
        return f"'prompt' must be a string, got {type(obj['prompt']).__name__}"
    if "messages" in obj and not (isinstance(obj["messages"], list) and obj["messages"]):
        return "'messages' must be a non-empty list of {'role': ..., 'content': ...} objects"
    max_tokens = obj.get("max_tokens", 1)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        return f"'max_tokens' must be an integer >= 1, got {max_tokens!r:.60}"
    stop = obj.get("stop", [])
    if not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        return "'stop' must be a string or a list of strings"
    if not isinstance(obj.get("mode", ""), str):
        return "'mode' must be a string"
    if not isinstance(obj.get("settings", {}), dict):
        return "'settings' must be an object of the mode's settings"
    if not isinstance(obj.get("chat", False), bool):
        return "'chat' must be true or false"
    return ""


def read_records(lines: Iterable[str]) -> list[Record | BadLine]:
    """Every non-blank line of the input as a record or a bad line; raises InputError on duplicate ids,
    naming each duplicated id with its line numbers."""
    return check_unique([parse_line(text, n) for n, text in enumerate(lines, 1) if text.strip()])


def check_unique(items: list[Record | BadLine]) -> list[Record | BadLine]:
    """The items, unless two share an id (InputError naming each duplicated id with its line numbers)."""
    seen: dict[str, list[int]] = {}
    for item in items:
        if item.id is not None:
            seen.setdefault(item.key, []).append(item.line)
    duplicates = {key: lines for key, lines in seen.items() if len(lines) > 1}
    if duplicates:
        shown = "; ".join(f"{key[3:]} on lines {', '.join(map(str, lines))}" for key, lines in
                          list(duplicates.items())[:5])
        more = f" (and {len(duplicates) - 5} more)" if len(duplicates) > 5 else ""
        raise InputError(f"the input has duplicate ids, so a resumed job could not tell them apart: {shown}{more}")
    return items


def record_seed(base_seed: int, record_id: str | int) -> int:
    """The seed of a record that gives none: a hash of the job's seed and the id, so a record samples the same
    text whichever worker runs it and in whatever order."""
    digest = hashlib.sha256(f"{base_seed}\0{json.dumps(record_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
