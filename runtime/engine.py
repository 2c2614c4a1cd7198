"""The embedded API: `Engine.load(bundle)`, `generate`, `stream`, and multi-turn chat sessions."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import BundleError, Manifest, load_manifest
from edgespec.runtime.decoding import DecodeContext, DecodeState, ModeError
from edgespec.runtime.ead import add_ar_ratio
from edgespec.runtime.machine import cpu_tag
from edgespec.runtime.model import ContextFullError, ModelRunner, SessionConfig
from edgespec.runtime.modes import DEFAULT_MODE, MODES, Mode, Request, get_mode, make_request, register_mode
from edgespec.runtime.text import BundleTokenizer, TextOut

__all__ = ["MODES", "ChatSession", "Engine", "GenerationResult", "ModeError", "PromptError", "register_mode"]

class PromptError(ValueError):
    """The prompt is empty or does not fit in the bundle's context."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens or context full)
    stats: dict = field(default_factory=dict)
    message: str = ""  # why generation ended early, when it is worth telling a user


class Engine:
    """A loaded bundle: tokenizer, target (and draft) runners with their KV buffers.

    One KV buffer per model, shared by every conversation: each runner records the token ids its buffer
    holds, and a generation keeps what it holds of its own text and re-prefills from the first token
    that differs. Conversations that alternate therefore give exactly what each would give alone; a
    switch costs the prefill of the text past the common prefix (for chat, past the template's opening).

    Thread safety: `lock` (a re-entrant lock) is held for each whole generation, so generations from
    several threads run one after another. A `stream` holds it from its first piece until it is
    exhausted or closed: close a stream you stop reading (or drop it; CPython closes it then).
    """

    def __init__(self, manifest: Manifest, tokenizer: BundleTokenizer, target: ModelRunner,
                 draft: ModelRunner | None, load_seconds: float):
        self.manifest = manifest
        self.tokenizer = tokenizer
        self.target = target
        self.draft = draft
        self.load_seconds = load_seconds
        self.ngram_model = _load_ngram(manifest)
        self.cost_curves: dict[str, dict[int, float]] = {}
        self.threads = 0  # set by load(); part of the cost-curve cache key
        self.spinning = False  # set by load(): the sessions keep their workers spinning between passes (a lone model)
        self.target_pass_size_invariant = all(g.pass_size_invariant for g in manifest.target.graphs.values())
        self.pass_check: dict | None = None  # this machine's verdict on that (runtime/selfcheck.py)
        self.lock = threading.RLock()  # held by each generation: the runners' buffers are shared
        measured = manifest.raw["models"].get("draft", {}).get("measured", {})
        self.draft_agreement: float | None = measured.get("agreement")  # seeds the drafted modes' sizing
        self.bundle_tau: float | None = manifest.raw.get("runtime", {}).get("ead", {}).get("tau")

    @classmethod
    def load(cls, bundle: str | Path, device: str | dict = "auto", threads: int | None = None,
             optimization: str = "all", verify: bool = True, strict: bool = False,
             cache_optimized: bool = True, load_draft: bool = True) -> Engine:
        """Open a bundle: verify its manifest and checksums, then create one session per model."""
        t0 = time.perf_counter()
        manifest = load_manifest(bundle, verify=verify)
        if load_draft and manifest.draft is not None and manifest.draft.vocab_size != manifest.target.vocab_size:
            raise BundleError(f"the bundle's draft has a {manifest.draft.vocab_size}-token vocabulary but its target "
                              f"{manifest.target.vocab_size}: speculation needs one shared tokenizer")
        config = SessionConfig(threads=threads, optimization=optimization, cache_optimized=cache_optimized,
                               stop_spinning=load_draft and manifest.draft is not None)
        from edgespec.runtime.placement import runners_for  # devices are optional at import time

        target, draft = runners_for(manifest, config, device, strict, load_draft)
        engine = cls(manifest, BundleTokenizer.from_manifest(manifest), target, draft, time.perf_counter() - t0)
        engine.threads = config.session_options().intra_op_num_threads
        engine.spinning = not config.stop_spinning
        return engine

    @property
    def max_context(self) -> int:
        return self.manifest.max_context

    def prompt_tokens(self, prompt: str | list[dict], chat: bool) -> list[int]:
        """Token ids of a prompt (wrapped in the chat template when `chat`) or of a list of chat messages."""
        if isinstance(prompt, list):
            if not prompt:
                raise PromptError("the conversation has no messages")
            return self.tokenizer.encode_chat(check_messages(prompt))
        check_text(prompt, "the prompt")
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, mode: str = DEFAULT_MODE,
                 chat: bool = False, **settings) -> GenerationResult:
        """Generate a completion; `prompt` may be a string or a list of chat messages.

        `settings` are the sampling parameters (temperature=0: greedy, top_k, top_p, repetition_penalty,
        seed, stop) and the mode's own settings (runtime/modes.py, e.g. `depth=4` for staged); any other
        name is an error that lists the valid ones.
        """
        request = make_request(mode, settings)
        return ChatSession(self).run(self.prompt_tokens(prompt, chat), max_new_tokens, request)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, mode: str = DEFAULT_MODE, chat: bool = False,
               **settings) -> Iterator[str]:
        """Yield text pieces as they are decoded; each piece is complete UTF-8 text. Holds the engine's lock
        from the first piece until the stream is exhausted or closed."""
        pieces: list[str] = []
        request = make_request(mode, settings)
        gen = ChatSession(self).iterate(self.prompt_tokens(prompt, chat), max_new_tokens, request, pieces.append)
        try:
            for _ in gen:
                yield from pieces
                pieces.clear()
            yield from pieces
        finally:  # an abandoned stream releases the engine's lock
            gen.close()

    def measure_costs(self) -> dict[str, dict[int, float]]:
        """Seconds of a pass per chunk length on this machine, per model, measured once and kept in the bundle cache.

        Adaptive draft sizes are computed from these cached curves and from acceptance counts only,
        never from live timings, so a seeded sampled generation repeats exactly. Measuring overwrites
        the models' KV, so it is done before a generation starts. A spinning session's passes cost
        less (SessionConfig), so spinning is part of the key.
        """
        from edgespec.runtime.costs import cached_cost_curves

        facts = self._cache_facts("target") + (("+",) + self._cache_facts("draft") if self.draft is not None else ())
        return cached_cost_curves(self.target, self.draft, self.manifest.root,
                                  facts + (("spinning",) if self.spinning else ()))

    def check_pass_sizes(self) -> dict:
        """This machine's verdict on whether the target computes a row alike in passes of every size
        (runtime/selfcheck.py): from the bundle cache, or checked now (seconds, once per bundle, CPU, provider,
        thread count and onnxruntime version). It sets the target's padding (every pass padded to two rows
        where one-row passes compute apart) and caps its passes at the largest size found safe, for every
        mode, so that `ar` and the speculative modes split the same work into passes that agree.
        """
        if self.pass_check is None:
            import onnxruntime

            from edgespec.runtime.selfcheck import MAX_ROWS, cached_pass_check

            facts = self._cache_facts("target") + (f"ort{onnxruntime.__version__}",)
            self.pass_check = cached_pass_check(self.target, self.manifest.root, facts)
            if self.target.fused:
                self.target.max_chunk = min(self.target.max_chunk, MAX_ROWS, max(1, self.pass_check["max_rows"]))
        return self.pass_check

    def _cache_facts(self, role: str) -> tuple[str, ...]:
        """What a measurement of this model on this machine depends on (runtime/cache.py): its graph, the
        provider, the thread count and the CPU."""
        runner = self.target if role == "target" else self.draft
        info = self.manifest.models[role]
        digest = self.manifest.files.get(next(iter(info.graphs.values())).file, "")[:12]
        return (role, digest, runner.load_info.get("provider", "cpu"), f"t{self.threads}", f"cpu{cpu_tag()}")

    def decode_context(self, mode: Mode) -> DecodeContext:
        """What `mode` reads besides its settings: measured pass costs (measured once, before a generation,
        since measuring overwrites the KV), the bundle's n-gram table, the draft's agreement, the EAD tau."""
        if mode.costed and not self.cost_curves:
            self.cost_curves = self.measure_costs()
        return DecodeContext(target_cost_curve=self.cost_curves.get("target"),
                             draft_cost_curve=self.cost_curves.get("draft"), ngram_model=self.ngram_model,
                             prior_alpha=self.draft_agreement if mode.drafted else None, bundle_tau=self.bundle_tau,
                             exact_passes=self.exact_passes)

    @property
    def exact_passes(self) -> bool:
        """Whether the target verifies several tokens per pass exactly as `ar` computes them one by one here:
        a speculation-ready target whose pass-size check found two-row passes safe (static graphs: every size)."""
        check = self.pass_check
        if not self.target_pass_size_invariant or check is None:
            return False
        return check["max_rows"] >= 2 if self.target.fused else not check["mismatched"]

    def chat(self) -> ChatSession:
        """A conversation that keeps its KV between turns and prefills only each new turn."""
        return ChatSession(self)


