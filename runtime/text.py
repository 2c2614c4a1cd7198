"""Tokenizer, chat template and streaming detokenization, with `tokenizers` and jinja2 only."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from edgespec.runtime.bundle import BundleError, Manifest


def _load(manifest: Manifest, rel: str) -> Tokenizer:
    """The bundle's tokenizer; a file the tokenizers library cannot read is a BundleError naming it."""
    try:
        return Tokenizer.from_file(str(manifest.path(rel)))
    except Exception as exc:  # the library raises a bare Exception for malformed JSON
        raise BundleError(f"cannot read the tokenizer {rel}: {exc}") from exc


PROBE = "edgespec \u00e9\u4e2d\U0001f600\x00 ?"  # words, accents, CJK, emoji and a control character


def _ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`. The library raises a bare Exception for a tokenizer that cannot encode some text (a
    word-level vocabulary whose unknown token is missing); that is the bundle's fault, not the prompt's."""
    try:
        return tokenizer.encode(text, add_special_tokens=False).ids
    except Exception as exc:
        raise BundleError(f"the bundle's tokenizer cannot encode text: {exc}") from exc


def _check_model(tokenizer: Tokenizer, manifest: Manifest) -> None:
    """The tokenizer is the model's: no id past its vocabulary (onnxruntime would fail on the embedding gather),
    the end-of-text token the manifest names has one of the manifest's ids, and text of any script encodes."""
    t, vocab, rel = manifest.tokenizer, manifest.target.vocab_size, manifest.tokenizer["file"]
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)  # ids need not be 0..size-1
    if top >= vocab:
        raise BundleError(f"{rel} has {tokenizer.get_vocab_size()} tokens with ids up to {top} but the model's "
                          f"vocabulary has {vocab}: a tokenizer from another model?")
    eos, ids = t.get("eos_token"), t.get("eos_token_ids")
    if eos and ids and tokenizer.token_to_id(eos) not in ids:
        raise BundleError(f"{rel} gives {eos!r} the id {tokenizer.token_to_id(eos)} but the manifest's end-of-text "
                          f"ids are {ids}: a tokenizer from another model?")
    _ids(tokenizer, PROBE)  # refused at load, not at a user's first prompt with an unusual character


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
    literal: Tokenizer  # the same tokenizer, reading special-token strings as plain text

    @staticmethod
    def from_manifest(manifest: Manifest) -> BundleTokenizer:
        t = manifest.tokenizer
        tokenizer, literal = _load(manifest, t["file"]), _load(manifest, t["file"])
        _check_model(tokenizer, manifest)
        literal.encode_special_tokens = True  # a second instance: toggling one shared by threads would race
        return BundleTokenizer(
            tokenizer=tokenizer, chat_template=t.get("chat_template"), bos_token=t.get("bos_token"),
            eos_token=t.get("eos_token"), eos_token_ids=list(t.get("eos_token_ids", [])),
            add_bos=bool(t.get("add_bos", False)), literal=literal)

    @cached_property
    def special_strings(self) -> tuple[str, ...]:
        return tuple(t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def _template(self) -> jinja2.Template:
        """The chat template compiled once (a conversation renders it every turn), in a sandbox as transformers'
        apply_chat_template does."""
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        return env.from_string(self.chat_template)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the bundle's chat template the way transformers' apply_chat_template does."""
        if not self.chat_template:
            raise ValueError("this bundle has no chat template; call generate with chat=False")
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat template over `messages`. Special-token strings inside a message's content stay
        text, so a user who types <|im_end|> does not end their turn; the template's own are tokens. A content
        without such strings is encoded together with the template, as transformers does."""
        text = self.render_chat(messages)
        pieces, cursor = [], 0
        for content in (m["content"] for m in messages):
            if not any(s in content for s in self.special_strings):
                continue
            start = text.find(content, cursor)
            if start < 0:
                raise ValueError("the chat template changes a message that holds special-token strings, so they "
                                 "cannot be kept as text")
            pieces += [(text[cursor:start], self.tokenizer), (content, self.literal)]
            cursor = start + len(content)
        pieces.append((text[cursor:], self.tokenizer))
        return self._with_bos([i for piece, tok in pieces if piece
                               for i in _ids(tok, piece)])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text (a raw prompt's own template) are recognised."""
        return self._with_bos(_ids(self.tokenizer, text))

    def _with_bos(self, ids: list[int]) -> list[int]:
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
