"""Bad input and broken bundles: every case ends in a clear, specific error or a correct result.

Each broken bundle is a copy of the tiny bundle with one thing wrong; it is opened through the API (the
error's type and words) and through the command line in a subprocess (one `edgespec: error: ...` line on
stderr, exit code 2, no traceback).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edgespec.runtime.bundle import BundleError, sha256_file
from edgespec.runtime.engine import Engine, PromptError


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("cache"))
    return out


def _manifest(bundle: Path, change: Callable[[dict], object]) -> None:
    """Rewrite the bundle's manifest with `change` applied (its return value, when not None, replaces it)."""
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    replaced = change(raw)
    path.write_text(json.dumps(raw if replaced is None else replaced))


def _rewrite(bundle: Path, rel: str, data: bytes) -> None:
    """Replace a bundle file and record its new checksum, as a careless re-export would."""
    (bundle / rel).write_bytes(data)
    _manifest(bundle, lambda raw: raw["files"].__setitem__(rel, sha256_file(bundle / rel)))


def _target(raw: dict) -> dict:
    return raw["models"]["target"]["graphs"]["fused"]


def _kv_inputs(raw: dict, slots: int) -> None:
    """max_context and the K/V shapes the manifest records for its graph, all set to `slots`."""
    raw["max_context"] = slots
    for item in _target(raw)["inputs"] + _target(raw)["outputs"]:
        if item["name"].startswith(("past_", "present_")) and len(item["shape"]) == 4:
            item["shape"][2] = slots


def _unlisted(raw: dict) -> None:
    del raw["files"][_target(raw)["file"]]


def _outside(raw: dict) -> None:
    rel = "../../x.onnx"
    raw["files"][rel] = raw["files"].pop(_target(raw)["file"])
    _target(raw)["file"] = rel


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "manifest-not-an-object": (lambda b: _manifest(b, lambda raw: [raw]), "must hold a JSON object"),
    "manifest-a-string": (lambda b: _manifest(b, lambda raw: "bundle"), "must hold a JSON object"),
    "models-a-list": (lambda b: _manifest(b, lambda raw: raw.__setitem__("models", [1])), "malformed field"),
    "max-context-negative": (lambda b: _manifest(b, lambda raw: raw.__setitem__("max_context", -5)),
                             "max_context must be an integer >= 2"),
    "max-context-text": (lambda b: _manifest(b, lambda raw: raw.__setitem__("max_context", "256")),
                         "max_context must be an integer >= 2"),
    "max-context-absurd": (lambda b: _manifest(b, lambda raw: raw.__setitem__("max_context", 10 ** 9)),
                           "holds K/V for 256 tokens"),
    "max-context-absurd-everywhere": (lambda b: _manifest(b, lambda raw: _kv_inputs(raw, 10 ** 9)),
                                      "the manifest does not describe this graph"),
    "graph-not-in-files": (lambda b: _manifest(b, _unlisted), "is not in the manifest's files"),
    "graph-outside-the-bundle": (lambda b: _manifest(b, _outside), "points outside the bundle folder"),
    "tokenizer-absolute-path": (lambda b: _manifest(b, lambda raw: raw["tokenizer"].__setitem__("file", "/etc/hosts")),
                                "points outside the bundle folder"),
    "graph-truncated": (lambda b: _rewrite(b, "target/fused.onnx", (b / "target/fused.onnx").read_bytes()[:100]),
                        "onnxruntime cannot open target/fused.onnx"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_bundle_is_a_clear_error(tiny_bundle, tmp_path, case):
    breaks, needle = BROKEN[case]
    bundle = _copy(tiny_bundle, tmp_path)
    breaks(bundle)
    with pytest.raises(BundleError, match=re.escape(needle)):
        Engine.load(bundle).generate("hello", max_new_tokens=2)
    _one_error_line(_cli(bundle, "hello"), needle)


def _cli(bundle: Path, prompt: str | bytes, *args: str) -> subprocess.CompletedProcess:
    """`edgespec generate` in a subprocess; a bytes prompt reaches argv as those bytes."""
    argv = [sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle", str(bundle), "--prompt", prompt,
            "--max-new-tokens", "4", *args]
    return subprocess.run(argv, capture_output=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("edgespec: error:"), err
    assert needle in lines[0] and "Traceback" not in err, err


@pytest.fixture(scope="module")
def engine(tiny_bundle) -> Engine:
    return Engine.load(tiny_bundle)


@pytest.mark.parametrize("prompt, needle", [
    (b"hello", "the prompt must be a str, got bytes: decode it first"), (None, "must be a str, got NoneType"),
    ("ab\udcff", "not valid UTF-8 text: character 2 is the byte 0xff"),
    ("ab\ud800", "character 2 is a lone surrogate U+D800"), ("  \n", "the prompt is empty")])
def test_a_prompt_that_is_not_text_is_named(engine, prompt, needle):
    with pytest.raises(PromptError, match=re.escape(needle)):
        engine.generate(prompt, max_new_tokens=2)


@pytest.mark.parametrize("messages, needle", [
    (["hello"], "message 0 must be a dict"), ([{"role": "user", "content": b"hi"}], "message 0 must be a str"),
    ([{"role": "user", "content": "hi"}, {"content": "x"}], "message 1 must be a dict")])
def test_malformed_chat_messages_are_named(engine, messages, needle):
    with pytest.raises(PromptError, match=re.escape(needle)):
        engine.generate(messages, max_new_tokens=2)


def test_command_line_bytes_that_are_not_utf8(tiny_bundle, tmp_path):
    """argv holds bytes; Python hands them over surrogate-escaped, which the tokenizer cannot take."""
    _one_error_line(_cli(tiny_bundle, b"def f(x):\xff\xfe"), "not valid UTF-8 text: character 9 is the byte 0xff")
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"hello \xc3\x28")
    proc = subprocess.run([sys.executable, "-m", "edgespec.runtime.cli", "generate", "--bundle", str(tiny_bundle),
                           "--prompt-file", str(path)], capture_output=True, timeout=300)
    _one_error_line(proc, "--prompt-file is not UTF-8 text: byte 0xc3 at offset 6")
