"""The HTTP layer of `nanoctl serve`: a FastAPI app speaking OpenAI's API over a scheduler.

Routes: `POST /v1/chat/completions` (and the bare `/chat/completions` nanochat's page used),
`POST /v1/completions`, `GET /v1/models[/{id}]`, `GET /health` (503 while loading or draining, so load
balancers and Kubernetes readiness probes skip the replica), `GET /metrics` (Prometheus text), and
`GET /` (the bundled web page, when present).

Every error is OpenAI's error object `{"error": {"message", "type", "param", "code"}}`, never FastAPI's
`detail`. A pure ASGI gate in front of the routes (pure, not BaseHTTPMiddleware, so streams and client
disconnects pass through untouched) does, in order: the bearer key check (every route but `/health` and
the static page, which hold nothing secret and must load in a browser that cannot send a header), the
drain check (503 once shutdown began), and the body size limit (413, enforced on the bytes received,
before anything parses them). CORS (off unless origins are given) wraps the gate, so preflights and
errors carry its headers.

The app is built around a `ServerState` the server fills in once the model is loaded, so `/health` and
`/metrics` answer while loading; tests build it with a scheduler directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nanoctl.serve.metrics import CONTENT_TYPE, ServeMetrics
from nanoctl.serve.protocol import (
    ApiError,
    Generation,
    Ids,
    Limits,
    StopMatcher,
    chunk_object,
    completion_object,
    parse_chat,
    parse_completion,
    render_prompt,
    usage,
)
from nanoctl.serve.scheduler import (
    ErrorEvent,
    FinishEvent,
    GenerationRequest,
    QueueFull,
    RequestHandle,
    TokenEvent,
)

CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")
COMPLETION_PATH = "/v1/completions"
# Routes counted as requests in flight (what a drain waits for); probes and scrapes are not.
UNGATED = ("/health", "/metrics")
PUBLIC = ("/health", "/")  # no key needed: the probe and the static page


@dataclass
class ServedModel:
    """One loaded model behind its scheduler (or a Router over one scheduler per GPU)."""

    label: str  # the model id clients pass, e.g. "sft/d20@700"
    tokenizer: Any
    backend: Any  # Scheduler | Router: submit / queue_depth / active_rows / max_batch
    completion_mode: bool  # a base model: /v1/completions only
    context_len: int
    rows_per_engine: int  # the most rows one request (n) can get: one scheduler's max_batch
    engines: int = 1
    kv_dtype: str = "float32"  # what the KV cache stores (`--kv-dtype`; default the model's dtype)
    created: int = field(default_factory=lambda: int(time.time()))
    # Several `--lora` adapters on an unmerged base: model id -> the bank's adapter index. A request's
    # `model` picks one; the base's own label (or no `model`) means none.
    adapters: dict[str, int] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size())

    @property
    def ids(self) -> list[str]:
        """Every model id this server answers to: the base first, then the adapters."""
        return [self.label, *self.adapters]

    def adapter_of(self, model_id: str | None) -> int:
        """The adapter index a request's `model` selects (-1: the base); 404 for an unknown id."""
        if model_id is None or model_id == self.label:
            return -1
        if model_id in self.adapters:
            return self.adapters[model_id]
        raise _unknown_model(model_id, self)


@dataclass
class AppConfig:
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 1 << 20
    log_conversations: Path | None = None
    retry_after_s: int = 1  # Retry-After of a 429: a decode step frees rows within milliseconds


class ServerState:
    """Where the server is in its life (loading -> ready -> draining; or failed) and what is in flight."""

    def __init__(self) -> None:
        self.phase = "loading"
        self.model: ServedModel | None = None
        self.error: str | None = None  # why loading failed
        self.in_flight = 0  # gated requests being answered (a drain waits for 0)
        self.handles: set[RequestHandle] = set()  # generation requests in the schedulers

    def set_ready(self, model: ServedModel) -> None:
        self.model = model
        if self.phase == "loading":
            self.phase = "ready"

    def set_failed(self, message: str) -> None:
        self.error = message
        self.phase = "failed"

    def begin_drain(self) -> None:
        """Stop admitting: new requests get 503 while the ones in flight finish."""
        self.phase = "draining"

    def cancel_all(self) -> None:
        """The drain ran out of time: end every generation now (streams get an error event)."""
        for handle in list(self.handles):
            handle.cancel()


