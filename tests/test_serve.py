"""`edgespec serve`: the real server (uvicorn on a free loopback port) under the official `openai` client, raw HTTP
with bad bodies, and headless Chromium on the chat page (Debian's chromium driven by Playwright)."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgespec.apps.desktop.server import create_app
from edgespec.runtime.decoding import ArSettings, decode_ar
from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import MODES, register_mode
from edgespec.runtime.origins import ORIGINS

CHROMIUM = Path("/usr/bin/chromium")
MODEL = "tiny-pair"
PROMPT = [{"role": "user", "content": "hello there"}]
SLOW_SECONDS = 0.05  # per token of the `test-slow` mode: an answer long enough to stop or to queue behind


class RunningServer:
    """uvicorn serving `app` on 127.0.0.1, on a port the OS picks, in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        sock = socket.create_server(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            headers = {name.lower(): value for name, value in response.getheaders()}
            return response.status, headers, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def wait_idle(self, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while (state := self.health())["busy"] or state["waiting"]:
            assert time.monotonic() < deadline, f"the server is still generating: {state}"
            time.sleep(0.05)
        return state


def _slow(state):
    for chunk in decode_ar(state):
        time.sleep(SLOW_SECONDS)
        yield chunk


@pytest.fixture(scope="module")
def slow_mode():
    """`ar` slowed down, so a test can stop an answer, or queue requests behind it, before it ends."""
    register_mode("test-slow", _slow, ArSettings, "ar slowed down (tests)")
    yield "test-slow"
    del MODES["test-slow"]


@pytest.fixture(scope="module")
def engine(tiny_pair_bundle):
    return Engine.load(tiny_pair_bundle)


@pytest.fixture(scope="module")
def server(engine, slow_mode):
    running = RunningServer(create_app(engine, MODEL, max_waiting=1))
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def greedy(engine: Engine, prompt, max_new_tokens: int = 256, chat: bool = True, **settings):
    return engine.generate(prompt, max_new_tokens=max_new_tokens, mode="ar", chat=chat, **settings)


def test_non_streaming_chat_equals_greedy_and_counts_usage(engine, client):
    ref = greedy(engine, PROMPT, 40)
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, max_tokens=40)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(engine.prompt_tokens(PROMPT, chat=True))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    extra = r.model_extra["edgespec"]
    assert extra["mode"] == "auto"  # the server's default
    assert "".join(t["text"] for t in extra["tokens"]) == ref.text
    assert {t["origin"] for t in extra["tokens"]} <= set(ORIGINS)
    assert extra["stats"]["completion_tokens"] == len(ref.token_ids)


def test_streaming_chat_equals_greedy_with_usage_last(engine, client):
    ref = greedy(engine, PROMPT)
    chunks = list(client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert chunks[-1].usage.prompt_tokens == len(engine.prompt_tokens(PROMPT, chat=True))
    assert all(c.usage is None for c in chunks[:-1])
    tokens = [t for c in chunks for t in c.model_extra.get("edgespec", {}).get("tokens", [])]
    assert "".join(t["text"] for t in tokens) == ref.text


def test_completions_endpoint_streamed_and_not(engine, client):
    ref = greedy(engine, "hello", 20, chat=False)
    r = client.completions.create(model=MODEL, prompt="hello", temperature=0, max_tokens=20)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    streamed = client.completions.create(model=MODEL, prompt="hello", temperature=0, max_tokens=20, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == ref.text


def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)
    assert card.model_extra["edgespec"]["default_mode"] == "auto"
    assert set(card.model_extra["edgespec"]["modes"]) >= {"auto", "ar", "spec", "staged", "ngram", "ead", "ead-spec"}


@pytest.mark.parametrize("mode", ["auto", "ar", "spec", "staged", "ngram", "ead", "ead-spec"])
def test_every_mode_with_its_settings_and_token_origins(engine, client, mode):
    prompt = [{"role": "user", "content": "abc abc abc abc abc abc abc abc"}]
    settings = {"spec": {"k": 2}, "staged": {"depth": 2}, "ead": {"tau": 1.0}}.get(mode, {})
    r = client.chat.completions.create(model=MODEL, messages=prompt, temperature=0, max_tokens=60,
                                       extra_body={"edgespec": {"mode": mode, "settings": settings}})
    extra = r.model_extra["edgespec"]
    assert extra["mode"] == mode and extra["stats"]["mode"] == mode
    text = r.choices[0].message.content
    assert "".join(t["text"] for t in extra["tokens"]) == text
    assert text == engine.generate(prompt, max_new_tokens=60, mode=mode, chat=True, **settings).text
    origins = {t["origin"] for t in extra["tokens"]}
    assert origins <= set(ORIGINS)
    assert sum(extra["stats"]["origins"].values()) == r.usage.completion_tokens
    if mode in ("auto", "ar", "spec", "staged", "ngram"):  # lossless: the target's greedy text, no unverified token
        assert text == greedy(engine, prompt, 60).text and "small" not in origins
    if mode == "ar":
        assert origins == {"target"} and extra["stats"]["tokens_per_target_pass"] == pytest.approx(1.0)


def test_sampling_seed_top_p_and_stop_follow_the_engine(engine, client):
    sampled = dict(temperature=0.8, top_p=0.9, seed=7)
    ref = engine.generate(PROMPT, max_new_tokens=30, mode="spec", chat=True, **sampled)
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=30, **sampled,
                                       extra_body={"edgespec": {"mode": "spec"}})
    assert r.choices[0].message.content == ref.text
    full = greedy(engine, PROMPT).text
    stop = full[10:12]
    ref = greedy(engine, PROMPT, stop=[stop])
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, stop=stop)
    assert r.choices[0].message.content == ref.text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_two_concurrent_streams_each_equal_their_own_greedy_run(engine, client):
    prompts = [PROMPT, [{"role": "user", "content": "What is the capital of France?"}]]
    refs = [greedy(engine, p).text for p in prompts]
    texts = [None, None]

    def run(i: int) -> None:
        stream = client.chat.completions.create(model=MODEL, messages=prompts[i], temperature=0, stream=True)
        texts[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert texts == refs and refs[0] != refs[1]


def test_origin_rules_read_the_counters_the_modes_publish():
    from edgespec.runtime.origins import OriginTracker

    def steps(mode: str, chunks: list[tuple[int, dict]], settings=None) -> list[list[str | None]]:
        tracker = OriginTracker(mode, settings)
        return [tracker(list(range(n)), stats) for n, stats in chunks]

    spec = [(3, {"speculative": {"steps": 1}}), (1, {"speculative": {"steps": 2}})]
    assert steps("spec", spec) == [["draft", "draft", "target"], ["target"]]
    assert steps("ngram", spec) == [["ngram", "ngram", "target"], ["target"]]
    staged = [(3, {"speculative": {"steps": 1}}), (2, {"speculative": {"steps": 1}})]  # a path step, a direct step
    assert steps("staged", staged) == [["draft", "draft", "target"], ["ngram", "target"]]
    ead = [(1, {"ead": {"tokens_small": 1}}), (1, {"ead": {"tokens_small": 1}})]
    assert steps("ead", ead) == [["small"], ["target"]]
    ead_spec = [(1, {"ead": {"tokens_small": 1}}), (3, {"ead": {"tokens_small": 1}, "speculative": {"steps": 1}})]
    assert steps("ead-spec", ead_spec) == [["small"], ["draft", "draft", "target"]]
    assert steps("ar", [(1, {})], ArSettings(model="draft")) == [["small"]]
    assert steps("ar", [(1, {})], ArSettings()) == [["target"]]
    assert steps("auto", staged) == [["draft", "draft", "target"], ["ngram", "target"]]
    tracker = OriginTracker("auto", has_draft=False)  # without a draft its verified steps are n-gram steps
    assert [tracker(list(range(n)), stats) for n, stats in spec] == [["ngram", "ngram", "target"], ["target"]]
    assert steps("test-unknown", [(2, {})]) == [[None, None]]


WRONG_TYPES = [
    ("model", 5), ("messages", "hello"), ("messages", []), ("messages", [{"role": "robot", "content": "hi"}]),
    ("messages", [{"role": "user", "content": 5}]), ("messages", [{"role": "user"}]),
    ("temperature", "hot"), ("temperature", -1), ("temperature", 5), ("top_p", [1]), ("top_p", 0),
    ("max_tokens", "10"), ("max_tokens", 1.5), ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**9),
    ("max_completion_tokens", True), ("stop", 7), ("stop", ["a"] * 40), ("seed", "x"), ("seed", -1),
    ("stream", "yes"), ("stream_options", 5), ("stream_options", {"include_usage": "yes"}), ("n", 2),
    ("presence_penalty", 1.0), ("logprobs", True), ("edgespec", 5), ("edgespec", {"mode": 7}),
    ("edgespec", {"mode": "bogus"}), ("edgespec", {"bogus": 1}), ("edgespec", {"settings": {"k": "x"}}),
    ("edgespec", {"mode": "spec", "settings": {"k": -1}}), ("edgespec", {"mode": "spec", "settings": {"depth": 2}}),
    ("edgespec", {"top_k": -2}), ("edgespec", {"repetition_penalty": 0}),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES, ids=[f"{f}={v!r}"[:40] for f, v in WRONG_TYPES])