class ChatSession:
    """One conversation: its messages and committed tokens. The KV buffers are the engine's; a generation
    keeps what they hold of this conversation's text and feeds the rest (another conversation may have
    used them in between)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokens: list[int] = []
        self.messages: list[dict] = []
        self.last_result: GenerationResult | None = None

    def send(self, content: str, max_new_tokens: int = 256, mode: str = DEFAULT_MODE, **settings) -> GenerationResult:
        """Add a user turn, generate the assistant turn, and keep both in the history (`settings`: as for
        `Engine.generate`)."""
        check_text(content, "the message")
        request = make_request(mode, settings)
        messages = self.messages + [{"role": "user", "content": content}]
        tokens = self.engine.tokenizer.encode_chat(messages)
        result = self.run(tokens, max_new_tokens, request)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result

    def run(self, tokens: list[int], max_new_tokens: int, request: Request,
            on_text: Callable[[str], None] | None = None) -> GenerationResult:
        for _ in self.iterate(tokens, max_new_tokens, request, on_text):
            pass
        assert self.last_result is not None
        return self.last_result

    def iterate(self, tokens: list[int], max_new_tokens: int, request: Request,
                on_text: Callable[[str], None] | None = None,
                on_step: Callable[[list[int], int, dict], None] | None = None) -> Iterator[None]:
        """The decode loop: prefill and step the mode, commit its tokens, stop on EOS, a stop string, length
        or a full context; yields after each step (text so far to `on_text`), the result in `last_result`.
        `on_step` gets each step's whole chunk, how many of its tokens were committed and the mode's live stats
        (runtime/origins.py reads from them which model wrote each token).
        Holds the engine's lock until it ends or is closed."""
        engine = self.engine
        with engine.lock:
            mode = prepare(engine, request.mode, tokens, max_new_tokens)
            reused = _common_prefix(self.tokens, tokens)  # of this conversation's text (its KV may be gone)
            self.tokens = list(tokens)
            for runner in (engine.target, engine.draft):  # keep what a buffer holds of this text, free the rest
                if runner is not None:
                    runner.rollback(runner.common_prefix(self.tokens))
            state = DecodeState(engine.target, engine.draft, self.tokens, request.params,
                                np.random.default_rng(request.params.seed), request.settings,
                                engine.decode_context(mode), end=min(len(tokens) + max_new_tokens, engine.max_context))
            text, clock = TextOut(engine.tokenizer, request.params.stop, on_text), Clock(engine)
            new_ids: list[int] = []
            finish, message = "length", ""
            gen = mode.decode(state)
            try:
                while finish == "length" and not message and len(new_ids) < max_new_tokens:
                    try:
                        chunk = next(gen)
                    except ContextFullError:
                        message = _context_full(engine)
                        break
                    clock.stepped()
                    before = len(new_ids)
                    finish, message = self._commit(chunk, new_ids, max_new_tokens, text)
                    clock.committed(len(new_ids))
                    if on_step is not None:
                        on_step(chunk, len(new_ids) - before, state.stats)
                    if not message:
                        text.emit(final=finish == "stop")
                        yield None
                if finish == "length" and not message and len(self.tokens) >= engine.max_context:
                    message = _context_full(engine)
            finally:
                gen.close()
            stats = generation_stats(engine, mode, request.mode, state, clock, reused, len(new_ids))
            self.last_result = GenerationResult(text.finish(new_ids), new_ids, finish, stats, message)

    def _commit(self, chunk: list[int], new_ids: list[int], max_new_tokens: int, text: TextOut) -> tuple[str, str]:
        """Append a step's tokens up to EOS, a stop string, `max_new_tokens` or a full context; returns the
        finish reason so far and the message of a full context."""
        eos = self.engine.tokenizer.eos_token_ids
        for tok in chunk:
            if len(self.tokens) >= self.engine.max_context:  # every mode stops where `ar` must
                return "length", _context_full(self.engine)
            new_ids.append(tok)
            self.tokens.append(tok)
            if tok in eos or text.add(tok):
                return "stop", ""
            if len(new_ids) >= max_new_tokens:
                break
        return "length", ""


