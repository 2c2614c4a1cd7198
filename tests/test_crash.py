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


# A child that rewrites one entry in a loop, alternating two contents, until it is killed: kills then land at every
# point of a write. `direct` is the negative control, a writer that truncates the file and writes in place.
_CACHE_WRITER = """
import json, sys
from pathlib import Path
from edgespec.runtime import cache
root, how = Path(sys.argv[1]), sys.argv[2]
key = cache.CacheKey("costs", ("target", "t1"))
contents = [{"curve": [float(i)] * 300_000} for i in (1, 2)]
encoded = [json.dumps({"sha256": cache._digest(c), "data": c}).encode() for c in contents]
path = cache.entry_path(root, key, ".json")
cache.write_json(root, key, contents[0])
print("ready", flush=True)
i = 0
while True:
    i += 1
    if how == "atomic":
        cache.write_json(root, key, contents[i % 2])
    else:
        path.write_bytes(encoded[i % 2])
"""

_MANIFEST_WRITER = """
import sys
from edgespec.runtime.calibrate import write_tau
bundle = sys.argv[1]
rows = [{"tau": float(t), "rouge_l": 1.0, "token_agreement": 1.0, "large_share": 0.5, "note": "x" * 20_000}
        for t in range(50)]
write_tau(bundle, rows[2], rows, 0.9)
print("ready", flush=True)
i = 0
while True:
    i += 1
    write_tau(bundle, rows[2 + i % 2], rows, 0.9)
"""


def _kill_writer_repeatedly(script: str, args: list[str], check, kills: int = 12) -> list:
    """Start the looping writer `kills` times, SIGKILL it at a spread of moments after its first complete write,
    and return what `check()` reads from disk after each kill."""
    seen = []
    for n in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.037 * n)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        seen.append(check())
    return seen


def test_a_cache_writer_killed_mid_write_leaves_the_old_entry_or_the_new_one(tmp_path):
    from edgespec.runtime import cache

    key = cache.CacheKey("costs", ("target", "t1"))
    seen = _kill_writer_repeatedly(_CACHE_WRITER, [str(tmp_path), "atomic"],
                                   lambda: (cache.read_json(tmp_path, key) or {"curve": [None]})["curve"][0])
    assert set(seen) <= {1.0, 2.0}, f"a killed write left an entry that is neither content: {seen}"
    cache.write_json(tmp_path, cache.CacheKey("costs", ("draft", "t1")), {"curve": [0.0]})
    assert [p.name for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name] == []  # the next writer swept


def test_the_kill_test_catches_a_writer_that_writes_in_place(tmp_path):
    """Negative control: the same kills tear a file written in place (the checksum then drops it: neither old nor
    new), so the test above would see a writer that is not atomic."""
    from edgespec.runtime import cache

    key = cache.CacheKey("costs", ("target", "t1"))
    seen = _kill_writer_repeatedly(_CACHE_WRITER, [str(tmp_path), "direct"],
                                   lambda: (cache.read_json(tmp_path, key) or {"curve": [None]})["curve"][0])
    assert None in seen


def test_calibrations_manifest_update_killed_mid_write_leaves_the_old_manifest_or_the_new_one(tiny_pair_bundle,
                                                                                               tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    seen = _kill_writer_repeatedly(_MANIFEST_WRITER, [str(bundle)],
                                   lambda: load_manifest(bundle).raw["runtime"]["ead"]["tau"])
    assert set(seen) <= {2.0, 3.0}
    assert len(list(bundle.glob("*.tmp*"))) <= 1  # at most the last killed writer's temporary
    from edgespec.runtime.calibrate import write_tau

    write_tau(bundle, {"tau": 4.0}, [{"tau": 4.0}], 0.9)
    assert list(bundle.glob("*.tmp*")) == []
    assert load_manifest(bundle).raw["runtime"]["ead"]["tau"] == 4.0


def test_calibrate_ead_killed_mid_sweep_leaves_the_manifest_as_it_was(tiny_pair_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
    before = (bundle / "manifest.json").read_bytes()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" * 200)
    proc = subprocess.Popen([sys.executable, "-m", "edgespec.runtime.cli", "calibrate-ead", "--bundle", str(bundle),
                             "--prompts", str(prompts), "--max-new-tokens", "32", "--plot", str(tmp_path / "p.png")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(6.0)
    assert proc.poll() is None, "the sweep ended before the kill"
    proc.kill()
    proc.wait()
    assert (bundle / "manifest.json").read_bytes() == before
    assert not (tmp_path / "p.png").exists()


def test_a_load_killed_while_writing_its_cache_is_followed_by_a_load_that_gives_the_same_tokens(tiny_pair_bundle,
                                                                                                 tmp_path):
    """Loading writes optimized graphs, pass-cost curves and the pass-size verdict into cache/; a load killed at any
    point leaves entries that the next load either verifies or makes again, never trusts half-written."""
    run = ("import sys; from edgespec.runtime.engine import Engine; "
           "e = Engine.load(sys.argv[1]); print(e.generate('def f(x):', max_new_tokens=16, mode='auto').token_ids)")
    reference = tmp_path / "reference"
    shutil.copytree(tiny_pair_bundle, reference, ignore=shutil.ignore_patterns("cache"))
    expected = subprocess.run([sys.executable, "-c", run, str(reference)], capture_output=True, text=True,
                              check=True, timeout=300).stdout
    entries_at_kill = set()
    for n, delay in enumerate((0.5, 1.5, 2.5, 3.5, 5.0)):
        bundle = tmp_path / f"b{n}"
        shutil.copytree(tiny_pair_bundle, bundle, ignore=shutil.ignore_patterns("cache"))
        proc = subprocess.Popen([sys.executable, "-c", run, str(bundle)], stdout=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        entries_at_kill.add(len(list((bundle / "cache").glob("*"))) if (bundle / "cache").is_dir() else 0)
        after = subprocess.run([sys.executable, "-c", run, str(bundle)], capture_output=True, text=True, check=True,
                               timeout=300).stdout
        assert after == expected
        assert [p.name for p in (bundle / "cache").iterdir() if ".tmp" in p.name] == []
    assert len(entries_at_kill) > 1, f"every kill landed at the same point: {entries_at_kill}"