class _Failed(Exception):
    """A generation that failed after it was admitted (inside a stream: one error event)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


class ConversationLog:
    """`--log-conversations FILE`: one JSON line per request, appended with one write(2) on an O_APPEND
    descriptor, so concurrent requests (and processes) never interleave inside a line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)  # private: users' chats
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        with self._lock:
            os.write(self._fd, line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Gate:
    """Auth, drain and body-size checks before routing, plus the request metrics (see module doc)."""

    def __init__(self, app: ASGIApp, config: AppConfig, state: ServerState, metrics: ServeMetrics) -> None:
        self.app = app
        self.config = config
        self.state = state
        self.metrics = metrics
        self.key = config.api_key.encode() if config.api_key else None

    def _authorized(self, scope: Scope) -> bool:
        if self.key is None:
            return True
        header = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.partition(b" ")
        # compare_digest: the time taken says nothing about how much of the key matched
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"  # bounded label values
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        gated = path not in UNGATED
        self.metrics.in_flight.inc()
        if gated:
            self.state.in_flight += 1
        try:
            refusal = self._refusal(scope, path)
            if refusal is None:
                receive, refusal = await self._read_body(scope, receive)
            if refusal is not None:
                await _error_response(refusal)(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            if gated:
                self.state.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()

    def _refusal(self, scope: Scope, path: str) -> ApiError | None:
        public = path == "/health" or (path == "/" and scope["method"] in ("GET", "HEAD"))
        if not public and not self._authorized(scope):
            return ApiError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>' (the server's --api-key)",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        if self.state.phase == "draining" and path not in UNGATED:
            return ApiError(
                503, "The server is shutting down; retry on another replica", code="shutting_down"
            )
        return None

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[Receive, ApiError | None]:
        """Read the whole body (at most the limit) before the app sees it; replay it to the app."""
        limit = self.config.max_body_bytes
        too_large = ApiError(
            413, f"The request body is larger than this server's limit of {limit} bytes (--max-body-bytes)",
            code="request_too_large",
        )  # fmt: skip
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return receive, too_large  # refused before a byte of it is read
                except ValueError:
                    return receive, ApiError(400, "Invalid Content-Length header")
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return receive, None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return receive, ApiError(400, "The client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:  # a chunked body without Content-Length
                return receive, too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the real channel: http.disconnect arrives here

        return replay, None


_ENDPOINTS = {*CHAT_PATHS, COMPLETION_PATH, "/v1/models", "/health", "/metrics", "/"}


class _Choices:
    """Token events -> text per choice: UTF-8-safe decoding, stop strings, counts and finish reasons."""

    def __init__(self, n: int, tokenizer: Any, stops: tuple[str, ...]) -> None:
        from nanoctl.chat import StreamDecoder

        self.decoders = [StreamDecoder(tokenizer) for _ in range(n)]
        self.matchers = [StopMatcher(stops) for _ in range(n)]
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.tokens = [0] * n

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reasons)

    def token(self, i: int, token: int) -> str:
        self.tokens[i] += 1
        out = self.matchers[i].push(self.decoders[i].push(token))
        self.texts[i] += out
        if self.matchers[i].stopped:
            self.reasons[i] = "stop"  # a stop string: OpenAI's finish_reason for it is "stop" too
        return out

    def finish(self, i: int, reason: str) -> str:
        out = self.matchers[i].push(self.decoders[i].flush())
        if not self.matchers[i].stopped:
            out += self.matchers[i].finish()
        self.texts[i] += out
        self.reasons[i] = "stop" if self.matchers[i].stopped else reason
        return out


def create_app(
    config: AppConfig | None = None, state: ServerState | None = None, metrics: ServeMetrics | None = None
) -> FastAPI:
    """The ASGI app. `state` is filled by the server once the model is loaded (until then: 503)."""
    config = config or AppConfig()
    state = state or ServerState()
    metrics = metrics or ServeMetrics()
    limits = config.limits
    log = ConversationLog(config.log_conversations) if config.log_conversations else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if log is not None:
            log.close()

    app = FastAPI(title="nanoctl serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.nanoctl = state
    app.state.metrics = metrics
    app.state.config = config

    def backend_value(name: str) -> float:
        return float(getattr(state.model.backend, name)) if state.model is not None else 0.0

    metrics.watch(
        lambda: backend_value("queue_depth"), lambda: backend_value("active_rows"),
        lambda: backend_value("max_batch"),
    )  # fmt: skip
    metrics.ready.set_function(lambda: 1.0 if state.phase == "ready" else 0.0)
    app.add_middleware(_Gate, config=config, state=state, metrics=metrics)
    if config.cors_origins:  # added last = outermost: preflights are answered before the key check
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"],
        )  # fmt: skip

    # -- errors: OpenAI's object everywhere ---------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = (
                f"Unknown path {request.url.path}; see /v1/models, /v1/chat/completions, /v1/completions"
            )
        else:
            message = str(e.detail)
        return _error_response(ApiError(e.status_code, message, headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"msg": "invalid request", "loc": ()}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error_response(ApiError(400, str(first.get("msg")), param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        return _error_response(ApiError(500, f"Internal server error: {type(e).__name__}: {e}"))

    # -- routes -------------------------------------------------------------------------------------

    def ready_model() -> ServedModel:
        if state.phase == "ready" and state.model is not None:
            return state.model
        if state.phase == "failed":
            raise ApiError(503, f"The model failed to load: {state.error}", code="load_failed")
        if state.phase == "draining":
            raise ApiError(503, "The server is shutting down", code="shutting_down")
        raise ApiError(503, "Loading model", code="loading")

    @app.get("/health")
    async def health() -> JSONResponse:
        model = ready_model()  # 503 (OpenAI error, llama.cpp's shape) until ready
        backend = model.backend
        body = {
            "status": "ok",
            "model": model.label,
            "workers": model.engines,
            "kv_dtype": model.kv_dtype,
            "queue_depth": backend.queue_depth,
            "active_rows": backend.active_rows,
            "max_rows": backend.max_batch,
        }
        if model.adapters:
            body["adapters"] = list(model.adapters)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card(model: ServedModel, model_id: str) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": model.created, "owned_by": "nanoctl"}
        if model_id != model.label:
            card["parent"] = model.label  # an adapter on the base, as vLLM lists its LoRA modules
        return card

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        model = ready_model()
        return JSONResponse({"object": "list", "data": [model_card(model, i) for i in model.ids]})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        model = ready_model()
        model.adapter_of(model_id)  # 404 for an unknown id
        return JSONResponse(model_card(model, model_id))

    @app.get("/", response_model=None)
    async def index() -> HTMLResponse | JSONResponse:
        page = _static_page()
        if page is None:
            return _error_response(ApiError(404, "No web page is bundled; use the API under /v1"))
        return HTMLResponse(page)

    async def chat(request: Request) -> Response:
        model = ready_model()
        gen = parse_chat(await request.body(), limits)
        if model.completion_mode:
            raise ApiError(
                400, f"'{model.label}' is a base model (no chat template); use /v1/completions for text "
                "continuation", param="model", code="model_not_chat",
            )  # fmt: skip
        return await generate(request, gen, model, request.url.path)

    for path in CHAT_PATHS:
        app.post(path, response_model=None)(chat)

    @app.post(COMPLETION_PATH, response_model=None)
    async def completions(request: Request) -> Response:
        model = ready_model()
        gen = parse_completion(await request.body(), limits)
        return await generate(request, gen, model, COMPLETION_PATH)

    # -- generation ---------------------------------------------------------------------------------

    async def generate(request: Request, gen: Generation, model: ServedModel, endpoint: str) -> Response:
        adapter = model.adapter_of(gen.model)
        model_id = model.label if adapter < 0 else str(gen.model)  # what the reply says answered it
        if gen.n > model.rows_per_engine:
            raise ApiError(
                400, f"'n' is {gen.n}; this server decodes at most {model.rows_per_engine} rows per request "
                "(--max-batch)", param="n", code="invalid_value",
            )  # fmt: skip
        try:
            prompt = render_prompt(gen, model.tokenizer, model.vocab_size)
        except ValueError as e:  # the tokenizer's ConversationError
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        limit = limits.prompt_limit(model.context_len)
        if len(prompt) > limit:
            raise ApiError(
                400, f"The prompt is {len(prompt)} tokens; this server accepts at most {limit} (the model's "
                f"context is {model.context_len} tokens)", param="messages" if gen.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )  # fmt: skip
        try:
            handle = model.backend.submit(
                GenerationRequest(prompt, gen.params, gen.n, adapter), asyncio.get_running_loop()
            )
        except QueueFull:
            raise ApiError(
                429, "The server is busy (its queue is full); retry shortly", code="rate_limit_exceeded",
                headers={"Retry-After": str(config.retry_after_s)},
            ) from None  # fmt: skip
        except ValueError as e:
            raise ApiError(400, str(e), code="invalid_value") from None
        state.handles.add(handle)
        metrics.prompt_tokens.inc(len(prompt))
        ids = Ids(gen.kind)
        choices = _Choices(gen.n, model.tokenizer, gen.stop)
        events = _events(handle, choices, metrics)
        if gen.stream:
            return _GenerationStream(
                _stream(gen, model_id, ids, choices, events, handle, len(prompt), endpoint),
                lambda: _done(handle, gen, model_id, ids, choices, len(prompt), endpoint),
            )
        return await _collect(request, gen, model_id, ids, choices, events, handle, len(prompt), endpoint)

    def _done(handle: RequestHandle, gen: Generation, model_id: str, ids: Ids, choices: _Choices,
              prompt_tokens: int, endpoint: str, error: str | None = None) -> None:  # fmt: skip
        """Once per request, however it ended: free its rows, forget it, log it."""
        if handle not in state.handles:
            return
        handle.cancel()  # frees the rows of choices that ended early (stop string, disconnect, error)
        state.handles.discard(handle)
        if log is not None:
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "id": ids.id,
                "endpoint": endpoint,
                "model": model_id,
                **gen.log_record(),
                "choices": [
                    {"text": t, "finish_reason": r or "cancelled"}
                    for t, r in zip(choices.texts, choices.reasons, strict=True)
                ],
                "usage": usage(prompt_tokens, sum(choices.tokens)),
            }
            if error:
                record["error"] = error
            try:
                log.write(record)
            except OSError as e:  # a full disk must not take the answer down with it
                print(f"warning: --log-conversations: {e}", file=sys.stderr, flush=True)

    async def _stream(gen: Generation, model_id: str, ids: Ids, choices: _Choices,
                      events: AsyncIterator[tuple[int, str, str | None]], handle: RequestHandle,
                      prompt_tokens: int, endpoint: str) -> AsyncIterator[str]:  # fmt: skip
        error: str | None = None
        try:
            extra = {"with_usage_field": gen.include_usage}
            for i in range(gen.n):
                yield _sse(chunk_object(ids, model_id, i, role=gen.kind == "chat", **extra))
            async for i, text, reason in events:
                if text:
                    yield _sse(chunk_object(ids, model_id, i, text=text, **extra))
                if reason is not None:
                    yield _sse(chunk_object(ids, model_id, i, text="" if gen.kind != "chat" else None,
                                            finish_reason=reason, **extra))  # fmt: skip
            if gen.include_usage:
                yield _sse(
                    chunk_object(ids, model_id, None, usage_=usage(prompt_tokens, sum(choices.tokens)))
                )
            yield "data: [DONE]\n\n"
        except _Failed as e:
            error = e.error.message
            yield _sse(e.error.body())  # one error event, then the stream ends (vLLM's convention)
        except Exception as e:  # a bug: the headers are sent already, so say it in the stream
            error = f"{type(e).__name__}: {e}"
            yield _sse(ApiError(500, f"Internal server error: {error}").body())
        finally:
            # Also reached when the client disconnects: the response task is cancelled inside `events`.
            _done(handle, gen, model_id, ids, choices, prompt_tokens, endpoint, error)

    async def _collect(request: Request, gen: Generation, model_id: str, ids: Ids, choices: _Choices,
                       events: AsyncIterator[tuple[int, str, str | None]], handle: RequestHandle,
                       prompt_tokens: int, endpoint: str) -> Response:  # fmt: skip
        async def drain() -> None:
            async for _ in events:
                pass

        work = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(_disconnected(request))
        error: str | None = None
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
            if not work.done():  # the client left: stop generating for nobody
                work.cancel()
                return Response(status_code=499)
            try:
                work.result()
            except _Failed as e:
                error = e.error.message
                return _error_response(e.error)
            texts = choices.texts
            reasons = [r or "stop" for r in choices.reasons]
            return JSONResponse(
                completion_object(ids, model_id, texts, reasons, prompt_tokens, sum(choices.tokens))
            )
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
            _done(handle, gen, model_id, ids, choices, prompt_tokens, endpoint, error)

    return app


class _GenerationStream(StreamingResponse):
    """An SSE response that runs `on_close` however the response ends: the body generator's own
    `finally` never runs if the client hangs up before the first chunk is pulled, and the rows would
    keep decoding for nobody."""

    def __init__(self, content: AsyncIterator[str], on_close: Any) -> None:
        # no-cache and X-Accel-Buffering: proxies (nginx) must pass events on as they come
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the body was read already, so only http.disconnect comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _events(
    handle: RequestHandle, choices: _Choices, metrics: ServeMetrics
) -> AsyncIterator[tuple[int, str, str | None]]:
    """(choice index, text, finish reason or None) until every choice has finished."""
    first = True
    last_at: dict[int, float] = {}
    while not choices.done:
        event = await handle.events.get()
        now = time.perf_counter()
        if isinstance(event, ErrorEvent):
            raise _Failed(ApiError(500, f"Generation failed: {event.message}", code="generation_failed"))
        if choices.reasons[event.index] is not None:
            continue  # this choice already ended on a stop string; its row is cancelled with the request
        if isinstance(event, TokenEvent):
            metrics.generated_tokens.inc()
            if first:
                metrics.ttft.observe(now - handle.submitted)
                first = False
            if event.index in last_at:
                metrics.itl.observe(now - last_at[event.index])
            last_at[event.index] = now
            text = choices.token(event.index, event.token)
            reason = choices.reasons[event.index]
        elif isinstance(event, FinishEvent):
            if event.reason == "cancelled":  # not ours (ours end the loop first): the drain timed out
                raise _Failed(
                    ApiError(503, "The server shut down before the reply was finished", code="shutting_down")
                )
            text = choices.finish(event.index, event.reason)
            reason = choices.reasons[event.index]
        else:  # pragma: no cover - the scheduler sends only these three
            continue
        if reason is not None:
            metrics.finished.labels(reason).inc()
        if text or reason is not None:
            yield event.index, text, reason


def _unknown_model(name: str, model: ServedModel) -> ApiError:
    served = ", ".join(f"'{i}'" for i in model.ids)
    return ApiError(
        404, f"The model '{name}' does not exist; this server serves {served}", param="model",
        code="model_not_found",
    )  # fmt: skip


def _static_page() -> str | None:
    from importlib.resources import files

    page = files("nanoctl.serve").joinpath("static", "index.html")
    try:
        return page.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError, OSError):
        return None
