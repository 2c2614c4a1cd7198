"""The bundle loader under fuzzing (tests/fuzz/fuzz_bundle.py): every input loads or is a BundleError.

The corpus in tests/fuzz/corpus/ is replayed input by input, so a regression shows deterministically and names
its input; then atheris fuzzes from a copy of it for a bounded time (CI must not write into the repository).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent / "fuzz"
sys.path.insert(0, str(FUZZ))

from fuzz_bundle import CORPUS, Workspace, build_bundle, check  # noqa: E402

FUZZ_SECONDS = 60


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("fuzz")
    return Workspace(build_bundle(root), root)


@pytest.mark.parametrize("name", sorted(p.name for p in CORPUS.iterdir()))
def test_every_corpus_input_loads_or_is_a_bundle_error(workspace, name):
    check((CORPUS / name).read_bytes(), workspace)


@pytest.mark.parametrize("name", ["seed-manifest-valid", "seed-manifest-minimal", "seed-manifest-with-draft",
                                  "seed-tokenizer-valid", "seed-graph-valid"])
def test_the_valid_seeds_load(workspace, name):
    """The seed manifests record the tiny bundle's checksums; were they stale, every manifest input would stop at
    the checksum check and the fuzzer would explore little. Rebuild them with tests/fuzz/make_seeds.py."""
    assert check((CORPUS / name).read_bytes(), workspace) == "loaded"


def test_the_check_catches_an_exception_that_is_not_a_bundle_error(workspace, monkeypatch):
    """The replay can fail: a loader that lets a KeyError out (here from the tokenizer check) is caught."""
    from edgespec.runtime import text

    def broken(*_) -> None:
        raise KeyError("planted")

    monkeypatch.setattr(text, "_check_model", broken)
    with pytest.raises(KeyError, match="planted"):
        check((CORPUS / "seed-manifest-valid").read_bytes(), workspace)


def _from_a_fresh_process(argv: list[str]) -> list[str]:
    """`argv` run as the child of a small launcher, not of pytest. libFuzzer's out-of-memory check reads the
    process's peak RSS (getrusage), and Linux carries a parent's peak into a child it forks and through exec: late
    in a full run pytest has peaked at several GiB, and the fuzzer started from it saw 4.3 GiB before its first
    input and stopped at its 2 GiB limit. A grandchild starts its count afresh, so the limit bounds the fuzzer."""
    launcher = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    return [sys.executable, "-c", launcher, *argv]


def test_an_inherited_peak_does_not_reach_the_fuzzer(tmp_path):
    """The launcher above, checked: with this process's peak raised by 3 GiB the fuzzer still reports its own."""
    import numpy as np

    touched = np.ones(3 * 2 ** 30 // 8)
    argv = [sys.executable, str(FUZZ / "fuzz_bundle.py"), str(tmp_path), "-runs=0"]
    proc = subprocess.run(_from_a_fresh_process(argv), capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=os.environ | {"TMPDIR": str(tmp_path)})
    del touched
    rss = [int(line.rsplit("rss: ", 1)[1].removesuffix("Mb")) for line in proc.stderr.splitlines() if "rss: " in line]
    assert proc.returncode == 0 and rss and max(rss) < 2048, proc.stderr[-3000:]


def test_fuzzing_the_loader_finds_nothing(tmp_path):
    """atheris for FUZZ_SECONDS from the corpus; a crash fails with the fuzzer's report (the input and traceback)."""
    corpus = tmp_path / "corpus"
    shutil.copytree(CORPUS, corpus)
    argv = [sys.executable, str(FUZZ / "fuzz_bundle.py"), str(corpus), f"-max_total_time={FUZZ_SECONDS}",
            "-timeout=30", f"-artifact_prefix={tmp_path}/", "-print_final_stats=1"]
    env = os.environ | {"TMPDIR": str(tmp_path)}  # the workspace the fuzzer leaves behind goes there
    proc = subprocess.run(_from_a_fresh_process(argv), capture_output=True, text=True, timeout=FUZZ_SECONDS + 240,
                          cwd=tmp_path, env=env)
    # libFuzzer writes the input's file name on stderr, atheris the traceback on stdout; progress lines left out
    report = "\n".join(line for line in (proc.stderr + proc.stdout).splitlines()
                       if not line.startswith(("INFO: Instrumenting", "#", '"')))
    artifacts = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-", "leak-"))]
    assert proc.returncode == 0 and not artifacts and "Done" in proc.stderr, f"{artifacts}\n{report[-6000:]}"
