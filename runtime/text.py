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