def check_text(text: object, what: str, empty: bool = False) -> None:
    """A prompt is a str (non-empty unless `empty`) that UTF-8 can encode. bytes are refused by name rather than
    reported empty; a str holding surrogates (the command line turns bytes that are not UTF-8 into them) is
    refused here instead of failing inside the tokenizer."""
    if not isinstance(text, str):
        hint = ": decode it first, e.g. text.decode('utf-8')" if isinstance(text, bytes | bytearray) else ""
        raise PromptError(f"{what} must be a str, got {type(text).__name__}{hint}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        found = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        raise PromptError(f"{what} is not valid UTF-8 text: character {exc.start} is {found}") from None
    if not empty and not text.strip():
        raise PromptError(f"{what} is empty")


def check_messages(messages: list) -> list[dict]:
    """Chat messages: dicts whose role and content are text (a template would fail on anything else)."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise PromptError(f"message {i} must be a dict with a str 'role' and 'content', got {message!r:.80}")
        check_text(message.get("content"), f"the content of message {i}", empty=True)
    return messages


def prepare(engine: Engine, name: str, tokens: list[int], max_new_tokens: int) -> Mode:
    """Check a generation against the bundle and this machine before anything runs; returns its mode."""
    mode = get_mode(name)
    if mode.lossless and not engine.target_pass_size_invariant:
        raise ModeError(f'mode="{name}" needs a target whose logits do not depend on pass size; this bundle '
                        'was exported with --ar-only (plain decoding only). Use mode="ar" or re-export '
                        'without --ar-only')
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not tokens:
        raise PromptError("the prompt encodes to no tokens")
    if len(tokens) >= engine.max_context:
        raise PromptError(f"the prompt has {len(tokens)} tokens but the bundle's context holds "
                          f"{engine.max_context} (prompt plus at least one new token)")
    if engine.target_pass_size_invariant:
        engine.check_pass_sizes()
        if mode.lossless and not engine.exact_passes:
            raise ModeError(_inexact(engine, name))
    return mode


def _inexact(engine: Engine, name: str) -> str:
    """Why a lossless mode cannot run on this machine, and what the user can do instead."""
    size = min(engine.pass_check["mismatched"])
    if engine.target.fused:
        why = f"onnxruntime computes the target's rows differently in a {size}-row pass than one row at a time"
        other = ""
    else:  # capping passes cannot help: one-row and k-row passes run through different fixed-shape graphs
        why = (f"this bundle's static-shape (NPU) target graphs compute a row differently in a {size}-row pass "
               "than in a one-row pass")
        other = ", or a bundle exported without --device npu (one fused graph, whose passes agree)"
    return (f'mode="{name}" cannot reproduce mode="ar" on this machine: {why} (checked once, kept in the '
            f'bundle\'s cache/). Use mode="ar", or mode="auto", which runs ar steps here{other}')


class Clock:
    """When a generation started and returned its first step, and the models' pass counts before it."""

    def __init__(self, engine: Engine):
        self.target_passes = engine.target.stats.passes
        self.draft_passes = engine.draft.stats.passes if engine.draft is not None else 0
        self.start = time.perf_counter()
        self.first: float | None = None
        self.first_tokens: int | None = None  # tokens the first step committed: a speculative one may commit several

    def stepped(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def committed(self, tokens: int) -> None:
        if self.first_tokens is None:
            self.first_tokens = tokens


def generation_stats(engine: Engine, mode: Mode, name: str, state: DecodeState, clock: Clock, reused: int,
                     n: int) -> dict:
    """The result's `stats`: the mode's own, then timings, pass counts and memory of this generation."""
    elapsed = time.perf_counter() - clock.start
    ttft = clock.first - clock.start if clock.first else None
    decode_time = elapsed - (ttft or 0.0)
    first = clock.first_tokens
    stats = dict(state.stats)
    stats.update({
        "mode": name, "prompt_tokens": len(state.tokens) - n,
        "reused_tokens": reused, "prefill_tokens": state.prefilled, "new_tokens": n, "seconds": elapsed,
        "time_to_first_token": ttft, "first_chunk_tokens": first,
        "tokens_per_second": n / elapsed if elapsed > 0 else 0.0,
        "decode_tokens_per_second": ((n - first) / decode_time
                                     if first is not None and n > first and decode_time > 0 else None),
        "target_passes": engine.target.stats.passes - clock.target_passes,
        "draft_passes": (engine.draft.stats.passes - clock.draft_passes) if engine.draft is not None else 0,
        "kv_buffer_bytes": engine.target.kv_bytes + (engine.draft.kv_bytes if engine.draft else 0),
        "peak_rss_bytes": _peak_rss(),
    })
    add_ar_ratio(stats, decode_time if n > 1 else None, n - 1, engine.cost_curves.get("target"))
    return stats


def _context_full(engine: Engine) -> str:
    return f"context full: the bundle holds {engine.max_context} tokens"


def _load_ngram(manifest: Manifest):
    """The bundle's trigram table (built at export with --ngram-tokens), if it has one."""
    entry = manifest.raw.get("ngram")
    if not entry:
        return None
    from edgespec.runtime.ngram import NgramModel

    try:
        return NgramModel.load(manifest.path(entry["file"]))
    except ValueError as exc:  # the table's own error (not a table, truncated, inconsistent) names the file
        raise BundleError(f"cannot read the n-gram table: {exc}") from exc


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _peak_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM, because getrusage's ru_maxrss survives exec and a process started by a bigger one would
    report that one's peak; elsewhere ru_maxrss (bytes on macOS, KiB on other Unixes); 0 on Windows.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
