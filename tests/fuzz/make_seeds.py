"""Write the inputs of tests/fuzz/corpus/ (`seed-*` and `bug-*`) from a freshly built fuzz bundle.

    python tests/fuzz/make_seeds.py

Seeds are the valid bundle's files and manifests broken in the ways a fuzzer takes long to find by flipping bytes:
not an object, wrong types, paths leading out of the bundle, huge numbers, unicode, deep nesting. `bug-*` inputs
reproduce the loader bugs found while fuzzing, one each; all but two are written here: the fuzzer's own crash inputs
`bug-tokenizer-word-level-without-unknown` and `bug-tokenizer-unknown-token-only-added` are kept as it found them
(they replace tokenizer.json, so the valid bundle's changes do not make them stale). The `fuzzed-*` inputs are the
fuzzer's own (picked with libFuzzer's -merge=1 from long runs) and are not written here. Run this again when the
tiny bundle's files change: tests/test_fuzz.py then fails on the valid seeds, whose checksums are stale.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from fuzz_bundle import CORPUS, GRAPH, MANIFEST, TOKENIZER, as_input, build_bundle


def _graph(raw: dict) -> dict:
    return raw["models"]["target"]["graphs"]["fused"]


def _at(raw: dict, path: str) -> tuple[dict | list, str | int]:
    """The container of the field at `path` (keys and list indices joined by '/') and its key there."""
    *parents, last = path.split("/")
    node = raw
    for key in parents:
        node = node[int(key) if isinstance(node, list) else key]
    return node, int(last) if isinstance(node, list) else last


def _with(path: str, value: object) -> Callable[[dict], dict]:
    """The manifest with the field at `path` set to `value`."""
    def change(raw: dict) -> dict:
        node, key = _at(raw, path)
        node[key] = value
        return raw
    return change


def _without(path: str) -> Callable[[dict], dict]:
    """The manifest without the field at `path`."""
    def change(raw: dict) -> dict:
        node, key = _at(raw, path)
        del node[key]
        return raw
    return change


def _graph_with(**fields: object) -> Callable[[dict], dict]:
    """The manifest with the target graph's `fields` changed."""
    def change(raw: dict) -> dict:
        _graph(raw).update(fields)
        return raw
    return change


def _draft(raw: dict) -> dict:
    """A draft model that is the target itself: a valid bundle in which speculation can run."""
    raw["models"]["draft"] = copy.deepcopy(raw["models"]["target"]) | {"measured": {"agreement": 0.5}}
    return raw


def _escape(raw: dict) -> dict:
    raw["files"]["../../x.onnx"] = raw["files"].pop(GRAPH)
    _graph(raw)["file"] = "../../x.onnx"
    return raw


def _unicode(raw: dict) -> dict:
    """The tokenizer's path with a right-to-left override and a lone surrogate (no file system takes that)."""
    raw["files"]["tökenizer\u202e\ud800.json"] = raw["files"].pop(TOKENIZER)
    raw["tokenizer"]["file"] = "tökenizer\u202e\ud800.json"
    return raw


