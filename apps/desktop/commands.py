"""`edgespec serve` and `edgespec chat`: their arguments, and handlers that import the server only when it runs,
so the runtime's CLI works without the `serve` extra (FastAPI, uvicorn)."""

from __future__ import annotations

import sys
from pathlib import Path


def add_parsers(sub) -> None:
    from edgespec.runtime.modes import DEFAULT_MODE, MODES

    serve = sub.add_parser("serve", help="OpenAI-compatible local server with a chat page (extra: serve)")
    serve.add_argument("--bundle", required=True)
    serve.add_argument("--host", default="127.0.0.1", help="loopback unless --allow-remote")
    serve.add_argument("--port", type=int, default=8080, help="0: any free port")
    serve.add_argument("--open", action="store_true", help="open the chat page in the default browser")
    serve.add_argument("--allow-remote", action="store_true",
                       help="allow a --host other machines reach (there is no authentication)")
    serve.add_argument("--max-queue", type=int, default=8,
                       help="requests that may wait for the engine; more get 429 with Retry-After")
    chat = sub.add_parser("chat", help="chat with a bundle in the terminal")
    chat.add_argument("--bundle", required=True)
    chat.add_argument("--max-tokens", type=int, default=512, help="new tokens per answer at most")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--system", help="a system message opening the conversation")
    chat.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                      help="colour each token by the model that wrote it")
    for p in (serve, chat):
        p.add_argument("--mode", default=DEFAULT_MODE, choices=list(MODES),
                       help="decoding mode (default: %(default)s; for the server, the mode of requests that name none)")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int)
    serve.set_defaults(func=_serve)
    chat.set_defaults(func=_chat)


def _serve(args) -> int:
    from edgespec.runtime.engine import Engine

    try:
        from edgespec.apps.desktop import server
    except ImportError as exc:
        raise ValueError(f"edgespec serve needs the serve extra ({exc.name} is missing): "
                         "pip install 'edgespec[serve]'") from exc
    if not server.is_loopback(args.host):
        if not args.allow_remote:
            raise ValueError(f"--host {args.host} is reachable from other machines; add --allow-remote to serve "
                             "them (there is no authentication)")
        print(f"warning: serving on {args.host}: anyone who can reach this machine can use the model; "
              "there is no authentication", file=sys.stderr)
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be >= 1, got {args.max_queue}")
    engine = Engine.load(args.bundle, device=args.device, threads=args.threads)
    server.serve(engine, Path(args.bundle).resolve().name, args.host, args.port, args.mode, args.max_queue,
                 args.open)
    return 0


def _chat(args) -> int:
    from edgespec.apps.desktop.terminal import TerminalChat
    from edgespec.runtime.engine import Engine

    engine = Engine.load(args.bundle, device=args.device, threads=args.threads)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}
    chat = TerminalChat(engine, args.mode, sampling, args.max_tokens, args.system, color)
    return chat.run()
