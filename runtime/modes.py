"""The decoding modes by name, and the one place keyword arguments become sampling parameters and settings.

Each mode is a generator over a `DecodeState` (runtime/decoding.py) with a frozen settings dataclass that
validates its fields. The built-in modes are registered here at import: the mode modules never import the
engine, and `register_mode` adds to them rather than replacing them.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, get_args, get_type_hints

from edgespec.runtime.auto import decode_auto
from edgespec.runtime.decoding import ArSettings, DecodeState, ModeError, NoSettings, decode_ar
from edgespec.runtime.ead import EadSettings, EadSpecSettings, decode_ead, decode_ead_spec
from edgespec.runtime.sampling import SamplingParams
from edgespec.runtime.speculative import SpecSettings, decode_spec
from edgespec.runtime.staged import NgramSettings, StagedSettings, decode_ngram, decode_staged

SAMPLING = tuple(f.name for f in fields(SamplingParams))


class SettingError(TypeError, ValueError):
    """A keyword argument that is neither a sampling parameter nor a setting of the chosen mode."""


@dataclass(frozen=True)
class Mode:
    """A decoding mode: its generator, its settings, and what the engine must provide before it runs."""

    decode: Callable[[DecodeState], Iterator[list[int]]]
    settings: type = NoSettings
    help: str = ""
    lossless: bool = False  # reproduces `ar`: needs a target whose rows do not depend on the pass size
    drafted: bool = False  # proposals come from the draft: its export-time agreement seeds the sizing
    costed: bool = False  # reads the measured pass costs (runtime/costs.py)


DEFAULT_MODE = "auto"

MODES: dict[str, Mode] = {
    "auto": Mode(decode_auto, NoSettings, "the default: each step verifies whichever lossless proposal (none, n-gram, "
                 "the draft's path) is expected to commit the most tokens per unit of cost here; lossless "
                 "(plain ar where this machine cannot verify exactly)", drafted=True, costed=True),
    "ar": Mode(decode_ar, ArSettings, "one target pass per token"),
    "spec": Mode(decode_spec, SpecSettings, "the draft proposes k tokens, the target verifies them; lossless",
                 lossless=True, drafted=True, costed=True),
    "staged": Mode(decode_staged, StagedSettings, "n-gram guesses checked by the draft in a tree, its path "
                   "verified by the target; lossless", lossless=True, drafted=True, costed=True),
    "ngram": Mode(decode_ngram, NgramSettings, "n-gram proposals verified by the target, no draft; lossless",
                  lossless=True, costed=True),
    "ead": Mode(decode_ead, EadSettings, "entropy-adaptive: the draft writes while it is sure; lossy", costed=True),
    "ead-spec": Mode(decode_ead_spec, EadSpecSettings, "ead whose large-model stretches run as staged steps",
                     lossless=True, drafted=True, costed=True),
}


def register_mode(name: str, decode: Callable[[DecodeState], Iterator[list[int]]], settings: type = NoSettings,
                  help: str = "", **flags: bool) -> None:
    """Add (or replace) a mode; `settings` is a frozen dataclass of its keyword settings, `flags` those of `Mode`."""
    MODES[name] = Mode(decode, settings, help, **flags)


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ModeError(f"unknown mode {name!r}; available: {', '.join(sorted(MODES))}")
    return MODES[name]


def setting_names(mode: str) -> list[str]:
    return [f.name for f in fields(get_mode(mode).settings)]


@dataclass(frozen=True)
class Request:
    """What a generation was asked for: the mode's name, the sampling parameters and the mode's settings."""

    mode: str
    params: SamplingParams
    settings: Any


def make_request(mode: str, kwargs: dict[str, Any]) -> Request:
    """Split keyword arguments into sampling parameters and the mode's settings, validating both.

    A name that is neither is an error naming the mode's settings and the sampling parameters, with the
    closest valid name when there is one (`temprature` is never silently ignored)."""
    names = setting_names(mode)
    unknown = sorted(set(kwargs) - set(names) - set(SAMPLING))
    if unknown:
        raise SettingError(f"unknown setting{'s' if len(unknown) > 1 else ''} {_with_hints(unknown, names)} "
                           f"for mode={mode!r}; its settings: {', '.join(names) or 'none'}; "
                           f"sampling: {', '.join(SAMPLING)}")
    params = SamplingParams(**{k: v for k, v in kwargs.items() if k in SAMPLING})
    return Request(mode, params, MODES[mode].settings(**{k: v for k, v in kwargs.items() if k in names}))


def _with_hints(unknown: list[str], names: list[str]) -> str:
    """The unknown names, each with the closest valid one when a typo is likely."""
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, names + list(SAMPLING), 1)
        parts.append(repr(name) + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(parts)


def parse_setting(mode: str, name: str, text: str) -> Any:
    """A setting's value from command-line text, by the type its dataclass declares ("none" for None)."""
    hint = get_type_hints(get_mode(mode).settings).get(name)
    if hint is None:  # not a setting of this mode: make_request names the valid ones
        return text
    kinds = get_args(hint) or (hint,)
    if text.lower() == "none" and type(None) in kinds:
        return None
    for kind in kinds:
        if kind is str:
            return text
        if kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                continue
    names = " or ".join(k.__name__ for k in kinds if k is not type(None))
    raise SettingError(f"{name}={text!r}: expected {names}")
