"""Request bodies of the OpenAI-compatible endpoints, and our `edgespec` object that rides along in them.

Types are strict (a string is not a number, 1.5 is not an integer, "yes" is not a boolean), so a client's mistake
is a 400 naming the field rather than a guess. Fields of OpenAI's schema that change nothing here (`user`,
`metadata`, ...) are ignored, as OpenAI-compatible servers do; the ones we cannot honour (several choices,
log-probabilities, tools, presence and frequency penalties) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOP_STRINGS = 16
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}  # pydantic names union alternatives in an error's location


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        """The message as the chat template takes it: a `developer` message is a system message there."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class EdgespecOptions(BaseModel):
    """Our extras: the decoding mode and its settings (runtime/modes.py), and sampling knobs OpenAI lacks."""

    model_config = ConfigDict(strict=True, extra="forbid")

    mode: str | None = None  # None: the server's default mode
    settings: dict[str, int | float | str | None] = Field(default_factory=dict)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0, le=10)


class _Generation(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    edgespec: EdgespecOptions = Field(default_factory=EdgespecOptions)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only one choice per request is supported (n=1)")
        return n

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value:
            raise ValueError("not supported; use edgespec.repetition_penalty")
        return value

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list | None = None

    @field_validator("logprobs", "tools")
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported")
        return value

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("echo", "logprobs", "suffix")
    @classmethod
    def _unsupported(cls, value):
        if value is not None and value is not False:
            raise ValueError("not supported")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def limit(self) -> int | None:
        return self.max_tokens


def describe(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the parameter it concerns, from pydantic's first error; the alternatives of a
    union (`stop` is a string or a list) are reported together."""
    errors = exc.errors(include_url=False)
    param = _param(errors[0]["loc"])
    messages = list(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in errors
                                  if _param(e["loc"]) == param))
    return f"{param or 'body'}: {'; or '.join(messages)}", param


def _param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p in _TYPE_TAGS or "[" in p))]
    return ".".join(parts) or None
