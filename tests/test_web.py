"""The JavaScript decode loop (apps/web) against the Python runtime, the web app in headless Chromium (offline once
loaded, as an installed PWA), and the Android APK built from Debian packages whose assets serve that web app.

The Python runtime writes the test vectors (same bundle, prompts, modes and fixed proposal sizes; its greedy token
ids, text and target passes); `node --test` runs the loop on onnxruntime-node and on onnxruntime-web's WASM build
against them, and Chromium runs the page on onnxruntime-web. Every tool is required: a missing node, npm, chromium
or Android build tool fails these tests (.ci/run installs them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from edgespec.runtime.engine import ChatSession, Engine
from edgespec.runtime.modes import make_request
from edgespec.runtime.ngram import ContextLookup, NgramDrafter

ROOT = Path(__file__).resolve().parent.parent
WEB = ROOT / "apps" / "web"
MAX_NEW_TOKENS = 48
PROMPTS = [  # (prompt, chat): code that repeats itself (n-gram matches), prose, and a chat turn
    ("def add(a, b):\n    return a + b\n\ndef add_three(a, b, c):\n    return a + b + c\n\ndef add", False),
    ("The cat sat on the mat. The cat sat on the", False),
    ("Write a haiku about rain.", True),
]
SETTINGS = {"ar": {}, "ngram": {"k": 4}, "staged": {"depth": 3}}  # fixed sizes: JS proposes what Python proposes


def tool(name: str) -> str:
    """The path of a command-line tool these tests need; its absence fails the test (CI installs it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; .ci/run installs it (see docs/web-and-android.md)")
    return path


def run(cmd: list[str], cwd: Path = ROOT, env: dict | None = None, timeout: int = 600) -> str:
    """Run a command at low priority; its output, or a failure showing it."""
    done = subprocess.run(["nice", "-n", "19", *cmd], cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                          capture_output=True, timeout=timeout)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """apps/web's npm packages, installed from its lockfile when missing (npm ci; .ci/run does it first)."""
    tool("node")
    tool("npm")
    if not (WEB / "node_modules" / ".package-lock.json").is_file():
        run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB)
    return WEB / "node_modules"


@pytest.fixture(scope="module")
def web_bundle(tiny_dir, tmp_path_factory) -> Path:
    """A tiny target, a draft derived from its first layer and an n-gram table: every mode of the JS loop runs."""
    from conftest import quiet

    from edgespec.export.bundle import ExportOptions
    from edgespec.export.cli import export_bundle

    out = tmp_path_factory.mktemp("web") / "bundle"
    return export_bundle(str(tiny_dir), out, derive_layers=1, ngram_tokens=200, parity=False,
                         options=ExportOptions(quant="fp32", max_context=256, log=quiet))


def python_vectors(bundle: Path) -> dict:
    """What the Python runtime gives for each prompt and mode (greedy): token ids, text, and the tokens each step
    committed (one verify pass per step); and its n-gram table's distributions and proposals."""
    engine = Engine.load(bundle)
    cases = []
    for prompt, chat in PROMPTS:
        for mode, settings in SETTINGS.items():
            steps: list[int] = []
            session = ChatSession(engine)
            tokens = engine.prompt_tokens(prompt, chat)
            for _ in session.iterate(tokens, MAX_NEW_TOKENS, make_request(mode, {"temperature": 0, **settings}),
                                     on_step=lambda chunk, committed, stats, steps=steps: steps.append(committed)):
                pass
            result = session.last_result
            cases.append({"prompt": prompt, "chat": chat, "mode": mode, "settings": settings,
                          "max_new_tokens": MAX_NEW_TOKENS, "prompt_ids": tokens, "token_ids": result.token_ids,
                          "text": result.text, "finish_reason": result.finish_reason, "steps": steps})
    checks = []
    for prompt, chat in PROMPTS:
        context = engine.prompt_tokens(prompt, chat)
        drafter = NgramDrafter(ContextLookup(list(context)), engine.ngram_model)
        checks.append({"context": context, "top": [list(t) for t in engine.ngram_model.next_distribution(context, 4)],
                       "proposal": drafter.propose([], 6)})
    return {"bundle": str(bundle), "cases": cases, "ngram_checks": checks}


