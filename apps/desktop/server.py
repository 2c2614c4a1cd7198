"""The OpenAI-compatible local server and the chat page (`edgespec serve`).

`POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent events or not), `GET /v1/models`,
`GET /health`, and the chat page at `/`. Generations queue on the engine's one worker thread
(apps/desktop/generation.py): a request past the queue's bound gets 429 with Retry-After, and a client that
disconnects cancels its generation. Our extras ride in an `edgespec` object of the request (the mode and its
settings) and of the response (each token's text and origin, acceptance, tokens per target pass).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import queue
import socket
import time
import uuid
import webbrowser
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from edgespec.apps.desktop.generation import EngineWorker, Event, Failed, Finished, Job, Piece
from edgespec.apps.desktop.schema import ChatCompletionRequest, CompletionRequest, describe
from edgespec.runtime.decoding import ModeError
from edgespec.runtime.engine import Engine
from edgespec.runtime.modes import DEFAULT_MODE, MODES, make_request
from edgespec.runtime.modes import Request as GenerationRequest
from edgespec.runtime.origins import ORIGINS

log = logging.getLogger("edgespec.serve")

MAX_BODY_BYTES = 1 << 20  # a full context of chat messages is a few tens of kilobytes
_DRAIN_BYTES = 64 << 20  # an oversized body is read (not kept) up to this, so the client gets its 413
PAGE = Path(__file__).parent / "chat_page"


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class Served:
    """What the routes answer from: the loaded engine, its worker thread, the name it is served as and the mode of
    requests that name none."""

    engine: Engine
    worker: EngineWorker
    model_id: str
    mode: str
    max_body_bytes: int
    created: int  # the bundle's time, as the model's creation time in /v1/models

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgespec",
                "edgespec": {"default_mode": self.mode, "modes": {name: m.help for name, m in MODES.items()},
                             "origins": ORIGINS, "max_context": self.engine.max_context,
                             "draft": self.engine.draft is not None}}


def create_app(engine: Engine, model_id: str, mode: str = DEFAULT_MODE, max_waiting: int = 8,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server for one loaded engine, served as `model_id`; `mode` is for requests that name none."""
    served = Served(engine, EngineWorker(engine, max_waiting), model_id, mode, max_body_bytes,
                    int(engine.manifest.root.stat().st_mtime))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await asyncio.to_thread(served.worker.close)

    app = FastAPI(title="edgespec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE / "index.html")

    app.mount("/static", StaticFiles(directory=PAGE), name="static")

    @app.get("/health")
    async def health() -> dict:
        worker = served.worker
        return {"status": "ok", "model": model_id, "busy": worker.running is not None, "waiting": worker.waiting,
                "generations": dict(worker.counts)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [served.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict:
        if name != model_id:
            raise _unknown_model(name, model_id)
        return served.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatCompletionRequest, await _read_json(request, max_body_bytes))
        _check_model(body.model, model_id)
        messages = [m.as_dict() for m in body.messages]
        try:
            tokens = engine.prompt_tokens(messages, chat=True)
        except (ValueError, jinja2.TemplateError) as exc:
            raise ApiError(400, f"messages: {exc}", param="messages") from exc
        return await _generate(served, request, body, tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        _check_model(body.model, model_id)
        try:
            tokens = engine.prompt_tokens(body.text, chat=False)
        except ValueError as exc:
            raise ApiError(400, f"prompt: {exc}", param="prompt") from exc
        return await _generate(served, request, body, tokens, chat=False)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, FastAPI's or an unexpected one, answered in OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail), headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


def _generation_request(served: Served, body: ChatCompletionRequest | CompletionRequest,
                        tokens: list[int]) -> tuple[GenerationRequest, int]:
    """The generation request of `body` (mode, sampling and mode settings) and its token limit; a bad setting or
    a limit past the context is a 400 naming the field."""
    engine = served.engine
    limit = body.limit if body.limit is not None else max(1, engine.max_context - len(tokens))
    if limit > engine.max_context:
        raise ApiError(400, f"max_tokens is {limit} but the model's context holds {engine.max_context} tokens",
                       param="max_tokens")
    options = body.edgespec
    try:
        generation = make_request(options.mode or served.mode, {
            **options.settings, "temperature": body.temperature, "top_p": body.top_p, "top_k": options.top_k,
            "repetition_penalty": options.repetition_penalty, "seed": body.seed, "stop": body.stops})
    except (ValueError, TypeError) as exc:  # an unknown mode or setting, or a setting out of its range
        raise ApiError(400, str(exc), param="edgespec.mode" if isinstance(exc, ModeError)
                       else "edgespec.settings") from exc
    return generation, limit


async def _generate(served: Served, request: Request, body: ChatCompletionRequest | CompletionRequest,
                    tokens: list[int], chat: bool) -> Response:
    """Queue the generation on the engine's worker and answer with the whole reply or a stream of it; a client
    that disconnects cancels it."""
    generation, limit = _generation_request(served, body, tokens)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(tokens, limit, generation, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
    try:
        served.worker.submit(job)
    except queue.Full:
        raise ApiError(429, f"the server is busy: {served.worker.waiting} requests are waiting; retry later",
                       type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(served.worker.retry_after())}) from None
    reply = _Reply(served.model_id, chat, generation.mode)
    gone = asyncio.ensure_future(_disconnected(request))
    streaming = False
    try:
        while (event := await _next_event(events, gone)) is not None:
            if isinstance(event, Failed):
                raise _failure(event.error)
            if body.stream:  # headers go out once the engine has taken the job: its refusal is still a 4xx
                streaming = True
                return StreamingResponse(_sse(reply, event, events, job, body.include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            if isinstance(event, Finished):
                return JSONResponse(reply.whole(event))
            reply.tokens += event.tokens
        return Response(status_code=499)  # the client has gone: nobody reads this
    finally:
        gone.cancel()
        if not streaming:
            job.cancel()


class _Reply:
    """Builds the response objects of one request: chat or text completion, whole or as stream chunks."""

    def __init__(self, model_id: str, chat: bool, mode: str):
        self.model_id, self.chat, self.mode = model_id, chat, mode
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokens: list[tuple[str, str | None]] = []

    def _object(self, choices: list, stream: bool, **extra) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id,
                "system_fingerprint": None, "choices": choices, **extra}

    def usage(self, finished: Finished) -> dict:
        return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
                "total_tokens": finished.prompt_tokens + finished.completion_tokens}

    def whole(self, finished: Finished) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finished.text}, "logprobs": None,
                      "finish_reason": finished.finish_reason}
        else:
            choice = {"index": 0, "text": finished.text, "logprobs": None, "finish_reason": finished.finish_reason}
        return self._object([choice], stream=False, usage=self.usage(finished),
                            edgespec={"mode": self.mode, "tokens": _tokens(self.tokens), "stats": finished.stats,
                                      "message": finished.message})

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              usage: bool = False, edgespec: dict | None = None) -> dict:
        """A stream chunk; `usage` (when the client asked for it) is null in every chunk but the last."""
        if self.chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        extra = {"usage": None} if usage else {}
        return self._object([choice], stream=True, **extra, edgespec=edgespec or {})

    def usage_chunk(self, finished: Finished) -> dict:
        """The last chunk when the client asked for usage: no choices, the counts."""
        return self._object([], stream=True, usage=self.usage(finished))


