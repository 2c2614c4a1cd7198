"""Tokenizer, chat template and streaming detokenization, with `tokenizers` and jinja2 only."""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgespec.runtime.bundle import Manifest


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@dataclass
class BundleTokenizer:
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    eos_token_ids: list[int]
    add_bos: bool

    @staticmethod
    def from_manifest(manifest: Manifest) -> BundleTokenizer:
        t = manifest.tokenizer
        return BundleTokenizer(
            tokenizer=Tokenizer.from_file(str(manifest.path(t["file"]))),
            chat_template=t.get("chat_template"), bos_token=t.get("bos_token"), eos_token=t.get("eos_token"),
            eos_token_ids=list(t.get("eos_token_ids", [])), add_bos=bool(t.get("add_bos", False)))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the bundle's chat template the way transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ValueError("this bundle has no chat template; call generate with chat=False")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        template = env.from_string(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (from a chat template) are recognised."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token:
            bos = self.tokenizer.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream(self) -> DecodeStream:
        """A streaming decoder that emits text only once a UTF-8 character is complete."""
        return DecodeStream(skip_special_tokens=True)


class TextOut:
    """The text of a generation's new tokens, its stop strings, and the pieces a stream has been given.

    Text is detokenized while decoding only when it is streamed or searched for a stop string; otherwise
    once, after the loop: a streaming step right after a pass runs on cold caches.
    """

    def __init__(self, tokenizer: BundleTokenizer, stop: tuple[str, ...], on_text=None):
        self.tokenizer, self.stop, self.on_text = tokenizer, stop, on_text
        self.decoder = tokenizer.stream()
        self.live = on_text is not None or any(stop)
        self.text, self.emitted = "", 0
        self.holdback = max((len(s) for s in stop), default=1) - 1  # a stop string may still cut this much

    def add(self, token: int) -> bool:
        """Append a token's text (when live); True when a stop string appeared: the text ends before it."""
        if not self.live:
            return False
        checked = len(self.text)
        self.text += self.decoder.step(self.tokenizer.tokenizer, token) or ""
        hit = find_stop(self.text, self.stop, checked)
        if hit is not None:
            self.text = self.text[:hit]
        return hit is not None

    def emit(self, final: bool = False) -> None:
        """Hand the stream the text no stop string can still cut (all of it when `final`)."""
        safe = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        if self.on_text is not None and safe > self.emitted:
            self.on_text(self.text[self.emitted:safe])
            self.emitted = safe

    def finish(self, new_ids: list[int]) -> str:
        """The whole text; an end-of-sequence token is never detokenized (it can only be the last one)."""
        if not self.live:
            eos = set(self.tokenizer.eos_token_ids)
            self.text = "".join(self.decoder.step(self.tokenizer.tokenizer, t) or "" for t in new_ids if t not in eos)
        self.emit(final=True)
        return self.text


def find_stop(text: str, stops: tuple[str, ...], checked: int) -> int | None:
    """Where the first stop string in `text` begins; `text[:checked]` is known to hold none, so only
    matches ending after it are looked for (a check per token stays short however long the text grows)."""
    hits = [i for i in (text.find(s, max(0, checked - len(s) + 1)) for s in stops if s) if i >= 0]
    return min(hits) if hits else None
