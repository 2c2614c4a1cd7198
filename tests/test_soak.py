"""The soak (bench/bench_soak.py) with fewer generations on a tiny bundle: memory, descriptors and threads stay flat.

Each run is its own process, so the RSS and descriptors it measures are the soak's alone, not pytest's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_soak import ANON_BOUND_MIB  # noqa: E402


def soak(work: Path, generations: int, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    report = work / f"soak-{generations}{''.join(flags)}.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_soak.py"), "--generations", str(generations),
                           "--work-dir", str(work), "--json", str(report), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.is_file(), proc.stderr[-3000:]
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("soak")  # the tiny bundle is built by the first run and reused by the second


def test_a_soak_of_every_mode_keeps_memory_descriptors_and_threads_flat(work):
    proc, result = soak(work, 80)
    warm, end = result["warm"], result["end"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result["warmed_up"] and not result["failures"]
    assert (end["anon"] - warm["anon"]) / 1024 <= ANON_BOUND_MIB
    assert (end["fds"], end["threads"]) == (warm["fds"], warm["threads"])
    # the workload the bound was checked on: every mode, chats past their full context, streams left half-read
    assert len(result["modes"]) == 7
    assert result["chats filled"] >= 2 and result["streams abandoned"] >= 8 and result["two-thread slots"] >= 4


def test_the_soak_fails_on_a_leak(work):
    """The negative control: 1 MiB and one open file kept per generation are reported and fail the run."""
    proc, result = soak(work, 60, "--leak-for-test")
    assert proc.returncode == 1
    failures = " ".join(result["failures"])
    assert "anonymous RSS grew" in failures and "fds:" in failures
