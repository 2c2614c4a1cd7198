"""`edgespec chat` in a real pseudo-terminal (pexpect): streamed turns, commands, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import io
import sys

import pexpect
import pytest

from edgespec.runtime.engine import Engine

# The CLI with one more mode, `ar` slowed down, so that Ctrl-C can land in the middle of an answer.
LAUNCH = """
import sys, time
from edgespec.runtime.decoding import ArSettings, decode_ar
from edgespec.runtime.modes import register_mode

def slow(state):
    for chunk in decode_ar(state):
        time.sleep(0.05)
        yield chunk

register_mode("test-slow", slow, ArSettings, "ar slowed down (tests)")
from edgespec.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""
PROMPT = ">>> "


@pytest.fixture(scope="module")
def engine(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


@pytest.fixture
def chat(tiny_pair_bundle):
    transcript = io.StringIO()
    child = pexpect.spawn(sys.executable, ["-c", LAUNCH, "chat", "--bundle", str(tiny_pair_bundle)],
                          encoding="utf-8", timeout=60, dimensions=(50, 250))
    child.logfile_read = transcript
    child.expect(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)
    assert "Traceback" not in transcript.getvalue(), transcript.getvalue()


def plain(text: str) -> str:
    """What the terminal showed, without its colours and with plain newlines."""
    import re

    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r\n", "\n")


def ask(child, text: str) -> str:
    child.sendline(text)
    child.expect(PROMPT)
    return plain(child.before)


def greedy(engine: Engine, messages: list[dict]) -> str:
    return engine.generate(messages, max_new_tokens=512, mode="ar", chat=True).text


def test_two_turns_modes_and_commands(engine, chat):
    assert "mode auto" in plain(chat.before)  # the engine's default
    first = [{"role": "user", "content": "hello there"}]
    answer = greedy(engine, first)
    assert answer in ask(chat, "hello there")
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    assert greedy(engine, second) in ask(chat, "and then?")
    assert "(mode ar)" in ask(chat, "/mode ar")
    assert "(mode staged depth=2)" in ask(chat, "/mode staged depth=2")
    assert "(new conversation)" in ask(chat, "/reset")
    assert answer in ask(chat, "hello there")  # staged is lossless: the same text as ar
    stats = ask(chat, "/stats")
    assert "mode staged:" in stats and "tokens per target pass" in stats
    assert "error: unknown mode 'bogus'" in ask(chat, "/mode bogus")
    assert "unknown setting" in ask(chat, "/mode staged dept=2")
    assert "unknown command /nope" in ask(chat, "/nope")
    assert "context" in ask(chat, "word " * 300)  # longer than the tiny context: an error, not a traceback
    chat.sendeof()
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(engine, chat):
    answer = greedy(engine, [{"role": "user", "content": "hello there"}])
    assert "(mode test-slow)" in ask(chat, "/mode test-slow")
    chat.sendline("hello there")
    chat.expect_exact(answer[:2])
    chat.sendintr()
    chat.expect_exact("[stopped]")
    chat.expect(PROMPT)
    assert "mode test-slow:" in ask(chat, "/stats")
    chat.sendintr()  # at the prompt: a hint, not an exit
    chat.expect_exact("(Ctrl-D or /quit to leave)")
    chat.expect(PROMPT)
    ask(chat, "/mode ar")
    assert "(new conversation)" in ask(chat, "/reset")
    assert answer in ask(chat, "hello there")
    chat.sendline("/quit")
    chat.expect(pexpect.EOF)
    chat.close()
    assert chat.exitstatus == 0
