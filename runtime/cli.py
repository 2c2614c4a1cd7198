"""`edgespec` command line: `generate` (and later subcommands registered by other modules)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from edgespec.devices.placement import DevicePlacementError
from edgespec.runtime.bundle import BundleError
from edgespec.runtime.sampling import SamplingError


def _mode_help() -> str:
    from edgespec.runtime.modes import MODES

    return "; ".join(f"{name}: {mode.help} (settings: {', '.join(f.name for f in fields(mode.settings)) or 'none'})"
                     for name, mode in MODES.items())


def _add_generate(sub) -> None:
    from edgespec.runtime.modes import DEFAULT_MODE, MODES

    p = sub.add_parser("generate", help="generate text from a bundle")
    p.add_argument("--bundle", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the bundle's chat template")
    p.add_argument("--mode", default=DEFAULT_MODE, choices=list(MODES), help=_mode_help())
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="settings",
                   help="a setting of the mode, e.g. --set depth=4 (repeatable; 'none' for the adaptive default)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_sampling_flags(p, seed_default=None, seed_help="seed of a sampled generation")
    p.add_argument("--device", default="auto")
    p.add_argument("--strict-device", action="store_true")
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def add_sampling_flags(p: argparse.ArgumentParser, seed_default: int | None, seed_help: str) -> None:
    """The sampling flags every generating command shares (0: greedy)."""
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=seed_default, help=seed_help)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _request(args):
    """The sampling flags and `--set NAME=VALUE` settings, validated by the mode's settings dataclass."""
    from edgespec.runtime.modes import SAMPLING, make_request, parse_setting

    settings = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--set takes NAME=VALUE, got {item!r}")
        if name in SAMPLING:
            raise ValueError(f"{name} has a flag of its own: --{name.replace('_', '-')}")
        settings[name] = parse_setting(args.mode, name, value)
    return make_request(args.mode, dict(
        settings, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop)))


def _generate(args) -> int:
    from edgespec.runtime.engine import Engine

    request = _request(args)
    if args.prompt_file:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read --prompt-file: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise ValueError(f"--prompt-file is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset "
                             f"{exc.start}") from None
    else:
        prompt = args.prompt
    engine = Engine.load(args.bundle, device=args.device, threads=args.threads, strict=args.strict_device)
    tokens = engine.prompt_tokens(prompt, args.chat)
    if args.json:
        r = engine.chat().run(tokens, args.max_new_tokens, request)
        print(json.dumps({"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
                          "stats": r.stats, "message": r.message}))
        return 0
    r = engine.chat().run(tokens, args.max_new_tokens, request, lambda piece: print(piece, end="", flush=True))
    print()
    s = r.stats
    note = f" ({r.message})" if r.message else ""
    print(f"[{s['new_tokens']} tokens, {s['tokens_per_second']:.1f} tok/s, first token "
          f"{(s['time_to_first_token'] or 0) * 1000:.0f} ms, finish: {r.finish_reason}{note}]", file=sys.stderr)
    return 0


def _add_devices(sub) -> None:
    p = sub.add_parser("devices", help="list execution providers and where a bundle's graphs would run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--bundle", help="bundle directory: show which graph variant runs on which provider")
    p.set_defaults(func=devices)


def devices(args: argparse.Namespace) -> int:
    """Print the device report (devices/report.py); a bad --bundle raises BundleError for `main` to report."""
    from edgespec.devices.report import describe, render_text
    from edgespec.runtime.bundle import load_manifest

    info = describe(load_manifest(args.bundle, verify=False) if args.bundle else None)
    print(json.dumps(info, indent=2) if args.json else render_text(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgespec", description="edgespec on-device LLM runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_devices(sub)
    from edgespec.runtime.calibrate import add_parser as add_calibrate

    add_calibrate(sub)
    from edgespec.apps.desktop.commands import add_parsers as add_desktop  # serve, chat: FastAPI only when run

    add_desktop(sub)
    from edgespec.apps.batch.command import add_parser as add_batch

    add_batch(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        return args.func(args)
    except (BundleError, SamplingError, DevicePlacementError, ValueError, OSError) as exc:
        print(f"edgespec: error: {exc}", file=sys.stderr)  # OSError: e.g. a bundle file it may not read
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
