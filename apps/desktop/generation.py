"""Generations for the server and the terminal chat: one worker thread runs them one after another.

The engine holds its lock for each whole generation (its models' KV buffers are shared), so generations cannot
overlap; a single thread taking jobs from a bounded queue makes that order explicit, keeps decoding off the
server's event loop, and gives the server a queue length to refuse work by (429). Events reach the caller's
thread through the job's `sink`; cancelling a job closes the engine's generator at the next step, which stops
decoding and releases the lock.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgespec.runtime.engine import ChatSession, Engine
from edgespec.runtime.modes import Request
from edgespec.runtime.origins import OriginTracker


@dataclass
class Piece:
    """Newly decoded text, split into its tokens' texts with their origins (runtime/origins.py)."""

    text: str
    tokens: list[tuple[str, str | None]]
    stats: dict


@dataclass
class Finished:
    """The end of a generation; `finish_reason` is "stop", "length" or "cancelled"."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: dict = field(default_factory=dict)
    message: str = ""


@dataclass
class Failed:
    """The engine refused the job (a mode this bundle cannot run, a prompt too long) or failed running it."""

    error: Exception


Event = Piece | Finished | Failed


class Job:
    """One generation: prompt tokens, length limit, the mode with its settings, and where its events go."""

    def __init__(self, tokens: list[int], max_new_tokens: int, request: Request, sink: Callable[[Event], None]):
        self.tokens, self.max_new_tokens, self.request, self.sink = tokens, max_new_tokens, request, sink
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next step (or skip the job if it has not started); safe from any thread, and once done."""
        self.cancelled.set()


class OriginText:
    """Splits streamed text along the tokens that wrote it.

    The engine streams text pieces that end where no stop string can still cut them, so a piece may hold part of
    a token's text or several tokens'. Each committed token's text (decoded one token at a time, as the engine
    does) waits here until pieces cover it; text no token accounts for would get origin None."""

    def __init__(self) -> None:
        self.pending: deque[list] = deque()

    def add(self, text: str, origin: str | None) -> None:
        if text:
            self.pending.append([text, origin])

    def take(self, text: str) -> list[tuple[str, str | None]]:
        out: list[tuple[str, str | None]] = []
        while text:
            if not self.pending:
                out.append((text, None))
                break
            segment, origin = self.pending[0]
            if len(segment) <= len(text):
                out.append((segment, origin))
                self.pending.popleft()
                text = text[len(segment):]
            else:
                out.append((text, origin))
                self.pending[0][0] = segment[len(text):]
                text = ""
        return out


