"""The JavaScript decode loop (apps/web) against the Python runtime, the web app in headless Chromium (offline once
loaded, as an installed PWA), and the Android APK built from Debian packages whose assets serve that web app.

The Python runtime writes the test vectors (same bundle, prompts, modes and fixed proposal sizes; its greedy token
ids, text and target passes); `node --test` runs the loop on onnxruntime-node and on onnxruntime-web's WASM build
against them, and Chromium runs the page on onnxruntime-web. Every tool is required: a missing node, npm, chromium
or Android build tool fails these tests (.ci/run installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgespec.runtime.engine import ChatSession, Engine
from edgespec.runtime.modes import make_request
from edgespec.runtime.ngram import ContextLookup, NgramDrafter

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "apps" / "web"
MAX_NEW_TOKENS = 48
PROMPTS = [  # (prompt, chat): code that repeats itself (n-gram matches), prose, and a chat turn
    ("def add(a, b):\n    return a + b\n\ndef add_three(a, b, c):\n    return a + b + c\n\ndef add", False),
    ("The cat sat on the mat. The cat sat on the", False),
    ("Write a haiku about rain.", True),
]
SETTINGS = {"ar": {}, "ngram": {"k": 4}, "staged": {"depth": 3}}  # fixed sizes: JS proposes what Python proposes


def tool(name: str) -> str:
    """The path of a command-line tool these tests need; its absence fails the test (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (see docs/web-and-android.md)")
    return path


def run(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> str:
    """Run a command at low priority; its output, or a failure showing it."""
    done = subprocess.run(["nice", "-n", "19", *cmd], cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """apps/web's npm packages, installed from its lockfile when missing (npm ci; .ci/run does it first)."""
    tool("node")
    tool("npm")
    if not (WEB / "node_modules" / ".package-lock.json").is_file():
        run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB)
    return WEB / "node_modules"


@pytest.fixture(scope="module")
def web_bundle(tiny_dir, tmp_path_factory) -> Path:
    """A tiny target, a draft derived from its first layer and an n-gram table: every mode of the JS loop runs."""
    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    out = tmp_path_factory.mktemp("web") / "bundle"
    return export_bundle(str(tiny_dir), out, derive_layers=1, ngram_tokens=200, parity=False,
                         options=ExportOptions(quant="fp32", max_context=256, log=quiet))


def python_vectors(bundle: Path) -> dict:
    """What the Python runtime gives for each prompt and mode (greedy): token ids, text, and the tokens each step
    committed (one verify pass per step); and its n-gram table's distributions and proposals."""
    engine = Engine.load(bundle)
    cases = []
    for prompt, chat in PROMPTS:
        for mode, settings in SETTINGS.items():
            steps: list[int] = []
            session = ChatSession(engine)
            tokens = engine.prompt_tokens(prompt, chat)
            for _ in session.iterate(tokens, MAX_NEW_TOKENS, make_request(mode, {"temperature": 0, **settings}),
                                     on_step=lambda chunk, committed, stats, steps=steps: steps.append(committed)):
                pass
            result = session.last_result
            cases.append({"prompt": prompt, "chat": chat, "mode": mode, "settings": settings,
                          "max_new_tokens": MAX_NEW_TOKENS, "prompt_ids": tokens, "token_ids": result.token_ids,
                          "text": result.text, "finish_reason": result.finish_reason, "steps": steps})
    checks = []
    for prompt, chat in PROMPTS:
        context = engine.prompt_tokens(prompt, chat)
        drafter = NgramDrafter(ContextLookup(list(context)), engine.ngram_model)
        checks.append({"context": context, "top": [list(t) for t in engine.ngram_model.next_distribution(context, 4)],
                       "proposal": drafter.propose([], 6)})
    return {"bundle": str(bundle), "cases": cases, "ngram_checks": checks}


@pytest.fixture(scope="module")
def vectors(web_bundle, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "vectors.json"
    path.write_text(json.dumps(python_vectors(web_bundle)))
    return path


def test_vectors_exercise_every_mode(vectors):
    """The vectors are worth comparing against: speculation accepted tokens, and the modes agree (Python's own
    losslessness, which the JS loop must reproduce)."""
    cases = json.loads(vectors.read_text())["cases"]
    for prompt, _ in PROMPTS:
        ids = {c["mode"]: c["token_ids"] for c in cases if c["prompt"] == prompt}
        assert ids["ngram"] == ids["ar"] == ids["staged"] and len(ids["ar"]) > 0
    ar = sum(len(c["steps"]) for c in cases if c["mode"] == "ar")
    assert sum(len(c["steps"]) for c in cases if c["mode"] == "ngram") < ar
    assert sum(len(c["steps"]) for c in cases if c["mode"] == "staged") < ar


def test_node_loop_gives_python_tokens(node_modules, vectors):
    """apps/web/test/*.test.mjs on onnxruntime-node and onnxruntime-web (WASM) in node: same prompt ids, token ids,
    text and tokens per step (the same proposals) as the Python runtime; n-gram table parity; tampered files refused."""
    tests = sorted(str(p.relative_to(WEB)) for p in (WEB / "test").glob("*.test.mjs"))
    out = run(["node", "--test", "--test-reporter=spec", *tests], cwd=WEB, env={"EDGESPEC_VECTORS": str(vectors)})
    print(out)
    assert "ℹ fail 0" in out and "ℹ pass 0" not in out
