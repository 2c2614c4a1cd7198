"""The bundle directory: manifest schema, checksum verification, and the errors for bad bundles.

A bundle is everything the runtime needs (graphs, tokenizer, chat template, manifest) and
nothing else. This module is shared by the exporter (which writes manifests) and the runtime
(which reads them), and so imports only the standard library and numpy-free code.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from edgespec.runtime.cache import CACHE_DIR

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FUSED_HEAD_DIM_MULTIPLE = 16  # onnxruntime's GroupQueryAttention, which fused graphs attend with, takes no other


class BundleError(Exception):
    """The bundle is missing, corrupt, or from an incompatible schema."""


class ChecksumError(BundleError):
    """A file in the bundle does not match the sha256 recorded in its manifest."""


class SchemaVersionError(BundleError):
    """The bundle was written by a newer (or unknown) manifest schema."""


@dataclass
class GraphInfo:
    """One ONNX graph of a model: which interface variant it implements and its I/O."""

    file: str
    variant: str  # "fused" (dynamic chunk, in-place KV) or "static" (fixed chunk, returns new KV)
    chunk: int | None
    inputs: list[dict]
    outputs: list[dict]
    data_file: str | None = None
    attention_rows: int = 1  # the graph pads attention to at least this many rows itself (bundles before it: 1)
    pass_size_invariant: bool = True  # False: an --ar-only target, whose one-row passes compute apart
    tree_mask: bool = True  # False: causal attention only, `attention_mask` is not read

    @cached_property
    def tail_logits(self) -> bool:
        """The graph takes `logits_from` and computes logits for the chunk's rows from there on (format 4 on).
        Cached: every chunk pass asks, and the graph's ~65 inputs do not change."""
        return any(i.get("name") == "logits_from" for i in self.inputs)

    @staticmethod
    def from_json(d: dict, where: str = "a graph") -> GraphInfo:
        """The graph's entry, its fields checked: the runtime reads them while opening and running the graph, where
        a mistyped one would surface as a TypeError or a bad padding, not as a bad bundle."""
        graph = GraphInfo(file=d["file"], variant=d["variant"], chunk=d.get("chunk"), inputs=d["inputs"],
                          outputs=d["outputs"], data_file=d.get("data_file"), attention_rows=d.get("attention_rows", 1),
                          pass_size_invariant=d.get("pass_size_invariant", True), tree_mask=d.get("tree_mask", True))
        _require(graph.variant in ("fused", "static"), f"{where} variant must be 'fused' or 'static'", graph.variant)
        _require(graph.chunk is None if graph.variant == "fused" else _count(graph.chunk),
                 f"{where} chunk must be null for a fused graph (any chunk), a positive integer for a static one",
                 graph.chunk)
        _require(_count(graph.attention_rows), f"{where} attention_rows must be a positive integer",
                 graph.attention_rows)
        for flag in ("pass_size_invariant", "tree_mask"):
            _require(isinstance(getattr(graph, flag), bool), f"{where} {flag} must be true or false",
                     getattr(graph, flag))
        for side in ("inputs", "outputs"):
            items = getattr(graph, side)
            _require(isinstance(items, list) and all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                     for i in items),
                     f"{where} {side} must be a list of objects with a name", items)
        return graph