def test_a_bad_field_is_a_clear_400_and_the_server_keeps_serving(server, field, value):
    body = {"model": MODEL, "messages": PROMPT, "max_tokens": 4, field: value}
    status, _, answer = server.request("POST", "/v1/chat/completions", json.dumps(body))
    assert status == 400, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert field in (error["param"] or "") + error["message"], error


def test_bad_bodies_get_4xx_in_openais_shape_and_the_server_keeps_serving(server, client):
    cases = [
        ("POST", "/v1/chat/completions", b'{"model": "tiny-pair", "messages": [', 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"\xff\xfe not utf-8", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"[1, 2]", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", json.dumps({"model": "gpt-4o", "messages": PROMPT}), 404,
         "model_not_found"),
        ("POST", "/v1/chat/completions", b"x" * (10 * 1024 * 1024), 413, "request_too_large"),
        ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": ["a", "b"]}), 400, None),
        ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": " "}), 400, None),
        ("GET", "/v1/models/gpt-4o", None, 404, "model_not_found"),
        ("GET", "/nowhere", None, 404, None),
        ("DELETE", "/v1/chat/completions", None, 405, None),
    ]
    for method, path, body, status, code in cases:
        got, _, answer = server.request(method, path, body)
        assert got == status, (path, body[:40] if body else None, answer)
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert code is None or answer["error"]["code"] == code
    too_long = [{"role": "user", "content": "word " * 300}]  # more tokens than the tiny context holds
    status, _, answer = server.request("POST", "/v1/chat/completions",
                                       json.dumps({"model": MODEL, "messages": too_long, "stream": True}))
    assert status == 400 and "context" in answer["error"]["message"]
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=-1)
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, temperature=0, max_tokens=5)
    assert r.usage.completion_tokens == 5
    assert server.wait_idle()["generations"]["failed"] >= 1


