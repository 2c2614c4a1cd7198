"""The embedded API: `Engine.load(bundle)`, `generate`, `stream`, and multi-turn chat sessions."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgespec.runtime.bundle import BundleError, Manifest, load_manifest
from edgespec.runtime.decoding import DecodeState, decode_ar
from edgespec.runtime.machine import cpu_tag
from edgespec.runtime.model import ContextFullError, ModelRunner, SessionConfig
from edgespec.runtime.sampling import SamplingParams
from edgespec.runtime.text import BundleTokenizer

log = logging.getLogger("edgespec.runtime")

MODES: dict[str, Callable] = {"ar": decode_ar}


def _register_builtin_modes() -> None:
    from edgespec.runtime.ead import decode_ead, decode_ead_spec
    from edgespec.runtime.speculative import decode_spec
    from edgespec.runtime.staged import decode_ngram, decode_staged

    MODES.update({"spec": decode_spec, "staged": decode_staged, "ngram": decode_ngram, "ead": decode_ead,
                  "ead-spec": decode_ead_spec})


SPECULATIVE_MODES = ("spec", "staged", "ngram", "ead-spec")
DRAFTED_MODES = ("spec", "staged", "ead-spec")  # modes whose proposals come from the draft model
COSTED_MODES = SPECULATIVE_MODES + ("ead",)  # modes that read the measured pass costs (`ead`: its ratio to `ar`)


class PromptError(ValueError):
    """The prompt is empty or does not fit in the bundle's context."""


class ModeError(ValueError):
    """The decoding mode is unknown or needs a model this bundle does not have."""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens or context full)
    stats: dict = field(default_factory=dict)
    message: str = ""  # why generation ended early, when it is worth telling a user


def register_mode(name: str, fn: Callable) -> None:
    """Modes (spec, staged, ngram, ead, ...) register their generator here."""
    MODES[name] = fn


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
        if isinstance(prompt, list):
            if not prompt:
                raise PromptError("the conversation has no messages")
            return self.tokenizer.encode(self.tokenizer.render_chat(prompt))
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty")
        if chat:
            return self.tokenizer.encode(self.tokenizer.render_chat([{"role": "user", "content": prompt}]))
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[dict], max_new_tokens: int = 256, mode: str = "ar", chat: bool = False,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop: list[str] | tuple[str, ...] = (), **mode_options) -> GenerationResult:
        """Generate a completion; `prompt` may be a string or a list of chat messages."""
        session = ChatSession(self)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))
        tokens = self.prompt_tokens(prompt, chat)
        return session.run(tokens, max_new_tokens, mode, params, mode_options)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 256, mode: str = "ar", chat: bool = False,
               **kwargs) -> Iterator[str]:
        """Yield text pieces as they are decoded; each piece is complete UTF-8 text."""
        pieces: list[str] = []
        params = _sampling_params(kwargs)
        session = ChatSession(self)
        gen = session.iterate(self.prompt_tokens(prompt, chat), max_new_tokens, mode, params,
                              {**kwargs, "on_text": pieces.append})
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
        from edgespec.runtime.bundle import CACHE_DIR
        from edgespec.runtime.costs import cached_cost_curves

        key = self._cache_key("target") + (f"+{self._cache_key('draft')}" if self.draft is not None else "")
        return cached_cost_curves(self.target, self.draft, self.manifest.root / CACHE_DIR,
                                  key + ("-spinning" if self.spinning else ""))

    def check_pass_sizes(self) -> dict:
        """This machine's verdict on whether the target computes a row alike in passes of every size
        (runtime/selfcheck.py): from the bundle cache, or checked now (seconds, once per bundle, CPU, provider,
        thread count and onnxruntime version). It sets the target's padding (every pass padded to two rows
        where one-row passes compute apart) and caps its passes at the largest size found safe, for every
        mode, so that `ar` and the speculative modes split the same work into passes that agree.
        """
        if self.pass_check is None:
            import onnxruntime

            from edgespec.runtime.bundle import CACHE_DIR
            from edgespec.runtime.selfcheck import MAX_ROWS, cached_pass_check

            key = f"{self._cache_key('target')}-ort{onnxruntime.__version__}"
            self.pass_check = cached_pass_check(self.target, self.manifest.root / CACHE_DIR, key)
            if self.target.fused:
                self.target.max_chunk = min(self.target.max_chunk, MAX_ROWS, max(1, self.pass_check["max_rows"]))
            elif self.pass_check["mismatched"]:
                log.warning("this bundle's static target graphs compute a row apart in %d-row and one-row passes "
                            "on this machine: speculative modes match mode='ar' only up to rounding at near-ties",
                            min(self.pass_check["mismatched"]))
        return self.pass_check

    def _cache_key(self, role: str) -> str:
        runner = self.target if role == "target" else self.draft
        info = self.manifest.models[role]
        digest = self.manifest.files.get(next(iter(info.graphs.values())).file, "")[:12]
        return f"{role}-{digest}-{runner.load_info.get('provider', 'cpu')}-t{self.threads}-cpu{cpu_tag()}"

    def chat(self) -> ChatSession:
        """A conversation that keeps its KV between turns and prefills only each new turn."""
        return ChatSession(self)