@dataclass
class ModelInfo:
    """A model of the bundle (target or draft): its shape facts, quantization and graphs."""

    role: str
    spec: dict
    quantization: dict
    graphs: dict[str, GraphInfo]
    extra: dict = field(default_factory=dict)
    head_ids: np.ndarray | None = None  # a draft whose LM head covers only these token ids (logits in this order)

    @property
    def num_layers(self) -> int:
        return self.spec["num_layers"]

    @property
    def num_kv_heads(self) -> int:
        return self.spec["num_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self.spec["head_dim"]

    @property
    def vocab_size(self) -> int:
        return self.spec["vocab_size"]


@dataclass
class Manifest:
    root: Path
    max_context: int
    tokenizer: dict
    models: dict[str, ModelInfo]
    files: dict[str, str]
    raw: dict

    @property
    def target(self) -> ModelInfo:
        return self.models["target"]

    @property
    def draft(self) -> ModelInfo | None:
        return self.models.get("draft")

    def path(self, rel: str) -> Path:
        return self.root / inside(self.root, rel, "a bundle file")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(root: str | Path, verify: bool = True) -> Manifest:
    """Read `manifest.json`, check its schema version and (by default) every file's sha256."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle directory not found: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{root} is not an edgespec bundle: {MANIFEST} is missing")
    try:
        raw = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise BundleError(f"{mpath} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{mpath} must hold a JSON object, not a JSON {type(raw).__name__}")
    version = raw.get("schema_version")
    if not isinstance(version, int):
        raise SchemaVersionError(f"{mpath} has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(f"bundle schema version {version} is newer than this edgespec "
                                 f"supports ({SCHEMA_VERSION}); upgrade edgespec or re-export the bundle")
    if version < 1:
        raise SchemaVersionError(f"bundle schema version {version} is not a known version")
    try:
        check_files(root, raw)
        models = {role: _model(root, role, m) for role, m in raw["models"].items()}
        if "target" not in models:
            raise BundleError(f"{mpath} has no target model")
        _check_tokenizer(raw["tokenizer"], models["target"].vocab_size)
        _check_tuning(raw)
        manifest = Manifest(root=root, max_context=_max_context(raw), tokenizer=raw["tokenizer"],
                            models=models, files=raw["files"], raw=raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(f"{mpath} is missing or has a malformed field: {exc!r}") from exc
    if verify:
        verify_files(manifest)
    return manifest


def _require(ok: bool, what: str, value: object) -> None:
    """A BundleError saying what a manifest field must be and what it is (cut short: it may be huge)."""
    if not ok:
        raise BundleError(f"the manifest's {what}, got {value!r:.80}")


def _count(value: object) -> bool:
    """A positive integer; JSON's true is not one (Python's bool is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> bool:
    """A str the tokenizers library can take: UTF-8 text, no lone surrogates (JSON's "\\ud800" gives one)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _model(root: Path, role: str, m: dict) -> ModelInfo:
    """A model's entry, with the fields the runtime reads later checked now: there, a missing or mistyped one
    would be a KeyError or TypeError in the middle of opening a graph or of a generation."""
    spec, graphs = m["spec"], m["graphs"]
    for key in ("num_layers", "num_kv_heads", "head_dim", "vocab_size"):
        _require(_count(spec.get(key)), f"{role} spec's {key} must be a positive integer", spec.get(key))
    _require(spec.get("param_count") is None or _number(spec["param_count"]),
             f"{role} spec's param_count must be a number", spec.get("param_count"))
    _require(isinstance(graphs, dict) and bool(graphs), f"{role} must name its graphs", graphs)
    infos = {name: GraphInfo.from_json(g, f"{role} graph {name!r}") for name, g in graphs.items()}
    _require(spec["head_dim"] % FUSED_HEAD_DIM_MULTIPLE == 0 or all(g.variant != "fused" for g in infos.values()),
             f"{role} spec's head_dim must be a multiple of {FUSED_HEAD_DIM_MULTIPLE} for fused graphs",
             spec["head_dim"])
    return ModelInfo(role=role, spec=spec, quantization=m["quantization"], graphs=infos,
                     extra=m.get("extra", {}), head_ids=_head_ids(root, m.get("head_ids"), spec["vocab_size"]))


def _check_tokenizer(t: dict, vocab_size: int) -> None:
    """The tokenizer entry's optional fields, which the tokenizer and the generation loop read as typed."""
    for key in ("chat_template", "bos_token", "eos_token"):
        _require(t.get(key) is None or _text(t[key]), f"tokenizer {key} must be text", t.get(key))
    ids = t.get("eos_token_ids", [])
    _require(isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size
                                           for i in ids),
             f"tokenizer eos_token_ids must be a list of token ids below {vocab_size}", ids)
    _require(isinstance(t.get("add_bos", False), bool), "tokenizer add_bos must be true or false", t.get("add_bos"))


def _check_tuning(raw: dict) -> None:
    """What export and calibration measured, which seeds the adaptive modes: the draft's agreement (a fraction)
    and the EAD threshold (bits)."""
    runtime, draft = raw.get("runtime", {}), raw["models"].get("draft", {})
    _require(isinstance(runtime, dict) and isinstance(runtime.get("ead", {}), dict),
             "runtime must be an object whose ead is an object", runtime)
    tau = runtime.get("ead", {}).get("tau")
    _require(tau is None or _number(tau), "runtime ead tau must be a number", tau)
    measured = draft.get("measured", {})
    _require(isinstance(measured, dict), "draft measured must be an object", measured)
    agreement = measured.get("agreement")
    _require(agreement is None or _number(agreement) and 0 <= agreement <= 1,
             "draft measured agreement must be a fraction from 0 to 1", agreement)


