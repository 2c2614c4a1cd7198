"""Write a bundle: graphs per model, tokenizer, chat template, manifest with checksums — atomically.

Everything is written into a temporary sibling directory and renamed onto `--out` at the end,
so an error or a kill halfway never leaves a half-written bundle where a bundle is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edgespec.export.errors import ExportError
from edgespec.export.graph import build_decoder
from edgespec.export.sources import LoadedModel
from edgespec.runtime.bundle import FUSED_HEAD_DIM_MULTIPLE, MANIFEST, SCHEMA_VERSION, sha256_file
from edgespec.runtime.cache import CACHE_DIR

QUANT_CHOICES = ("fp32", "fp16", "int8", "int4", "w8a8", "qdq")
# Bumped whenever exported graphs change for the same options (3: causal fused targets and 8-bit embedding
# tables, 2026-11-25; 4: fused graphs compute logits from row `logits_from` on, 2026-12-01), so a benchmark's
# reused bundle from older code is rebuilt instead of measured.
GRAPH_FORMAT = 4


@dataclass
class ExportOptions:
    quant: str = "int4"
    max_context: int = 2048
    device: str = "cpu"  # cpu: dynamic fused graph; npu: static graphs (decode chunk 1 + verify chunk)
    static_chunk: int = 16
    block_size: int = 32
    lm_head_bits: int = 8  # RTN quantization of the LM head (int4/int8); GGUF-exact bundles keep the file's
    gguf_exact: bool = True
    # Target graph for plain decoding only: attention is not padded to two rows and takes no tree mask,
    # so one-token passes take GroupQueryAttention's faster path, whose logits differ from multi-row passes.
    ar_only: bool = False
    qdq_activations: str = "uint16"
    log: Callable[[str], None] = print
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ExportError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}")
        if not isinstance(self.max_context, int) or self.max_context <= 0:
            raise ExportError(f"--max-context must be a positive integer, got {self.max_context}")
        if self.device not in ("cpu", "npu"):
            raise ExportError(f"--device must be cpu or npu, got {self.device!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ExportError(f"--block-size must be one of 16, 32, 64, 128, 256, got {self.block_size}")
        if self.lm_head_bits not in (4, 8):
            raise ExportError(f"--lm-head-bits must be 4 or 8, got {self.lm_head_bits}")
        if self.static_chunk < 1 or self.static_chunk > self.max_context:
            raise ExportError(f"--static-chunk must be in 1..max_context, got {self.static_chunk}")
        if self.quant == "qdq" and self.device != "npu":
            raise ExportError("--quant qdq makes static QDQ graphs for NPUs: use it with --device npu")
        if self.device == "npu" and self.quant in ("int8", "int4", "w8a8"):
            raise ExportError("NPU providers cannot run MatMulNBits or MatMulIntegerToFloat (int8/int4/w8a8) "
                              "graphs: use --quant qdq, fp16 or fp32")


def check_head_dim(loaded: LoadedModel, role: str, options: ExportOptions) -> None:
    """CPU graphs attend with onnxruntime's GroupQueryAttention, which takes head sizes in multiples of 16 only;
    refused before any graph is written rather than at the first generation. NPU graphs use plain operators."""
    head_dim = loaded.spec.head_dim
    if options.device != "npu" and head_dim % FUSED_HEAD_DIM_MULTIPLE:
        raise ExportError(f"the {role}'s attention heads have {head_dim} dimensions; onnxruntime's fused attention "
                          f"(CPU graphs) needs a multiple of {FUSED_HEAD_DIM_MULTIPLE}. `--device npu` writes "
                          "plain-operator graphs that take any head size (slower on a CPU)")


def check_same_vocabulary(target: LoadedModel, draft: LoadedModel) -> None:
    """Speculation compares token ids, so draft and target must map every id to the same string."""
    tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if tv != dv or target.spec.vocab_size != draft.spec.vocab_size:
        only_t = len(set(tv.items()) - set(dv.items()))
        only_d = len(set(dv.items()) - set(tv.items()))
        raise ExportError(
            f"the draft's vocabulary differs from the target's ({len(dv)} vs {len(tv)} tokens, "
            f"{only_t} target and {only_d} draft id/string pairs not shared; logits {draft.spec.vocab_size} vs "
            f"{target.spec.vocab_size}): speculative decoding needs a draft with the target's tokenizer")


def graph_plan(options: ExportOptions) -> dict[str, tuple[str, int | None]]:
    """Graph name → (variant, chunk). CPU gets one dynamic fused graph; NPUs get fixed decode and verify shapes."""
    if options.device == "cpu":
        return {"fused": ("fused", None)}
    return {"static-1": ("static", 1), f"static-{options.static_chunk}": ("static", options.static_chunk)}


def _quantize(model: onnx.ModelProto, loaded: LoadedModel, variant: str, options: ExportOptions,
              calibration: Callable[[onnx.ModelProto], object] | None) -> tuple[onnx.ModelProto, dict]:
    q = options.quant
    if q == "fp32":
        return model, {"method": "fp32"}
    if q == "fp16":
        from edgespec.quant.fp16 import to_fp16
        return to_fp16(model), {"method": "fp16"}
    if q == "qdq":
        from edgespec.quant.qdq import quantize_qdq
        feeds = calibration(model) if calibration else None
        return (quantize_qdq(model, feeds, activation_type=options.qdq_activations),
                {"method": "qdq", "activations": options.qdq_activations, "weights": "uint8"})
    from edgespec.quant.embedding import quantize_embedding

    if q == "w8a8":
        from edgespec.quant.rowwise import quantize_rowwise
        from edgespec.quant.smooth import ALPHA
        model, embedding = quantize_embedding(quantize_rowwise(model))
        return model, {"method": "w8a8", "weights": "int8 per output channel (RTN)",
                       "activations": "int8 per row (dynamic)", "smoothing": f"SmoothQuant, alpha {ALPHA}",
                       **embedding}
    bits = 4 if q == "int4" else 8
    if options.gguf_exact and loaded.gguf_path is not None:
        from edgespec.quant.gguf_exact import UnsupportedGGUFError, carry_gguf_blocks
        try:
            model, info = carry_gguf_blocks(model, loaded.gguf_path, loaded.spec, min_bits=bits)
            model = _rtn_rest(model, bits, options, info)
            model, embedding = quantize_embedding(model, exact_only=True)
            return model, {"method": q, **info, **embedding}
        except (UnsupportedGGUFError, ExportError) as exc:
            options.log(f"note: GGUF blocks not carried over exactly ({exc}); re-quantizing with RTN")
    from edgespec.quant.weight_only import quantize_weight_only
    model = quantize_weight_only(model, bits=bits, block_size=options.block_size, accuracy_level=4,
                                 lm_head_bits=options.lm_head_bits)
    model, embedding = quantize_embedding(model)
    return model, {"method": q, "weights": "rtn", "bits": bits, "block_size": options.block_size,
                   "lm_head_bits": options.lm_head_bits, "accuracy_level": 4, **embedding}


def _rtn_rest(model: onnx.ModelProto, bits: int, options: ExportOptions, info: dict) -> onnx.ModelProto:
    """RTN-quantize the linears whose GGUF blocks could not be carried (F16, BF16, other block types), noting it."""
    from edgespec.quant.weight_only import quantize_weight_only, quantized_linear_names

    rest = quantized_linear_names(model)
    if not rest:
        return model
    options.log(f"note: {len(rest)} linears re-quantized with RTN ({info['linears'][rest[0]]['rtn']}, ...)")
    for name in rest:
        info["linears"][name]["rtn"] += f"; RTN {options.lm_head_bits if name == 'lm_head' else bits}-bit"
    return quantize_weight_only(model, bits=bits, block_size=options.block_size, accuracy_level=4,
                                lm_head_bits=options.lm_head_bits)


def _smoothed_weights(loaded: LoadedModel, rope, options: ExportOptions) -> dict[str, np.ndarray]:
    """W8A8 rounds each activation row with one scale: first move outlier channels into the weights
    (quant/smooth.py), calibrated on distillation prompts (none of the benchmarks' or parity's prompts)."""
    from edgespec.export.derive import calibration_tokens
    from edgespec.export.distill_prompts import CODE_TASKS, PROSE_TASKS
    from edgespec.quant.smooth import activation_maxima, smooth_weights

    token_lists = calibration_tokens(loaded.tokenizer, CODE_TASKS[:4] + PROSE_TASKS[:4])
    fp32 = build_decoder(loaded.spec, loaded.weights, rope, options.max_context)
    return smooth_weights(loaded.weights, loaded.spec, activation_maxima(fp32, token_lists))


def _io(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": dims})
        return out
    return describe(model.graph.input), describe(model.graph.output)


def write_model_graphs(loaded: LoadedModel, role: str, root: Path, options: ExportOptions,
                       calibration: Callable | None = None) -> dict:
    """Build, quantize and save each graph of one model; returns its manifest entry."""
    rope = loaded.rope(options.max_context)
    tie = options.quant == "fp32" or options.quant == "fp16"
    entry: dict = {"source": loaded.source, "spec": loaded.spec.to_json(), "graphs": {}, "quantization": {}}
    notes = sorted({table.note for table in rope.values() if table.note})
    if notes:  # a choice the fixed buffer forced (longrope's factor set)
        entry["rope_notes"] = notes
        for note in notes:
            options.log(f"{role}: {note}")
    (root / role).mkdir(parents=True, exist_ok=True)
    if loaded.head_ids is not None:
        np.save(root / role / "head_ids.npy", loaded.head_ids.astype(np.int64))
        entry["head_ids"] = f"{role}/head_ids.npy"
    weights = _smoothed_weights(loaded, rope, options) if options.quant == "w8a8" else loaded.weights
    for name, (variant, chunk) in graph_plan(options).items():
        t0 = time.perf_counter()
        # a fused target pads attention to two rows itself (pass-size invariance, see runtime/model.py)
        invariant = not (options.ar_only and role == "target")
        rows = 2 if role == "target" and variant == "fused" and invariant else 1
        # Only the draft runs tree passes; the target verifies a path (docs/speculative.md), so a fused target
        # is causal and skips building and adding the tree bias, with bitwise the same logits for causal passes.
        tree_mask = not (role == "target" and variant == "fused")
        model = build_decoder(loaded.spec, weights, rope, options.max_context, variant, chunk,
                              tie_lm_head=tie, attention_rows=rows, tree_mask=tree_mask)
        model, qinfo = _quantize(model, loaded, variant, options, calibration)
        rel = f"{role}/{name}.onnx"
        onnx.save_model(model, str(root / rel), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{name}.onnx.data", size_threshold=1024)
        inputs, outputs = _io(model)
        entry["graphs"][name] = {"file": rel, "data_file": f"{role}/{name}.onnx.data", "variant": variant,
                                 "chunk": chunk, "attention_rows": rows, "pass_size_invariant": invariant,
                                 "tree_mask": tree_mask, "inputs": inputs, "outputs": outputs}
        entry["quantization"] = qinfo
        size = (root / rel).stat().st_size + (root / f"{role}/{name}.onnx.data").stat().st_size
        options.log(f"{role}/{name}: {size / 1e6:.1f} MB ({qinfo.get('method')}"
                    f"{', ' + qinfo['weights'] if 'weights' in qinfo else ''}) in {time.perf_counter() - t0:.1f}s")
    return entry


def write_tokenizer(loaded: LoadedModel, root: Path) -> dict:
    tok = loaded.tokenizer
    tok.backend_tokenizer.save(str(root / "tokenizer.json"))
    eos_ids = list(loaded.spec.eos_token_ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in eos_ids:
        eos_ids.append(tok.eos_token_id)
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if template:
        (root / "chat_template.jinja").write_text(template)
    return {"file": "tokenizer.json", "chat_template": template, "bos_token": tok.bos_token,
            "eos_token": tok.eos_token, "eos_token_ids": eos_ids,
            "add_bos": bool(getattr(tok, "add_bos_token", False)),
            "special_tokens": {k: v for k, v in tok.special_tokens_map.items() if isinstance(v, str)}}


def finalize(root: Path, manifest: dict) -> None:
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith("cache/"):
            files[rel] = sha256_file(path)
    manifest["files"] = files
    manifest["schema_version"] = SCHEMA_VERSION
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / MANIFEST)


def staging_dir(out: Path) -> Path:
    """A fresh sibling of `out` to build in; same filesystem, so the final rename is atomic. What a killed export
    left beside `out` is settled first (`recover`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def recover(out: Path) -> None:
    """Undo what an export killed with SIGKILL (no cleanup runs) left beside `out`: its unfinished staging
    directories are removed, and if it died between moving the old bundle aside and moving the new one in, the
    old bundle goes back to `out` (only once no live process owns it)."""
    for leftover in sorted(out.parent.glob(f".{out.name}.partial-*")) + sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue  # another export is writing it right now
        if ".old-" in leftover.name and not out.exists() and (leftover / MANIFEST).is_file():
            os.replace(leftover, out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def publish(tmp: Path, out: Path) -> None:
    """Move the finished bundle onto `out`, replacing an older bundle only once the new one is complete.

    The export's own runs (parity, n-gram text) leave measurements in `cache/`; they describe this machine
    (optimized graphs, pass costs, the pass-size verdict), so they are dropped: the machine that runs the
    bundle measures its own.
    """
    shutil.rmtree(tmp / CACHE_DIR, ignore_errors=True)
    if out.exists():
        if not (out / MANIFEST).is_file() and any(out.iterdir()):
            raise ExportError(f"{out} exists and is not an edgespec bundle; refusing to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
