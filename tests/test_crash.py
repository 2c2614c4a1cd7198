"""Writers killed with SIGKILL (real processes, no cleanup runs): what they leave is either the old state or the new
one, never half of each, and the next run settles the rest. (Batch jobs: tests/test_batch.py; distillation's
checkpoints: tests/test_distill.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from edgespec.export.bundle import recover
from edgespec.runtime.bundle import load_manifest


def _export(model: Path, out: Path, quant: str) -> list[str]:
    return [sys.executable, "-m", "edgespec.export.cli", "--target", str(model), "--quant", quant, "--max-context",
            "128", "--no-draft", "--ngram-tokens", "300", "--out", str(out)]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_an_export_killed_at_any_point_leaves_the_old_bundle_or_the_new_one(tiny_dir, tmp_path):
    out = tmp_path / "bundle"
    subprocess.run(_export(tiny_dir, out, "fp32"), check=True, capture_output=True, timeout=600)
    seen = set()
    for delay in (1.0, 4.0, 8.0, 12.0):  # from loading the model to writing the n-gram table
        proc = subprocess.Popen(_export(tiny_dir, out, "int8"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        manifest = load_manifest(out)  # verifies every file's checksum: a complete bundle, old or new
        seen.add(manifest.target.quantization["method"])
    assert "fp32" in seen, "no kill landed before the new bundle was published"
    subprocess.run(_export(tiny_dir, out, "int8"), check=True, capture_output=True, timeout=600)
    assert load_manifest(out).target.quantization["method"] == "int8"
    assert _leftovers(out) == []  # staging directories of the killed exports are gone


def test_a_bundle_moved_aside_by_an_export_killed_mid_swap_comes_back(tiny_bundle, tmp_path):
    """The one moment a kill could leave nothing at --out: the old bundle moved aside, the new one not yet moved
    in. Staged by hand (a kill rarely lands in two renames), with a process id that no longer runs."""
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shutil.copytree(tiny_bundle, out.parent / f".bundle.old-{dead.pid}", ignore=shutil.ignore_patterns("cache"))
    (out.parent / f".bundle.partial-{dead.pid}").mkdir()
    recover(out)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((tiny_bundle / "manifest.json").read_text())
    assert _leftovers(out) == []
