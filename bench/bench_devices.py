"""The default CPU provider against OpenVINO's CPU device on the same static bundle, `ar` and `staged`.

OpenVINO takes the static (NPU-style) graphs, so both providers run the bundle exported with
`--device npu`. Run it with the interpreter of the OpenVINO environment from the README:

    .venv-openvino/bin/python bench/bench_devices.py --prompts 4 --write-docs
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import git_rev, machine, prompt_set, write_section

from edgespec.runtime.engine import Engine

PLACEMENTS = {"default CPU": "default-cpu", "OpenVINO CPU": "openvino-cpu",
              "draft OpenVINO, target default CPU": {"target": "default-cpu", "draft": "openvino-cpu"}}


def export_static(work: Path, quant: str) -> Path:
    out = work / f"smollm2-static-{quant}"
    if (out / "manifest.json").is_file():
        return out
    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    return export_bundle("default", out, options=ExportOptions(quant=quant, device="npu", static_chunk=16,
                                                               max_context=1024), parity=False, derive_layers=4,
                         ngram_tokens=2000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quant", default="fp32", choices=("fp32", "qdq"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work-dir", default="bench/.work")
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    bundle = export_static(Path(args.work_dir), args.quant)
    engines = {name: Engine.load(bundle, device=device, strict=True) for name, device in PLACEMENTS.items()}
    prompts = prompt_set("humaneval", args.prompts)
    speeds: dict[tuple[str, str], list[float]] = {}
    same = True
    for prompt in prompts:
        reference = None
        for name, engine in engines.items():
            for mode in ("ar", "staged"):
                r = engine.generate(prompt, max_new_tokens=args.max_new_tokens, chat=True, mode=mode)
                speeds.setdefault((name, mode), []).append(r.stats["tokens_per_second"])
                reference = reference or r.token_ids
                same &= r.token_ids == reference
    lines = ["| placement | ar tok/s | staged tok/s |", "|---|---|---|"]
    for name in engines:
        lines.append(f"| {name} | {statistics.median(speeds[(name, 'ar')]):.1f} | "
                     f"{statistics.median(speeds[(name, 'staged')]):.1f} |")
    verdict = ("greedy token ids identical across all placements and modes" if same else
               "greedy token ids differ between providers (fp32 numerics), see docs/speculative.md")
    print("\n".join(lines))
    print(verdict)
    if args.write_docs:
        write_section("devices", "\n".join([
            "## Execution providers: default CPU vs OpenVINO CPU", "",
            f"Machine: {machine()}. Commit {git_rev()}. Command: `.venv-openvino/bin/python bench/bench_devices.py "
            f"--prompts {args.prompts} --write-docs`. Static {args.quant} bundle (`--device npu`, chunks 1 and 16), "
            f"first {args.prompts} HumanEval prompts, {args.max_new_tokens} new tokens, medians; onnxruntime-openvino "
            "1.24.1 provides both providers in this run.", "", *lines, "", verdict + "."]),
            "\n".join([*lines, "", verdict + "."]))


if __name__ == "__main__":
    main()
