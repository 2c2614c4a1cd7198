"""`edgespec batch` and `edgespec.batch.run` on the tiny model pair: resuming after SIGKILL and after a torn last
line, the same records with 1 or 2 workers (greedy and seeded sampling) and on a local Ray instance, and a record
that cannot run getting an error line while the job goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgespec

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _records(n: int, **extra) -> list[dict]:
    """Prompts that differ from record to record (so a record in the wrong place shows), some as chat messages."""
    records = []
    for i in range(n):
        text = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 5))
        record = {"id": f"r{i}", **extra}
        if i % 3 == 2:
            record["messages"] = [{"role": "user", "content": text}]
        else:
            record["prompt"] = text
        records.append(record)
    return records


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _batch(bundle: Path, src: Path, out: Path, *args: str, wait: bool = True, timeout: float = 600):
    argv = [sys.executable, "-m", "edgespec.runtime.cli", "batch", "--bundle", str(bundle), str(src), str(out), *args]
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def _by_id(path: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), f"ids written twice: {sorted(i for i in ids if ids.count(i) > 1)}"
    return {line["id"]: line for line in lines}


def _texts(by_id: dict[str, dict]) -> dict[str, tuple]:
    return {i: (r.get("text"), tuple(r.get("token_ids", ())), r.get("error")) for i, r in by_id.items()}


@pytest.fixture(scope="module")
def reference(tiny_pair_bundle, tmp_path_factory):
    """An uninterrupted run of 120 records (greedy, the default mode) through the command line."""
    root = tmp_path_factory.mktemp("batch")
    src = _write(root / "in.jsonl", _records(120))
    out = root / "reference.jsonl"
    proc = _batch(tiny_pair_bundle, src, out, "--max-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert "120 records (0 errors, 0 already done)" in proc.stderr
    return src, _by_id(out)


def test_reference_run_has_every_record_once_with_text_and_stats(reference):
    _, ref = reference
    assert sorted(ref) == sorted(f"r{i}" for i in range(120))
    for r in ref.values():
        assert r["token_ids"] and r["finish_reason"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] == len(r["token_ids"])
        assert r["stats"]["mode"] == "auto" and r["stats"]["target_passes"] >= 1


def test_sigkill_mid_run_then_resume_gives_every_record_once(reference, tiny_pair_bundle, tmp_path):
    src, ref = reference
    out = tmp_path / "out.jsonl"
    proc = _batch(tiny_pair_bundle, src, out, "--max-tokens", "40", wait=False)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the job ended before it could be killed: give it more records"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = out.read_bytes().count(b"\n")
    assert 10 <= written < 120
    resumed = _batch(tiny_pair_bundle, src, out, "--max-tokens", "40")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {written} of 120 records" in resumed.stderr
    assert _texts(_by_id(out)) == _texts(ref)


def test_torn_last_line_is_cut_and_its_record_written_again(reference, tiny_pair_bundle, tmp_path):
    src, ref = reference
    full = tmp_path / "full.jsonl"
    assert _batch(tiny_pair_bundle, src, full, "--max-tokens", "40").returncode == 0
    lines = full.read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    torn = lines[30][: len(lines[30]) // 2]
    out.write_bytes(b"".join(lines[:30]) + torn)
    resumed = _batch(tiny_pair_bundle, src, out, "--max-tokens", "40")
    assert resumed.returncode == 0, resumed.stderr
    assert f"cut a torn last line ({len(torn)} bytes)" in resumed.stderr
    assert "resuming: 30 of 120 records" in resumed.stderr
    assert _texts(_by_id(out)) == _texts(ref)


@pytest.mark.parametrize("sampling", [(), ("--temperature", "0.8", "--top-p", "0.95", "--seed", "7")],
                         ids=["greedy", "seeded-sampling"])
def test_two_workers_write_what_one_writes(tiny_pair_bundle, tmp_path, sampling):
    src = _write(tmp_path / "in.jsonl", _records(24))
    outs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.jsonl"
        proc = _batch(tiny_pair_bundle, src, out, "--max-tokens", "32", "--workers", workers, *sampling)
        assert proc.returncode == 0, proc.stderr
        outs[workers] = _texts(_by_id(out))
    assert sorted(outs["1"]) == sorted(f"r{i}" for i in range(24))
    assert outs["1"] == outs["2"]
    if sampling:  # a negative control: another job seed samples other text
        other = tmp_path / "other.jsonl"
        assert _batch(tiny_pair_bundle, src, other, "--max-tokens", "32", *sampling[:-1], "8").returncode == 0
        assert _texts(_by_id(other)) != outs["1"]


def test_records_that_cannot_run_get_an_error_line_and_the_job_goes_on(tiny_pair_bundle, tmp_path):
    good = _records(3)
    bad = [{"id": "u", "prompt": "x", "temprature": 1}, {"id": "long", "prompt": "alpha " * 400},
           {"id": "t", "prompt": "a b", "temperature": -1}, {"id": "m", "prompt": "a b", "mode": "warp"},
           {"id": "both", "prompt": "a", "messages": []}]
    lines = [json.dumps(good[0]), "{not json", json.dumps([1, 2]), *map(json.dumps, bad), json.dumps(good[1]), "",
             json.dumps(good[2])]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _batch(tiny_pair_bundle, src, out, "--max-tokens", "8")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    errors = {(r["id"], r["line"]): r["error"] for r in written if "error" in r}
    assert set(errors) == {(None, 2), (None, 3), ("u", 4), ("long", 5), ("t", 6), ("m", 7), ("both", 8)}
    assert "not JSON" in errors[(None, 2)] and "not an object" in errors[(None, 3)]
    assert "temprature" in errors[("u", 4)] and "context" in errors[("long", 5)]
    assert "temperature" in errors[("t", 6)] and "warp" in errors[("m", 7)]
    assert {r["id"] for r in written if "text" in r} == {"r0", "r1", "r2"}
    again = _batch(tiny_pair_bundle, src, out, "--max-tokens", "8")  # errors are results too: nothing runs again
    assert "resuming: 10 of 10 records" in again.stderr and len(out.read_text().splitlines()) == 10


def test_duplicate_ids_are_refused_up_front_with_their_lines(tiny_pair_bundle, tmp_path):
    records = _records(5)
    records[3]["id"] = "r1"
    src = _write(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    proc = _batch(tiny_pair_bundle, src, out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "edgespec: error: the input has duplicate ids, so a resumed job could not tell them apart: "
        '"r1" on lines 2, 4']
    assert not out.exists()


def test_an_output_file_that_is_not_a_jobs_is_left_alone(tiny_pair_bundle, tmp_path):
    src = _write(tmp_path / "in.jsonl", _records(2))
    out = tmp_path / "notes.txt"
    out.write_text("my notes\nmore notes\n")
    proc = _batch(tiny_pair_bundle, src, out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "not a batch output record" in proc.stderr
    assert out.read_text() == "my notes\nmore notes\n"


def test_python_api_in_input_order_and_as_completed(tiny_pair_bundle):
    records = _records(6)
    ordered = list(edgespec.batch.run(str(tiny_pair_bundle), records, edgespec.batch.BatchSettings(max_tokens=12),
                                      workers=2, threads=2))
    assert [r["id"] for r in ordered] == [r["id"] for r in records]
    any_order = list(edgespec.batch.run(str(tiny_pair_bundle), records, edgespec.batch.BatchSettings(max_tokens=12),
                                        workers=2, threads=2, ordered=False))
    assert {r["id"]: r["token_ids"] for r in any_order} == {r["id"]: r["token_ids"] for r in ordered}
    with pytest.raises(edgespec.batch.InputError, match="duplicate ids"):
        list(edgespec.batch.run(str(tiny_pair_bundle), records + [records[0]]))


def test_ray_writes_the_records_the_local_job_writes(tiny_pair_bundle, tmp_path):
    src = _write(tmp_path / "in.jsonl", _records(8, temperature=0.7) + _records(16)[8:])
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    assert _batch(tiny_pair_bundle, src, local, "--max-tokens", "24").returncode == 0
    proc = _batch(tiny_pair_bundle, src, on_ray, "--max-tokens", "24", "--ray", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert _texts(_by_id(on_ray)) == _texts(_by_id(local))
