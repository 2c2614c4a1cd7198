"""How the code is laid out: which subpackage may import which, and how long a runtime function may be.

The runtime and the device layer run on a phone or a laptop without torch or onnx, so they never import
`export` or `quant`; the device layer is below the runtime (the runtime places its models through it).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"runtime": {"export", "quant"}, "devices": {"export", "quant", "runtime"}, "quant": {"export"}}
SUBPACKAGES = list(FORBIDDEN)


def modules(package: str) -> list[str]:
    return [f"edgespec.{package}.{path.stem}" for path in sorted((ROOT / package).glob("*.py"))]


def imported_subpackages(path: Path) -> set[str]:
    """Every edgespec subpackage a module names in an import statement, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
            [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        found |= {name.split(".")[1] for name in names if name.startswith("edgespec.")}
    return found


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_importing_every_module_of_a_subpackage_loads_none_it_must_not(package):
    code = ("import importlib, json, sys\n"
            "for name in json.loads(sys.argv[1]): importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('edgespec.')})))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(modules(package))], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not set(json.loads(proc.stdout)) & FORBIDDEN[package]


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_no_module_names_a_subpackage_it_must_not_even_in_a_function(package):
    offending = {path.name: sorted(imported_subpackages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).glob("*.py"))}
    assert not {name: subs for name, subs in offending.items() if subs}


def test_no_runtime_function_is_longer_than_60_lines():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / "runtime").glob("*.py")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 60]
    assert not long


def test_no_file_cites_design_notes_outside_the_repository():
    """Code and docs cite what a reader of the repository can open: the team's design notes are not part of it."""
    names = ("feasibility.md", "decoding-algorithms.md", "peer-runtimes.md", "sample-apps.md", "shared/design")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    citing = [rel for rel in tracked if rel.endswith((".py", ".md", ".js", ".html", ".toml", ".sh"))
              and rel != "tests/test_imports.py"
              and any(name in (ROOT / rel).read_text(errors="replace") for name in names)]
    assert not citing, citing