class ChatSession:
    """Committed tokens plus the models' KV; each turn feeds only what the models have not seen."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokens: list[int] = []
        self.messages: list[dict] = []
        self.last_result: GenerationResult | None = None

    def send(self, content: str, max_new_tokens: int = 256, mode: str = "ar", **kwargs) -> GenerationResult:
        """Add a user turn, generate the assistant turn, and keep both in the history."""
        if not content.strip():
            raise PromptError("the message is empty")
        params = _sampling_params(kwargs)
        messages = self.messages + [{"role": "user", "content": content}]
        tokens = self.engine.tokenizer.encode(self.engine.tokenizer.render_chat(messages))
        result = self.run(tokens, max_new_tokens, mode, params, kwargs)
        self.messages = messages + [{"role": "assistant", "content": result.text}]
        return result

    def run(self, tokens: list[int], max_new_tokens: int, mode: str, params: SamplingParams,
            options: dict) -> GenerationResult:
        for _ in self.iterate(tokens, max_new_tokens, mode, params, options):
            pass
        assert self.last_result is not None
        return self.last_result

    def iterate(self, tokens: list[int], max_new_tokens: int, mode: str, params: SamplingParams,
                options: dict) -> Iterator[None]:
        """`_iterate` holding the engine's lock (released when the generator ends or is closed)."""
        with self.engine.lock:
            yield from self._iterate(tokens, max_new_tokens, mode, params, options)

    def _iterate(self, tokens: list[int], max_new_tokens: int, mode: str, params: SamplingParams,
                 options: dict) -> Iterator[None]:
        """The decode loop: run the mode, commit its tokens, stop on EOS / stop string / length."""
        engine = self.engine
        if len(MODES) == 1:
            _register_builtin_modes()
        if mode not in MODES:
            raise ModeError(f"unknown mode {mode!r}; available: {', '.join(sorted(MODES))}")
        if mode in SPECULATIVE_MODES and not engine.target_pass_size_invariant:
            raise ModeError(f'mode="{mode}" needs a target whose logits do not depend on pass size; this bundle '
                            'was exported with --ar-only (plain decoding only). Use mode="ar" or re-export '
                            'without --ar-only')
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not tokens:
            raise PromptError("the prompt encodes to no tokens")
        if len(tokens) >= engine.max_context:
            raise PromptError(f"the prompt has {len(tokens)} tokens but the bundle's context holds "
                              f"{engine.max_context} (prompt plus at least one new token)")
        on_text = options.pop("on_text", None)
        if engine.target_pass_size_invariant:
            check = engine.check_pass_sizes()
            if mode in SPECULATIVE_MODES and check["max_rows"] < 2 and engine.target.fused:
                raise ModeError(f'mode="{mode}" cannot reproduce mode="ar" on this machine: onnxruntime computes '
                                f'the target\'s rows differently in a {min(check["mismatched"])}-row pass than one '
                                'row at a time (checked once, kept in the bundle\'s cache/). Use mode="ar"')
        if mode in COSTED_MODES and not engine.cost_curves:
            engine.cost_curves = engine.measure_costs()
        reused = _common_prefix(self.tokens, tokens)  # of this conversation's text (its KV may be gone)
        self.tokens = list(tokens)
        for runner in (engine.target, engine.draft):  # keep what a buffer holds of this text, free the rest
            if runner is not None:
                runner.rollback(runner.common_prefix(self.tokens))
        bundle_tau = engine.manifest.raw.get("runtime", {}).get("ead", {}).get("tau")
        if bundle_tau is not None:
            options.setdefault("bundle_tau", bundle_tau)
        options.setdefault("ngram_model", engine.ngram_model)
        measured = engine.manifest.raw["models"].get("draft", {}).get("measured", {})
        if mode in DRAFTED_MODES and "agreement" in measured:
            options.setdefault("prior_alpha", measured["agreement"])  # export-time agreement seeds the adaptive size
        for role, curve in engine.cost_curves.items():
            options.setdefault(f"{role}_cost_curve", curve)
        state = DecodeState(target=engine.target, draft=engine.draft, tokens=self.tokens, params=params,
                            rng=np.random.default_rng(params.seed), options=options,
                            end=min(len(self.tokens) + max_new_tokens, engine.max_context))
        eos = set(engine.tokenizer.eos_token_ids)
        stream, tokenizer = engine.tokenizer.stream(), engine.tokenizer.tokenizer
        # Text is read while decoding only to stream it or to find a stop string; otherwise the tokens are
        # detokenized after the loop. A streaming step costs ~25 us right after a pass (cold caches), ~0.5 us there.
        live = on_text is not None or any(params.stop)
        text, emitted = "", 0
        holdback = max((len(s) for s in params.stop), default=1) - 1
        new_ids: list[int] = []
        finish, message = "length", ""
        target_before = engine.target.stats.passes
        draft_before = engine.draft.stats.passes if engine.draft is not None else 0
        t_start = time.perf_counter()
        t_first = None
        first_tokens = None  # tokens the first chunk committed: a speculative mode's first step may commit several
        gen = MODES[mode](state)
        try:
            while finish == "length" and len(new_ids) < max_new_tokens:
                try:
                    chunk = next(gen)
                except ContextFullError:
                    message = f"context full: the bundle holds {engine.max_context} tokens"
                    break
                if t_first is None:
                    t_first = time.perf_counter()
                for tok in chunk:
                    if len(self.tokens) >= engine.max_context:  # every mode stops where `ar` must
                        message = f"context full: the bundle holds {engine.max_context} tokens"
                        break
                    new_ids.append(tok)
                    self.tokens.append(tok)
                    if tok in eos:
                        finish = "stop"
                        break
                    if live:
                        checked = len(text)
                        text += stream.step(tokenizer, tok) or ""
                        hit = _find_stop(text, params.stop, checked)
                        if hit is not None:
                            text, finish = text[:hit], "stop"
                            break
                    if len(new_ids) >= max_new_tokens:
                        break
                if first_tokens is None:
                    first_tokens = len(new_ids)
                if message:
                    break
                if on_text is not None:
                    safe = len(text) if finish == "stop" else max(emitted, len(text) - holdback)
                    if safe > emitted:
                        on_text(text[emitted:safe])
                        emitted = safe
                yield None
            if finish == "length" and not message and len(self.tokens) >= engine.max_context:
                message = f"context full: the bundle holds {engine.max_context} tokens"
        finally:
            gen.close()
        if not live:  # an EOS token is never detokenized (it can only be the last one)
            text = "".join(stream.step(tokenizer, tok) or "" for tok in new_ids if tok not in eos)
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        elapsed = time.perf_counter() - t_start
        stats = dict(state.stats)
        n = len(new_ids)
        decode_time = elapsed - ((t_first - t_start) if t_first else 0.0)
        stats.update({
            "mode": mode, "prompt_tokens": len(tokens), "reused_tokens": reused, "prefill_tokens": state.prefilled,
            "new_tokens": n, "seconds": elapsed,
            "time_to_first_token": (t_first - t_start) if t_first else None, "first_chunk_tokens": first_tokens,
            "tokens_per_second": n / elapsed if elapsed > 0 else 0.0,
            "decode_tokens_per_second": ((n - first_tokens) / decode_time
                                         if first_tokens is not None and n > first_tokens and decode_time > 0
                                         else None),
            "target_passes": engine.target.stats.passes - target_before,
            "draft_passes": (engine.draft.stats.passes - draft_before) if engine.draft is not None else 0,
            "kv_buffer_bytes": engine.target.kv_bytes + (engine.draft.kv_bytes if engine.draft else 0),
            "peak_rss_bytes": _peak_rss(),
        })
        if mode in SPECULATIVE_MODES and engine.pass_check is not None:  # False: equal to `ar` only up to rounding
            stats["pass_size_invariant"] = not engine.pass_check["mismatched"]
        if "ead" in stats:
            from edgespec.runtime.ead import add_ar_ratio

            add_ar_ratio(stats, decode_time if n > 1 else None, n - 1, engine.cost_curves.get("target"))
        self.last_result = GenerationResult(text=text, token_ids=new_ids, finish_reason=finish, stats=stats,
                                            message=message)


def _sampling_params(kwargs: dict) -> SamplingParams:
    """Take the sampling settings out of keyword arguments (the rest are mode options)."""
    return SamplingParams(temperature=kwargs.pop("temperature", 0.0), top_k=kwargs.pop("top_k", 0),
                          top_p=kwargs.pop("top_p", 1.0), repetition_penalty=kwargs.pop("repetition_penalty", 1.0),
                          seed=kwargs.pop("seed", None), stop=tuple(kwargs.pop("stop", ())))


def _load_ngram(manifest: Manifest):
    """The bundle's trigram table (built at export with --ngram-tokens), if it has one."""
    entry = manifest.raw.get("ngram")
    if not entry:
        return None
    from edgespec.runtime.ngram import NgramModel

    return NgramModel.load(manifest.path(entry["file"]))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _find_stop(text: str, stops: tuple[str, ...], checked: int) -> int | None:
    """Where the first stop string in `text` begins; `text[:checked]` is known to hold none, so only
    matches ending after it are looked for (a check per token stays short however long the text grows)."""
    hits = [i for i in (text.find(s, max(0, checked - len(s) + 1)) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


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
