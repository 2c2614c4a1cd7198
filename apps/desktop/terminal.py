"""`edgespec chat`: a conversation in the terminal, streamed, each token coloured by the model that wrote it.

Generation runs on a worker thread (apps/desktop/generation.py): Python delivers Ctrl-C to the main thread, which
then only cancels the answer, at the engine's next step, and never interrupts a model in the middle of a pass.
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
from typing import TextIO

import jinja2

from edgespec.apps.desktop.generation import EngineWorker, Failed, Finished, Job, Piece
from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import MODES, get_mode, make_request, parse_setting

try:  # line editing and history where the platform has it
    import readline  # noqa: F401
except ImportError:
    pass

PROMPT = ">>> "
COLORS = {"draft": "\x1b[32m", "ngram": "\x1b[36m", "small": "\x1b[33m"}  # the target's tokens: the terminal's own
RESET = "\x1b[0m"
HELP = """commands:
  /mode                 show the mode and the modes there are
  /mode NAME [K=V ...]  switch mode, with its settings (e.g. /mode staged depth=4)
  /reset                start a new conversation
  /stats                statistics of the last answer
  /quit                 leave (or Ctrl-D); Ctrl-C stops an answer"""


class TerminalChat:
    def __init__(self, engine: Engine, mode: str, sampling: dict, max_tokens: int, system: str | None = None,
                 color: bool = False, out: TextIO = sys.stdout):
        make_request(mode, sampling)  # a bad flag fails before the first prompt
        if max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
        self.engine, self.sampling, self.max_tokens, self.out = engine, sampling, max_tokens, out
        self.mode, self.settings = mode, {}
        self.system = [{"role": "system", "content": system}] if system else []
        self.messages = list(self.system)
        self.color = color and os.environ.get("NO_COLOR") is None
        self.last: Finished | None = None
        self.worker = EngineWorker(engine, max_waiting=1)

    def say(self, text: str = "", end: str = "\n") -> None:
        self.out.write(text + end)
        self.out.flush()

    def run(self) -> int:
        """The read-answer loop, until /quit or end of input."""
        legend = ""
        if self.color:
            legend = " colours: " + " ".join(f"{COLORS[o]}{name}{RESET}" for o, name in
                                             (("draft", "draft"), ("ngram", "n-gram"), ("small", "small model")))
            legend += " target: plain."
        self.say(f"edgespec chat, mode {self.mode}.{legend} /help for commands, Ctrl-D to leave.")
        if threading.current_thread() is threading.main_thread():
            # Python leaves SIGINT ignored when it started ignored (a chat launched from a background job or
            # nohup), and then Ctrl-C could not stop an answer: the chat asks for it explicitly.
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                try:
                    line = input(PROMPT).strip()
                except KeyboardInterrupt:
                    self.say("\n(Ctrl-D or /quit to leave)")
                    continue
                except EOFError:
                    self.say()
                    return 0
                if line.startswith("/"):
                    if not self.command(line):
                        return 0
                elif line:
                    try:
                        self.answer(line)
                    except KeyboardInterrupt:  # between the answer's end and the next prompt
                        self.say(" [stopped]")
        finally:
            self.worker.close()

    def command(self, line: str) -> bool:
        """Run a slash command; False to leave."""
        name, *rest = line.split()
        if name in ("/quit", "/exit", "/bye"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.messages = list(self.system)
            self.say("(new conversation)")
        elif name == "/stats":
            self.say(self.stats_text())
        elif name == "/mode":
            self.switch_mode(rest)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def switch_mode(self, words: list[str]) -> None:
        if not words:
            current = " ".join([self.mode, *(f"{k}={v}" for k, v in self.settings.items())])
            self.say(f"mode: {current}\n" + "\n".join(f"  {name}: {m.help}" for name, m in MODES.items()))
            return
        name, pairs = words[0], words[1:]
        try:
            get_mode(name)
            settings = {}
            for pair in pairs:
                key, sep, value = pair.partition("=")
                if not sep:
                    raise ValueError(f"settings are NAME=VALUE, got {pair!r}")
                settings[key] = parse_setting(name, key, value)
            make_request(name, {**settings, **self.sampling})
        except (ValueError, TypeError) as exc:
            self.say(f"error: {exc}")
            return
        self.mode, self.settings = name, settings
        self.say(f"(mode {' '.join(words)})")

    def answer(self, content: str) -> None:
        """Stream the answer to `content`; Ctrl-C stops it and keeps what was written."""
        messages = self.messages + [{"role": "user", "content": content}]
        try:
            tokens = self.engine.prompt_tokens(messages, chat=True)
            request = make_request(self.mode, {**self.settings, **self.sampling})
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            self.say(f"error: {exc}")
            return
        events: queue.Queue = queue.Queue()
        job = Job(tokens, self.max_tokens, request, events.put)
        self.worker.submit(job)
        try:
            while True:
                try:
                    event = events.get(timeout=0.1)
                    if isinstance(event, Piece):
                        self.show(event)
                        continue
                except queue.Empty:
                    continue
                except KeyboardInterrupt:
                    job.cancel()
                    continue
                break
        finally:  # nothing once the answer is complete; stops it if anything else ends the wait
            job.cancel()
        if isinstance(event, Failed):
            self.say(f"\nerror: {event.error}" + (" (/reset starts a new conversation)"
                                                  if "context" in str(event.error) else ""))
            return
        note = " [stopped]" if event.finish_reason == "cancelled" else f" [{event.message}]" if event.message else ""
        self.say(note)
        self.last = event
        self.messages = messages + [{"role": "assistant", "content": event.text}]

    def show(self, piece: Piece) -> None:
        if not self.color:
            self.say(piece.text, end="")
            return
        self.say("".join(f"{COLORS[o]}{text}{RESET}" if o in COLORS else text for text, o in piece.tokens), end="")

    def stats_text(self) -> str:
        if self.last is None:
            return "no answer yet"
        s = self.last.stats

        def fmt(value, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        origins = ", ".join(f"{k} {v}" for k, v in sorted(s.get("origins", {}).items()))
        return (f"mode {s.get('mode', self.mode)}: {self.last.completion_tokens} tokens, "
                f"{fmt(s.get('tokens_per_second'), '.1f')} tok/s, first token after "
                f"{fmt(s.get('time_to_first_token'), '.3f')} s, acceptance {fmt(s.get('acceptance_rate'), '.0%')}, "
                f"{fmt(s.get('tokens_per_target_pass'), '.2f')} tokens per target pass; written by: {origins or '-'}")