class LiveStats:
    """What the chat page shows while a generation runs: tokens/s, acceptance, tokens per target pass.

    Tokens per target pass counts from the end of the first step, so the prompt's prefill passes do not dilute it
    (ar: 1.0; a speculative mode: its mean accepted length plus one)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.start = time.perf_counter()
        self.tokens = 0
        self.passes = 0
        self.first: tuple[int, int] | None = None  # tokens and target passes after the first step
        self.acceptance: float | None = None
        self.origins: Counter[str] = Counter()

    def step(self, origins: list[str | None], stats: dict) -> None:
        self.tokens += len(origins)
        self.origins.update(o or "unknown" for o in origins)
        self.passes = self.engine.target.stats.passes
        if self.first is None:
            self.first = (self.tokens, self.passes)
        speculative = stats.get("speculative", {})
        if speculative.get("drafted"):
            self.acceptance = speculative["acceptance_rate"]

    def snapshot(self) -> dict:
        seconds = time.perf_counter() - self.start
        per_pass = None
        if self.first is not None and self.passes > self.first[1]:
            per_pass = (self.tokens - self.first[0]) / (self.passes - self.first[1])
        return {"completion_tokens": self.tokens, "seconds": seconds,
                "tokens_per_second": self.tokens / seconds if seconds > 0 else 0.0,
                "acceptance_rate": self.acceptance, "tokens_per_target_pass": per_pass, "origins": dict(self.origins)}


class EngineWorker:
    """The thread that runs every generation of one engine, from a queue of at most `max_waiting` jobs."""

    def __init__(self, engine: Engine, max_waiting: int = 8):
        if max_waiting < 1:
            raise ValueError(f"at least one request must be able to wait, got max_waiting={max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.running: Job | None = None
        # Jobs taken and not yet finished (queued or running), counted under a lock: the queue's own size would
        # count a job the idle worker is about to take as waiting, and refuse a request that only has to wait
        # behind it.
        self._admitted = 0
        self._lock = threading.Lock()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.seconds = 0.0  # summed over finished generations: the mean sets Retry-After
        self._thread = threading.Thread(target=self._loop, name="edgespec-generation", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; raises queue.Full when `max_waiting` jobs would wait behind the running one."""
        with self._lock:
            if self._admitted > self.max_waiting:
                raise queue.Full
            self._admitted += 1
        self.jobs.put_nowait(job)

    @property
    def waiting(self) -> int:
        """Jobs taken that wait for the running one (or for the worker to pick them up)."""
        return max(0, self._admitted - 1)

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: the mean generation time per job ahead."""
        done = sum(self.counts.values())
        mean = self.seconds / done if done else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1)))

    def close(self, timeout: float = 10.0) -> None:
        """Cancel the running and waiting jobs and stop the thread."""
        if self.running is not None:
            self.running.cancel()
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                _emit(job, Finished("", "cancelled", len(job.tokens), 0))
        self.jobs.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.running = job
            t0 = time.perf_counter()
            try:
                outcome = self._run(job)
            except Exception as exc:  # noqa: BLE001 - any failure is the job's, the thread serves the next one
                outcome = "failed"
                _emit(job, Failed(exc))
            finally:
                self.running = None
                with self._lock:
                    self._admitted -= 1
            self.counts[outcome] += 1
            self.seconds += time.perf_counter() - t0

    def _run(self, job: Job) -> str:
        if job.cancelled.is_set():
            _emit(job, Finished("", "cancelled", len(job.tokens), 0))
            return "cancelled"
        engine = self.engine
        tracker = OriginTracker(job.request.mode, job.request.settings, engine.draft is not None)
        decoder, tokenizer = engine.tokenizer.stream(), engine.tokenizer.tokenizer
        split, live = OriginText(), LiveStats(engine)
        pieces: list[str] = []
        sent: list[str] = []

        def on_step(chunk: list[int], committed: int, stats: dict) -> None:
            origins = tracker(chunk, stats)[:committed]
            for token, origin in zip(chunk, origins, strict=False):
                split.add(decoder.step(tokenizer, token) or "", origin)
            live.step(origins, stats)

        def flush() -> None:
            text = "".join(pieces)
            pieces.clear()
            if text:
                sent.append(text)
                _emit(job, Piece(text, split.take(text), live.snapshot()))

        session = ChatSession(engine)
        gen = session.iterate(job.tokens, job.max_new_tokens, job.request, pieces.append, on_step)
        stopped = False
        try:
            for _ in gen:
                flush()
                if job.cancelled.is_set():
                    stopped = True
                    break
        finally:
            gen.close()
        flush()
        if stopped or session.last_result is None:
            stats = {"mode": job.request.mode, **live.snapshot()}
            _emit(job, Finished("".join(sent), "cancelled", len(job.tokens), live.tokens, stats))
            return "cancelled"
        result = session.last_result
        stats = live.snapshot()
        stats.update({key: result.stats.get(key) for key in (
            "mode", "time_to_first_token", "decode_tokens_per_second", "prefill_tokens", "reused_tokens",
            "target_passes", "draft_passes")})
        stats["tokens_per_second"] = result.stats["tokens_per_second"]
        stats["acceptance_rate"] = _acceptance(result.stats)
        _emit(job, Finished(result.text, result.finish_reason, len(job.tokens), len(result.token_ids), stats,
                            result.message))
        return "completed"


def _acceptance(stats: dict) -> float | None:
    """Accepted over proposed tokens of a whole generation. `staged` (and `auto`, which steps like it) counts the
    n-gram proposals it verified directly apart from the draft's paths, and adds them to its stats only at the end,
    so the live figure covers the paths alone."""
    parts = [stats.get("speculative", {}), stats.get("staged", {}).get("ngram_direct", {})]
    proposed = sum(part.get("drafted", 0) for part in parts)
    return sum(part.get("accepted", 0) for part in parts) / proposed if proposed else None


def _emit(job: Job, event: Event) -> None:
    """Hand an event to the job's sink; a sink that fails (its reader is gone) cancels the job."""
    try:
        job.sink(event)
    except Exception:  # noqa: BLE001 - e.g. the server's event loop has closed
        job.cancel()