def _minimal(raw: dict) -> dict:
    """Only the fields the runtime reads: a structural mutation then lands on one of them more often."""
    target = raw["models"]["target"]
    spec = {key: target["spec"][key] for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size")}
    graph = _graph(raw) | {"outputs": []}
    graph["inputs"] = [i if i["name"].startswith("past_") else {"name": i["name"]} for i in graph["inputs"]]
    tokenizer = {key: raw["tokenizer"][key] for key in ("file", "eos_token", "eos_token_ids")}
    return {"schema_version": 1, "max_context": raw["max_context"], "files": raw["files"], "tokenizer": tokenizer,
            "models": {"target": {"spec": spec, "quantization": {}, "graphs": {"fused": graph}}}}


MANIFESTS: dict[str, Callable[[dict], object]] = {
    "valid": lambda raw: raw,
    "minimal": _minimal,
    "with-draft": _draft,
    "a-list": lambda raw: [raw],
    "a-string": lambda raw: "bundle",
    "schema-only": lambda raw: {"schema_version": 1},
    "nulls": lambda raw: {key: None for key in raw} | {"schema_version": 1},
    "max-context-text": _with("max_context", "16"),
    "max-context-huge": _with("max_context", 10 ** 30),
    "layers-text": _with("models/target/spec/num_layers", "1"),
    "layers-huge": _with("models/target/spec/num_layers", 10 ** 12),
    "vocab-float": _with("models/target/spec/vocab_size", 5.0),
    "graph-outside": _escape,
    "tokenizer-absolute": _with("tokenizer/file", "/etc/hosts"),
    "unicode-paths": _unicode,
    "static-chunk-zero": _graph_with(variant="static", chunk=0),
    "inputs-a-dict": _with("models/target/graphs/fused/inputs", {"name": "past_key.0"}),
    "head-ids-not-npy": _with("models/target/head_ids", TOKENIZER),
    "ngram-not-a-table": _with("ngram", {"file": TOKENIZER}),
    "runtime-a-list": _with("runtime", [{"ead": {"tau": "x"}}]),
    "eos-ids-text": _with("tokenizer/eos_token_ids", "2"),
    "eos-lone-surrogate": _with("tokenizer/eos_token", "\ud800"),
}


def _tokenizer_id(data: bytes) -> bytes:
    """tokenizer.json with the token "a" at id 1000, past the model's 5: onnxruntime's embedding gather fails."""
    tokenizer = json.loads(data)
    tokenizer["model"]["vocab"]["a"] = 1000
    return json.dumps(tokenizer, indent=1).encode()


# One input per finding (the fuzzer's or found while fixing one), each now a BundleError: `bug-<what>`.
BUGS: dict[str, Callable[[dict], object]] = {
    "spec-without-num-kv-heads": _without("models/target/spec/num_kv_heads"),
    "fused-graph-with-a-chunk": _graph_with(chunk=1),
    "fused-graph-called-static": _graph_with(variant="static", chunk=2),
    "inputs-without-logits-from": _without("models/target/graphs/fused/inputs/6"),
}


def write_seeds(bundle: Path, corpus: Path) -> list[Path]:
    """The seed files, each a bundle file's content followed by the byte that chooses it (fuzz_bundle.split)."""
    raw = json.loads((bundle / MANIFEST).read_text())
    raw["created"], raw["models"]["target"]["source"] = "2026-01-01T00:00:00Z", "tests/tiny.py"
    seeds = {f"seed-manifest-{name}": (MANIFEST, json.dumps(change(copy.deepcopy(raw)), indent=1).encode())
             for name, change in MANIFESTS.items()}
    seeds |= {f"bug-{name}": (MANIFEST, json.dumps(change(copy.deepcopy(raw)), indent=1).encode())
              for name, change in BUGS.items()}
    seeds["bug-tokenizer-id-past-the-vocabulary"] = (TOKENIZER, _tokenizer_id((bundle / TOKENIZER).read_bytes()))
    seeds["seed-manifest-deeply-nested"] = (MANIFEST, b"[" * 3000 + b"]" * 3000)
    seeds["seed-manifest-not-utf8"] = (MANIFEST, b'{"schema_version": 1, "\xff": 1}')
    seeds["seed-manifest-empty"] = (MANIFEST, b"")
    for label, name in (("tokenizer", TOKENIZER), ("graph", GRAPH)):
        data = (bundle / name).read_bytes()
        seeds[f"seed-{label}-valid"] = (name, data)
        seeds[f"seed-{label}-truncated"] = (name, data[:len(data) // 2])
    corpus.mkdir(parents=True, exist_ok=True)
    written = []
    for seed, (name, content) in seeds.items():
        (corpus / seed).write_bytes(as_input(name, content))
        written.append(corpus / seed)
    return written


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_seeds(build_bundle(Path(tmp)), CORPUS):
            print(f"{path.stat().st_size:8d}  {path.name}")