def test_a_mode_the_bundle_cannot_run_is_a_400(tiny_bundle):
    running = RunningServer(create_app(Engine.load(tiny_bundle), "tiny"))
    try:
        body = {"model": "tiny", "messages": PROMPT, "edgespec": {"mode": "spec"}}
        status, _, answer = running.request("POST", "/v1/chat/completions", json.dumps(body))
        assert status == 400 and "draft" in answer["error"]["message"]
        assert answer["error"]["param"] == "edgespec.mode"
        status, _, answer = running.request("POST", "/v1/chat/completions",
                                            json.dumps({"model": "tiny", "messages": PROMPT, "max_tokens": 3}))
        assert status == 200 and answer["edgespec"]["mode"] == "auto"
    finally:
        running.close()


def _open_stream(server, mode: str, max_tokens: int = 200) -> tuple[http.client.HTTPConnection, object]:
    """A streamed request whose first event has arrived (its generation is running or queued)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    body = {"model": MODEL, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "edgespec": {"mode": mode}}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_a_client_that_disconnects_cancels_its_generation(server, slow_mode):
    before = server.wait_idle()["generations"]
    conn, response = _open_stream(server, slow_mode)
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = server.wait_idle()["generations"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]


def test_past_the_queue_bound_a_request_gets_429_with_retry_after(server, slow_mode):
    server.wait_idle()
    running, queued = _open_stream(server, slow_mode), None
    try:
        deadline = time.monotonic() + 10
        while not server.health()["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        queued = threading.Thread(target=server.request, args=(
            "POST", "/v1/chat/completions", json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": 2})))
        queued.start()
        while server.health()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, headers, answer = server.request("POST", "/v1/chat/completions",
                                                 json.dumps({"model": MODEL, "messages": PROMPT}))
        assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
        assert int(headers["retry-after"]) >= 1
    finally:
        running[0].close()
        if queued is not None:
            queued.join(60)
    server.wait_idle()


def test_serve_command_binds_loopback_and_refuses_other_hosts(tiny_bundle):
    from edgespec.runtime.cli import main

    assert main(["serve", "--bundle", str(tiny_bundle), "--host", "0.0.0.0"]) == 2
    proc = subprocess.Popen([sys.executable, "-m", "edgespec.runtime.cli", "serve", "--bundle", str(tiny_bundle),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"at http://(127\.0\.0\.1):(\d+)/ ", line)
        if not url:
            proc.kill()
            pytest.fail(f"no address printed: {line!r} {proc.stderr.read()}")
        conn = http.client.HTTPConnection(url.group(1), int(url.group(2)), timeout=30)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read())["model"] == Path(tiny_bundle).name
        conn.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_chat_page_in_headless_chromium(engine, server, slow_mode, tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the chat page test drives Debian's Chromium "
                    "(apt-get install -y --no-install-recommends chromium; .ci/run installs it)")
    from playwright.sync_api import expect, sync_playwright

    first = greedy(engine, PROMPT)
    follow_up = [*PROMPT, {"role": "assistant", "content": first.text}, {"role": "user", "content": "and then?"}]
    second = greedy(engine, follow_up)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.goto(server.url)
            expect(page.locator("#mode option")).to_have_count(len(MODES) + 1)
            answers = page.locator(".msg.assistant .content")

            def ask(text: str, state: str = "done") -> None:
                page.fill("#prompt", text)
                page.click("#send")
                expect(page.locator("#status")).to_have_attribute("data-state", state, timeout=60_000)

            ask(PROMPT[0]["content"])
            assert answers.nth(0).text_content() == first.text
            expect(page.locator("#legend .tok")).to_have_count(4)
            assert page.locator(".msg.assistant .tok.o-target").count() >= 1
            assert page.locator("#stat-mode").text_content() == "auto"
            assert float(page.locator("#stat-tps").text_content()) > 0
            ask("and then?")  # the page sends the whole conversation
            assert answers.nth(1).text_content() == second.text
            page.screenshot(path=tmp_path / "chat_page.png", full_page=True)

            before = server.wait_idle()["generations"]
            page.click("#new-chat")
            page.select_option("#mode", slow_mode)
            page.fill("#prompt", PROMPT[0]["content"])
            page.click("#send")
            expect(page.locator(".msg.assistant .tok").first).to_be_visible(timeout=30_000)
            page.click("#stop")
            expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
            after = server.wait_idle(timeout=10)["generations"]
            assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
            stopped = answers.nth(0).text_content()
            assert first.text.startswith(stopped) and len(stopped) < len(first.text)
            page.screenshot(path=tmp_path / "chat_page_stopped.png", full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "chat_page.png").stat().st_size > 10_000


def test_a_request_that_waits_behind_one_about_to_start_is_admitted(engine):
    """With room for one waiting request, two submitted back to back are both taken (the first runs, or is about
    to), and a third is refused: whether the worker thread has picked up the first yet must not matter."""
    import queue

    from edgespec.apps.desktop.generation import EngineWorker, Job
    from edgespec.runtime.modes import make_request

    worker = EngineWorker(engine, max_waiting=1)
    tokens = engine.prompt_tokens(PROMPT, chat=True)
    jobs = [Job(tokens, 200, make_request("ar", {}), lambda event: None) for _ in range(3)]
    try:
        worker.submit(jobs[0])
        worker.submit(jobs[1])
        with pytest.raises(queue.Full):
            worker.submit(jobs[2])
        assert worker.waiting == 1
    finally:
        for job in jobs:
            job.cancel()
        worker.close()
