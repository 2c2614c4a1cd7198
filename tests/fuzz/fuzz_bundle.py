#!/usr/bin/env python3
"""Coverage-guided fuzzing of the bundle loader (atheris): every input loads, or is refused with a BundleError.

    python tests/fuzz/fuzz_bundle.py [corpus_dir] -max_total_time=60   # any of libFuzzer's flags

An input is one file of a tiny bundle (built once at start, in a temporary folder): its last byte chooses which
(value mod 3: manifest.json, tokenizer.json or the target graph), the bytes before it are that file's new content.
A changed tokenizer or graph gets its sha256 recorded in the manifest, as a careless re-export would, so that the
fuzzer reaches the parsers behind the checksums instead of stopping at them. The bundle is then opened with
`Engine.load`; one that opens must also generate two tokens, since a manifest that disagrees with its graph is to
be refused at load, not inside onnxruntime at the first pass (docs/reliability.md).

Any exception other than a BundleError at load (or a PromptError from the two-token request, for a tokenizer or
context that has no room for it) is a finding: it propagates, and atheris stops with the input that raised it.
`check` is the same promise without atheris, for tests/test_fuzz.py to replay the corpus.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MANIFEST, TOKENIZER, GRAPH = "manifest.json", "tokenizer.json", "target/fused.onnx"
TARGETS = (MANIFEST, TOKENIZER, GRAPH)
ENDINGS = b"\t\n "  # 9, 10 and 32 are 0, 1 and 2 mod 3: seeds choose their file with whitespace, and stay text
CORPUS = Path(__file__).parent / "corpus"
DICTIONARY = Path(__file__).parent / "bundle.dict"


def build_bundle(out: Path) -> Path:
    """The smallest bundle that runs: one layer, a 5-token vocabulary, 16 slots of context (head_dim 16, the
    smallest onnxruntime's GroupQueryAttention takes). Its files are the same on every build, so the seed
    manifests' checksums match them."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny import make_tiny_model_dir

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    model = make_tiny_model_dir(out / "model", chars="ab", layers=1, hidden=32, heads=2, kv_heads=1, intermediate=16)
    return export_bundle(str(model), out / "bundle", parity=False,
                         options=ExportOptions(quant="fp32", max_context=16, log=lambda _: None))


def split(data: bytes) -> tuple[str, bytes]:
    """Which bundle file an input replaces, and with what."""
    if not data:
        return MANIFEST, b""
    return TARGETS[data[-1] % len(TARGETS)], data[:-1]


def as_input(name: str, content: bytes) -> bytes:
    """The input that replaces the bundle file `name` with `content` (the inverse of `split`)."""
    return content + ENDINGS[TARGETS.index(name):][:1]


class Workspace:
    """A copy of the bundle whose fuzzed files are put back before each input, so every input starts from the
    same bundle (and a finding replays alone)."""

    def __init__(self, bundle: Path, root: Path):
        self.root = root / "work"
        shutil.copytree(bundle, self.root, ignore=shutil.ignore_patterns("cache"))
        self.pristine = {name: (self.root / name).read_bytes() for name in TARGETS}

    def write(self, data: bytes) -> None:
        """The bundle with the input's file in place; the cache (pass-size verdicts) from earlier inputs removed."""
        shutil.rmtree(self.root / "cache", ignore_errors=True)
        for name, content in self.pristine.items():
            (self.root / name).write_bytes(content)
        name, content = split(data)
        (self.root / name).write_bytes(content)
        if name != MANIFEST:
            manifest = json.loads(self.pristine[MANIFEST])
            manifest["files"][name] = hashlib.sha256(content).hexdigest()
            (self.root / MANIFEST).write_text(json.dumps(manifest))


def check(data: bytes, workspace: Workspace) -> str:
    """Load the bundle the input makes; returns "loaded" or the BundleError's message. Anything else raises."""
    from edgespec.runtime.bundle import BundleError
    from edgespec.runtime.engine import Engine, PromptError

    workspace.write(data)
    try:
        engine = Engine.load(workspace.root, threads=1, cache_optimized=False)
    except BundleError as exc:
        return str(exc)
    try:
        engine.generate("ab", max_new_tokens=2, mode="ar")
    except PromptError:
        pass
    return "loaded"


# What a JSON value is swapped for: every JSON type, edge numbers, and paths and text a loader must refuse.
ODD_VALUES = (None, True, False, 0, -1, 2, 10 ** 20, 1.5, float("inf"), float("nan"), "", "../x", "/etc/hosts",
              "\ud800", [], {}, [0], {"file": TOKENIZER})


def _slots(doc: object):
    """Every (container, key) pair of a JSON document, depth first."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield doc, key
        yield from _slots(value)


def _near(value: object, rng: random.Random) -> object:
    """A value of the same kind a little off: the other boolean, a number one off, larger or negated (a token id
    past the vocabulary, a layer too many), a path or text doubled or cut, a list or object emptied."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return rng.choice((value + 1, value - 1, -value, value * 1000 + 1, 2 ** 31))
    if isinstance(value, str):
        return rng.choice((value + value, value[:-1], "../" + value))
    return type(value)()


def mutate_json(data: bytes, rng: random.Random) -> bytes | None:
    """One change to the structure of the input's JSON file: a value set a little off or swapped for one of
    another type, an entry dropped, or a value put where another was. Byte flips rarely turn a false into a true
    or an object into a list in a 4 kB manifest without breaking the JSON first. None when the file is not JSON."""
    name, content = split(data)
    try:
        doc = json.loads(content)
    except ValueError:
        return None
    slots = list(_slots(doc))
    if not slots:
        return None
    parent, key = rng.choice(slots)
    change = rng.randrange(4)
    if change == 0:
        parent[key] = _near(parent[key], rng)
    elif change == 1:
        parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
    elif change == 2:
        del parent[key]
    else:
        other, other_key = rng.choice(slots)
        parent[key] = copy.deepcopy(other[other_key])
    return as_input(name, json.dumps(doc).encode())


def main() -> None:
    import atheris

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        """libFuzzer's byte mutations half the time, a structural JSON change the other half."""
        rng = random.Random(seed)
        try:
            changed = mutate_json(data, rng) if rng.random() < 0.5 else None
        except RecursionError:  # JSON nested too deep to walk or to write back
            changed = None
        return changed if changed is not None and len(changed) <= max_size else atheris.Mutate(data, max_size)

    with atheris.instrument_imports(include=["edgespec"]):
        import edgespec.runtime.engine  # noqa: F401  (and through it the bundle, model and tokenizer code)
    # libFuzzer ends the process with exit(), which skips Python's cleanup: the workspace (50 kB) stays behind in
    # $TMPDIR, where tests/test_fuzz.py points to its own temporary folder; the build's model and bundle go now.
    with tempfile.TemporaryDirectory(prefix="fuzz-bundle-") as build:
        workspace = Workspace(build_bundle(Path(build)), Path(tempfile.mkdtemp(prefix="fuzz-bundle-")))
    flags = [] if any(arg.startswith("-dict=") for arg in sys.argv) else [f"-dict={DICTIONARY}"]
    atheris.Setup(sys.argv + flags, lambda data: check(data, workspace), custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