def inside(root: Path, rel: object, what: str) -> str:
    """`rel`, if it names a path inside the bundle folder: a manifest naming `../../x.onnx`, an absolute path or
    a symbolic link leading out of the folder is refused before anything is opened."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{what} must be a path relative to the bundle folder, got {rel!r}")
    if Path(rel).is_absolute() or ".." in Path(rel).parts \
            or not (root / rel).resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{what} {rel!r} points outside the bundle folder {root}")
    return rel


def check_files(root: Path, raw: dict) -> None:
    """Every path the manifest names stays inside the bundle, and every file it reads is one of `files`, whose
    checksums are verified: a graph missing from `files` would otherwise reach onnxruntime unverified."""
    files = raw["files"]
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BundleError("the manifest's files must map each file to its sha256")
    for rel in files:
        inside(root, rel, "a file in the manifest's files")
    for rel, what in _read_files(raw).items():
        inside(root, rel, what)
        if rel not in files:
            raise BundleError(f"{what} {rel!r} is not in the manifest's files, so its checksum cannot be verified; "
                              "re-export the bundle")
    graphs = [graph["file"] for model in raw["models"].values() for graph in model["graphs"].values()]
    _check_beside_graphs(root, graphs, files)


def _check_beside_graphs(root: Path, graphs: list[str], files: dict) -> None:
    """No file the manifest leaves out sits in a graph's folder. A graph names its external weights itself, and
    onnxruntime reads them from the graph's folder (or below it) whatever the manifest says: a weights file the
    manifest does not list would be read without its checksum."""
    for folder in sorted({(root / rel).parent for rel in graphs}):
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if path.is_file() and rel not in files and rel != MANIFEST and rel.split("/")[0] != CACHE_DIR:
                raise BundleError(f"{rel} sits beside the graphs, where onnxruntime may read it as weights, but the "
                                  "manifest's files does not list it, so its checksum cannot be verified; remove it "
                                  "or re-export the bundle")


def _read_files(raw: dict) -> dict[str, str]:
    """The files a runtime reads, by what each is."""
    named = {raw["tokenizer"]["file"]: "the tokenizer"}
    for role, model in raw["models"].items():
        for name, graph in model["graphs"].items():
            named[graph["file"]] = f"the {role} graph {name!r}"
            if graph.get("data_file"):
                named[graph["data_file"]] = f"the {role} graph {name!r}'s weights"
        if model.get("head_ids"):
            named[model["head_ids"]] = f"the {role}'s head token ids"
    if raw.get("ngram"):
        named[raw["ngram"]["file"]] = "the n-gram table"
    return named


def _max_context(raw: dict) -> int:
    """The KV buffer's slots: an integer of at least 2 (a prompt token and a new one) that the graphs' own
    K/V inputs, as the manifest records them, agree with (the runtime allocates the whole buffer up front)."""
    value = raw["max_context"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise BundleError(f"max_context must be an integer >= 2, got {value!r}")
    for role, model in raw["models"].items():
        for name, graph in model["graphs"].items():
            for item in graph["inputs"]:
                shape = item.get("shape") if item.get("name", "").startswith("past_key") else None
                if shape and len(shape) == 4 and isinstance(shape[2], int) and shape[2] != value:
                    raise BundleError(f"max_context is {value} but the {role} graph {name!r} holds K/V for "
                                      f"{shape[2]} tokens")
    return value


def verify_files(manifest: Manifest) -> None:
    """Every recorded file exists with the recorded hash; raises ChecksumError naming the first bad one."""
    for rel, expected in sorted(manifest.files.items()):
        path = manifest.root / rel
        if not path.is_file():
            raise BundleError(f"bundle file missing: {rel}")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(f"checksum mismatch for {rel}: the file was changed or corrupted "
                                f"(expected sha256 {expected[:12]}…, got {actual[:12]}…)")


def _head_ids(root: Path, rel: str | None, vocab_size: int) -> np.ndarray | None:
    if rel is None:
        return None
    try:
        ids = np.load(root / inside(root, rel, "the head token ids"), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read the draft's head token ids {rel}: {exc}") from exc
    if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= vocab_size or np.any(np.diff(ids) <= 0):
        raise BundleError(f"{rel} must hold increasing token ids below {vocab_size}")
    return ids.astype(np.int64)