@pytest.fixture(scope="module")
def vectors(web_bundle, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "vectors.json"
    path.write_text(json.dumps(python_vectors(web_bundle)))
    return path


def test_vectors_exercise_every_mode(vectors):
    """The vectors are worth comparing against: speculation accepted tokens, and the modes agree (Python's own
    losslessness, which the JS loop must reproduce)."""
    cases = json.loads(vectors.read_text())["cases"]
    for prompt, _ in PROMPTS:
        ids = {c["mode"]: c["token_ids"] for c in cases if c["prompt"] == prompt}
        assert ids["ngram"] == ids["ar"] == ids["staged"] and len(ids["ar"]) > 0
    ar = sum(len(c["steps"]) for c in cases if c["mode"] == "ar")
    assert sum(len(c["steps"]) for c in cases if c["mode"] == "ngram") < ar
    assert sum(len(c["steps"]) for c in cases if c["mode"] == "staged") < ar


def test_node_loop_gives_python_tokens(node_modules, vectors):
    """apps/web/test/*.test.mjs on onnxruntime-node and onnxruntime-web (WASM) in node: same prompt ids, token ids,
    text and tokens per step (the same proposals) as the Python runtime; n-gram table parity; tampered files refused."""
    tests = sorted(str(p.relative_to(WEB)) for p in (WEB / "test").glob("*.test.mjs"))
    out = run(["node", "--test", "--test-reporter=spec", *tests], cwd=WEB, env={"EDGESPEC_VECTORS": str(vectors)})
    print(out)
    assert "ℹ fail 0" in out and "ℹ pass 0" not in out


# --- Android: the APK, built from Debian packages, checked as far as this machine allows --------------------------

ANDROID = ROOT / "apps" / "android"
ASSET_HOST = "https://appassets.androidplatform.net"
# AssetClient.smali's MIME table (verify/VerifyDex.java checks the smali side of it)
MIME = {".html": "text/html", ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm",
        ".css": "text/css", ".json": "application/json", ".webmanifest": "application/manifest+json",
        ".svg": "image/svg+xml"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run"]
CHAT_PROMPT = next(p for p, chat in PROMPTS if chat)


@pytest.fixture(scope="module")
def apk(node_modules, web_bundle, tmp_path_factory) -> Path:
    for name in ("smali", "aapt", "zipalign", "apksigner", "keytool", "dexdump", "enjarify", "javac", "java"):
        tool(name)
    out = tmp_path_factory.mktemp("apk")
    print(run(["bash", str(ANDROID / "build.sh"), "--bundle", str(web_bundle), "--out", str(out)]))
    return out / "edgespec-chat.apk"


def test_apk_is_signed_and_its_bytecode_verifies(apk, tmp_path):
    """apksigner verify, aapt dump badging, dexdump, and the dex's bytecode through java -Xverify:all; a dex whose
    register holds the wrong type for a call (the negative control) fails that last step."""
    out = run(["bash", str(ANDROID / "verify.sh"), str(apk)])
    print(out)
    assert "Verifies" in out and "v2 scheme (APK Signature Scheme v2): true" in out
    assert "package: name='org.edgespec.chat'" in out and "sdkVersion:'24'" in out
    assert "launchable-activity: name='org.edgespec.chat.MainActivity'" in out
    assert "verified org.edgespec.chat.MainActivity" in out and "verified org.edgespec.chat.AssetClient" in out
    assert "mime types ok" in out
    import zipfile

    with zipfile.ZipFile(apk) as z:
        names = set(z.namelist())
        assert {"classes.dex", "assets/web/index.html", "assets/web/bundle/manifest.json",
                "assets/web/vendor/ort-wasm-simd-threaded.wasm"} <= names
        assert z.getinfo("assets/web/bundle/target/fused.onnx").compress_type == zipfile.ZIP_STORED
    bad = tmp_path / "smali"
    shutil.copytree(ANDROID / "smali", bad)
    activity = bad / "org" / "edgespec" / "chat" / "MainActivity.smali"
    good_call = "invoke-direct {v0, p0}, Landroid/webkit/WebView;-><init>(Landroid/content/Context;)V"
    assert good_call in activity.read_text()
    activity.write_text(activity.read_text().replace(good_call, good_call.replace("p0", "p1")))  # a Bundle
    run(["smali", "assemble", str(bad), "-o", str(tmp_path / "classes.dex"), "--api", "24"])
    done = subprocess.run(["bash", str(ANDROID / "verify" / "dex.sh"), str(tmp_path / "classes.dex")],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "VerifyError" in done.stderr, done.stderr


def expected(vectors: Path, mode: str) -> list[int]:
    cases = json.loads(vectors.read_text())["cases"]
    return next(c["token_ids"] for c in cases if c["prompt"] == CHAT_PROMPT and c["mode"] == mode)


def chat_once(page, mode: str) -> tuple[list[int], dict]:
    """Start a new chat in `mode`, send CHAT_PROMPT, wait for the answer: its token ids and the page's stats."""
    page.click("#new-chat")
    page.select_option("#mode", mode)
    page.fill("#max-tokens", str(MAX_NEW_TOKENS))
    page.fill("#prompt", CHAT_PROMPT)
    page.click("#send")
    page.wait_for_function("['done', 'error'].includes(document.querySelector('#status').dataset.state)",
                           timeout=120_000)
    assert page.get_attribute("#status", "data-state") == "done", page.inner_text("#conversation")
    ids = json.loads(page.get_attribute(".msg.assistant", "data-token-ids"))
    origins = page.eval_on_selector_all(".msg.assistant .tok", "spans => spans.map(s => s.className)")
    stats = {key: page.inner_text(f"#stat-{key}") for key in ("mode", "tps", "acc", "tpp", "tokens")}
    return ids, {**stats, "origins": origins}


def launch(playwright):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y --no-install-recommends chromium (.ci/run does)")
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def test_webview_phone_profile_runs_the_apk_assets_and_matches_python(apk, vectors, tmp_path):
    """The web app and bundle read from the built APK's assets, served under the WebView's asset origin with
    AssetClient's MIME types and no cross-origin isolation (as a WebView serves them), in Chromium with a phone's
    viewport, touch and user agent: ar, ngram and staged give the Python runtime's greedy tokens."""
    import zipfile

    from playwright.sync_api import sync_playwright

    assets = zipfile.ZipFile(apk)

    def serve(route):
        path = route.request.url.split(ASSET_HOST, 1)[1].split("?")[0].lstrip("/")
        path = path + "index.html" if not path or path.endswith("/") else path
        try:
            body = assets.read(f"assets/{path}")
        except KeyError:
            route.fulfill(status=404, content_type="text/plain", body="Not Found")
            return
        route.fulfill(status=200, body=body,
                      content_type=MIME.get(Path(path).suffix, "application/octet-stream"))

    with sync_playwright() as p:
        browser = launch(p)
        context = browser.new_context(**p.devices["Pixel 7"])
        context.route(f"{ASSET_HOST}/**", serve)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{ASSET_HOST}/web/index.html")
        page.wait_for_selector("body[data-ready=true]", timeout=120_000)
        assert page.evaluate("crossOriginIsolated") is False
        assert page.evaluate("navigator.userAgent").find("Android") >= 0
        assert page.viewport_size["width"] < 500
        for mode in ("ar", "ngram", "staged"):
            ids, stats = chat_once(page, mode)
            print(mode, stats)
            assert ids == expected(vectors, mode), f"{mode} in the WebView profile"
            if mode != "ar":
                assert any("o-draft" in c or "o-ngram" in c for c in stats["origins"]), stats
        page.screenshot(path=str(tmp_path / "phone.png"))
        assert not errors, errors
        browser.close()


class StaticServer:
    """A plain HTTP server on 127.0.0.1 over a folder, with the MIME types browsers require for modules and WASM,
    that forbids HTTP caching (so what a page gets offline came from its service worker and the Cache API)."""

    def __init__(self, root: Path):
        import functools
        import http.server
        import threading

        class Handler(http.server.SimpleHTTPRequestHandler):
            extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **MIME}

            def end_headers(self) -> None:
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server.fileno() != -1:
            self.server.shutdown()
            self.server.server_close()


def test_pwa_loads_offline_the_second_time(node_modules, web_bundle, vectors, tmp_path):
    """The installable web app: the first load fetches the page and the bundle (kept by the service worker and the
    Cache API) and checks pass sizes; with the server gone and the network blocked, a reload still opens the page,
    loads the model (the pass-size verdict from the cache) and answers with the Python runtime's tokens."""
    from playwright.sync_api import sync_playwright

    site = tmp_path / "site"
    run(["node", str(WEB / "build.mjs"), "--out", str(site), "--bundle", str(web_bundle)])
    manifest = json.loads((site / "manifest.webmanifest").read_text())
    assert manifest["display"] == "standalone" and manifest["icons"]
    server = StaticServer(site)
    try:
        with sync_playwright() as p:
            browser = launch(p)
            context = browser.new_context()
            page = context.new_page()
            page.goto(server.url)
            page.wait_for_selector("body[data-ready=true][data-offline-ready=true]", timeout=120_000)
            assert page.get_attribute("body", "data-pass-check") == "checked"
            assert chat_once(page, "staged")[0] == expected(vectors, "staged")
            caches = page.evaluate("caches.keys()")
            assert "edgespec-bundle" in caches and any(c.startswith("edgespec-shell-") for c in caches), caches
            server.close()
            context.set_offline(True)
            page.reload()
            page.wait_for_selector("body[data-ready=true]", timeout=120_000)
            assert page.evaluate("navigator.onLine") is False
            assert page.get_attribute("body", "data-pass-check") == "cached"  # the verdict kept from the first load
            assert page.evaluate("navigator.serviceWorker.controller !== null")
            assert chat_once(page, "ngram")[0] == expected(vectors, "ngram")
            browser.close()
    finally:
        server.close()