async def _sse(reply: _Reply, first: Event, events: asyncio.Queue, job: Job, include_usage: bool
               ) -> AsyncIterator[str]:
    """The stream of one request; leaving it early (the client went away) cancels the generation."""
    try:
        if reply.chat:
            yield _data(reply.chunk(None, role=True, usage=include_usage, edgespec={"mode": reply.mode}))
        event = first
        while True:
            if isinstance(event, Piece):
                yield _data(reply.chunk(event.text, usage=include_usage,
                                        edgespec={"tokens": _tokens(event.tokens), "stats": event.stats}))
            elif isinstance(event, Finished):
                yield _data(reply.chunk(None, event.finish_reason, usage=include_usage,
                                        edgespec={"mode": reply.mode, "stats": event.stats,
                                                  "message": event.message}))
                if include_usage:
                    yield _data(reply.usage_chunk(event))
                yield "data: [DONE]\n\n"
                return
            else:
                yield _data(_failure(event.error).body())
                return
            event = await events.get()
    finally:
        job.cancel()


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _tokens(tokens: list[tuple[str, str | None]]) -> list[dict]:
    return [{"text": text, "origin": origin} for text, origin in tokens]


async def _next_event(events: asyncio.Queue, gone: asyncio.Future) -> Event | None:
    """The job's next event, or None once the client has disconnected."""
    getter = asyncio.ensure_future(events.get())
    await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    return None


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _read_json(request: Request, limit: int) -> object:
    """The body as JSON, refused past `limit` bytes (413) or when it does not parse (400)."""
    declared = request.headers.get("content-length", "")
    body, size = bytearray(), 0
    if not declared.isdigit() or int(declared) <= _DRAIN_BYTES:
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                body += chunk
            elif size > _DRAIN_BYTES:
                break
    else:
        size = int(declared)
    if size > limit:
        raise ApiError(413, f"the request body has {size} bytes or more; the limit is {limit}",
                       code="request_too_large")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    return value


def _parse(model: type, body: object):
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        message, param = describe(exc)
        raise ApiError(400, message, param=param) from exc


def _check_model(name: str, model_id: str) -> None:
    if name != model_id:
        raise _unknown_model(name, model_id)


def _unknown_model(name: str, model_id: str) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist; this server has {model_id!r} (GET /v1/models)",
                    param="model", code="model_not_found")


def _failure(exc: Exception) -> ApiError:
    """A generation's error as an answer: the caller's mistake (a mode this bundle cannot run, a setting out of
    range, a prompt longer than the context) is a 400, anything else a 500."""
    if isinstance(exc, ModeError):
        return ApiError(400, str(exc), param="edgespec.mode")
    if isinstance(exc, ValueError | TypeError | jinja2.TemplateError):
        return ApiError(400, str(exc))
    log.error("generation failed", exc_info=exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", type="server_error")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(engine: Engine, model_id: str, host: str, port: int, mode: str, max_waiting: int,
          open_browser: bool = False) -> None:
    """Bind, print the address, optionally open the page, and serve until Ctrl-C.

    The socket is bound and listening before the browser opens, so its first request waits in the backlog
    instead of failing; port 0 binds a free port."""
    import uvicorn

    app = create_app(engine, model_id, mode, max_waiting)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    print(f"edgespec: serving {model_id!r} (default mode {mode}) at {url}/ ; OpenAI API at {url}/v1", flush=True)
    if open_browser:
        webbrowser.open(f"{url}/")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
