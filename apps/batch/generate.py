"""One batch record through an engine: its settings merged over the job's, its seed, its output line."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgespec.apps.batch.records import BadLine, Record, record_seed
from edgespec.runtime.bundle import BundleError
from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import DEFAULT_MODE, make_request


@dataclass(frozen=True)
class BatchSettings:
    """The job's settings; each record may override any of them but `base_seed` (and `settings` as a whole)."""

    mode: str = DEFAULT_MODE
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    chat: bool = False  # wrap `prompt` records in the chat template (`messages` records always are)
    settings: dict = field(default_factory=dict)  # the mode's own settings, e.g. {"depth": 4}
    base_seed: int = 0  # a record without a `seed` samples with record_seed(base_seed, id)


def bad_line_output(item: BadLine) -> dict:
    return {"id": item.id, "line": item.line, "error": item.error}


def generate_record(engine: Engine, record: Record, job: BatchSettings) -> dict:
    """The record's output line: text, token ids, finish reason, usage and stats, or an `error` when the record
    cannot run (a prompt too long for the context, a mode or setting this bundle refuses). Other exceptions are
    not the record's fault and propagate, so the job stops and a re-run retries the record."""
    given = record.settings
    mode = given.get("mode", job.mode)
    stop = given.get("stop", job.stop)
    sampling = {
        "temperature": given.get("temperature", job.temperature), "top_p": given.get("top_p", job.top_p),
        "top_k": given.get("top_k", job.top_k),
        "repetition_penalty": given.get("repetition_penalty", job.repetition_penalty),
        "seed": given.get("seed", record_seed(job.base_seed, record.id)),
        "stop": (stop,) if isinstance(stop, str) else tuple(stop)}
    try:
        request = make_request(mode, {**given.get("settings", job.settings), **sampling})
        chat = given.get("chat", job.chat)
        tokens = engine.prompt_tokens(record.messages if record.messages is not None else record.prompt, chat)
        result = engine.chat().run(tokens, given.get("max_tokens", job.max_tokens), request)
    except (ValueError, BundleError) as exc:
        return {"id": record.id, "line": record.line, "error": str(exc)}
    return {"id": record.id, "line": record.line, "text": result.text, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "message": result.message,
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(result.token_ids),
                      "total_tokens": len(tokens) + len(result.token_ids)},
            "stats": result.stats}
