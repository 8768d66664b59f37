"""The node's HTTP surface: the route table, the error handler, and the lifespan that owns the pool.

Handlers validate, wait for the pool and shape answers; the pool owns every model.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import LlmlbError, ModelDownloadError, UnsupportedModelError
from ..redact import has_secrets, redact_json, redact_lines
from . import (
    blob,
    embedding,
    generation,
    inference,
    lb,
    management,
    metrics,
    models,
    openai,
    responses,
    shutdown,
    ui,
)
from .errors import GenerationCancelledError, UnauthorizedError, classify
from .pool import Lease, ModelPool, describe
from .settings import ServerSettings

log = logging.getLogger(__name__)
access_log = logging.getLogger("llmlb_node.server.access")

FIRST_WAIT = 2.0  # a stream waits this long for its model before committing to 200 + comments


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and headers for one of our exceptions."""
    status, type_, code = classify(exc)
    param = getattr(exc, "param", None)
    if isinstance(exc, UnsupportedModelError):
        param = "model"
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return status, openai.error_body(_message(exc), type_, code, param), headers


def _message(exc: BaseException) -> str:
    if isinstance(exc, ModelDownloadError):  # one line per source: kind and message
        causes = "; ".join(f"{f.source}: [{f.kind}] {f.message}" for f in exc.failures)
        return f"could not download model {exc.model_id!r}; every source failed: {causes}"
    return str(exc)


async def on_error(request: Request, exc: Exception) -> Response:
    status, body, headers = error_payload(exc)
    if status >= 500 and status != 503:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(body, status, headers=headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else None
    body = openai.error_body(str(exc.detail), "invalid_request_error", code)
    return JSONResponse(body, exc.status_code, headers=exc.headers)


# -- handlers --------------------------------------------------------------------------------
async def chat_completions(request: Request) -> Response:
    parsed = openai.parse_chat(await openai.read_json(request))
    return await _generate(request, parsed, "create_chat_completion")


async def completions(request: Request) -> Response:
    parsed = openai.parse_completion(await openai.read_json(request))
    return await _generate(request, parsed, "create_completion")


async def create_response(request: Request) -> Response:
    asked = responses.parse(await openai.read_json(request))
    return await _generate(request, asked.chat, "create_chat_completion", asked)


async def embeddings(request: Request) -> Response:
    parsed = openai.parse_embedding(await openai.read_json(request))
    request.state.model = parsed.model
    pool: ModelPool = request.state.pool
    lease = await pool.admit(parsed.model, embedding=True, keep_alive=parsed.keep_alive)
    try:
        result = await _unless_disconnected(request, _embed(lease, parsed))
    finally:
        lease.release()
    request.state.tokens = (result.get("usage") or {}).get("total_tokens")
    request.state.prompt_tokens = (result.get("usage") or {}).get("prompt_tokens")
    return JSONResponse(openai.embeddings_response(result, parsed.model, parsed.encoding_format))


async def list_models(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    data = await asyncio.to_thread(models.model_list, pool, request.state.started)
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    model_id = request.path_params["model_id"]
    await pool.check_known(model_id)
    info = await asyncio.to_thread(models.model_info, pool, model_id, request.state.started)
    return JSONResponse(info)


async def model_status(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    model_id = request.path_params["model_id"]
    await pool.check_known(model_id)
    status = await pool.status(model_id)
    entry = pool.resolver.catalog.find(model_id)
    active, queued = pool.usage(model_id)
    extra = {"state": pool.state(model_id).value, "active_requests": active, "queued": queued}
    return JSONResponse({**models.status_body(status, entry and entry.total_size), **extra})


async def supported_models(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    return JSONResponse(await asyncio.to_thread(models.supported_models, pool))


async def downloads(request: Request) -> Response:
    pool: ModelPool = request.state.pool
    return JSONResponse({"downloads": await asyncio.to_thread(models.downloads, pool)})


# -- generation ------------------------------------------------------------------------------
class Shape(Protocol):
    """How one kind of answer reaches the client: a whole answer's body, a stream's SSE text."""

    def whole(self, result: dict[str, Any]) -> dict[str, Any]: ...

    def events(self, items: AsyncIterator[Any]) -> AsyncIterator[str]: ...


async def _generate(
    request: Request, parsed: openai.ParsedRequest, method: str, shape: Shape | None = None
) -> Response:
    """Generate with ``llm.<method>`` (chat or text completion) and answer in `shape` (by
    default OpenAI's completions, chunks and ``[DONE]``)."""
    shape = shape or openai.ChunkStream(parsed.include_usage)
    request.state.model = parsed.model
    pool: ModelPool = request.state.pool
    lease = await pool.admit(parsed.model, keep_alive=parsed.keep_alive)
    if parsed.stream:
        return await _start_stream(request, lease, parsed, method, shape)
    try:  # a client that leaves while queued gives its LLMLB_MAX_QUEUE place back at once
        result = await _unless_disconnected(request, _answer(lease, parsed, method))
    finally:
        lease.release()
    request.state.tokens = (result.get("usage") or {}).get("completion_tokens")
    request.state.prompt_tokens = (result.get("usage") or {}).get("prompt_tokens")
    return JSONResponse(shape.whole(result))


async def _answer(lease: Lease, parsed: openai.ParsedRequest, method: str) -> Any:
    await lease.wait()
    job = await _job(lease, parsed, method)
    if job is None or lease.engine is None:
        call = functools.partial(inference.call, lease.llm, method, parsed.kwargs, parsed.model)
        return await lease.run(call)
    return await generation.answer(lease.engine, job, generation.submit(lease.engine, job))


async def _job(lease: Lease, parsed: openai.ParsedRequest, method: str) -> generation.Job | None:
    """The request as an engine job (prompt tokenized, grammar built: its 400s now), or None
    for the one-at-a-time path (README: which requests take it)."""
    if lease.engine is None:
        return None
    prepare = functools.partial(generation.prepare, lease.engine, lease.llm, method)
    return await asyncio.to_thread(prepare, parsed.kwargs, parsed.model)


async def _chunks(
    lease: Lease, parsed: openai.ParsedRequest, method: str, job: generation.Job | None
) -> AsyncIterator[dict[str, Any]]:
    """The generation's chunks, its usage chunk last: from the engine, or one at a time."""
    if job is None or lease.engine is None:
        call = functools.partial(inference.stream, lease.llm, method, parsed.kwargs, parsed.model)
        async for chunk in lease.stream(call):
            yield chunk
        return
    async for chunk in generation.chunks(lease.engine, job, generation.submit(lease.engine, job)):
        yield chunk


async def _embed(lease: Lease, parsed: openai.ParsedRequest) -> Any:
    await lease.wait()
    inputs, dimensions = parsed.kwargs["input"], parsed.kwargs["dimensions"]
    return await lease.run(embedding.embed, lease.llm, inputs, dimensions)


async def _start_stream(
    request: Request, lease: Lease, parsed: openai.ParsedRequest, method: str, shape: Shape
) -> Response:
    try:  # errors known at once (a failed download, a full queue, a long prompt) keep their status
        ready = await _unless_disconnected(request, lease.wait(FIRST_WAIT))
        job = await _job(lease, parsed, method) if ready else None
    except BaseException:
        lease.release()
        raise
    events = shape.events(_generated(request, lease, parsed, method, ready, job))
    return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _generated(
    request: Request,
    lease: Lease,
    parsed: openai.ParsedRequest,
    method: str,
    ready: bool,
    job: generation.Job | None,
) -> AsyncIterator[str | dict[str, Any] | openai.StreamError]:
    """A stream's items: a progress text now and at each heartbeat until the model is ours, then
    the generation's chunks, its usage chunk last; a failure from then on is a `StreamError`."""
    pool: ModelPool = request.state.pool
    tokens = 0
    try:
        if not ready:
            while not ready:
                status = await pool.status(parsed.model)
                yield describe(status, pool.state(parsed.model))
                ready = await _unless_disconnected(request, lease.wait(pool.settings.heartbeat))
            job = await _job(lease, parsed, method)
        async for chunk in _chunks(lease, parsed, method, job):
            if openai.is_usage_chunk(chunk):
                tokens = chunk["usage"]["completion_tokens"]
                request.state.prompt_tokens = chunk["usage"]["prompt_tokens"]
            else:
                tokens += 1
            yield chunk
    except LlmlbError as exc:  # the status line is gone: the shape tells the client
        yield openai.StreamError(error_payload(exc)[1])
    finally:
        request.state.tokens = tokens
        lease.release()


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise GenerationCancelledError(f"client closed {request.url.path} before the answer")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# -- middleware ------------------------------------------------------------------------------
class BearerAuth:
    """Every route requires ``Authorization: Bearer <LLMLB_NODE_API_KEY>`` when it is set, but
    the operator's page and its assets (static files: the page asks for the key itself)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.expected is None or self._open(scope):
            await self.app(scope, receive, send)
            return
        exc = UnauthorizedError("missing or wrong API key: send Authorization: Bearer <key>")
        status, body, _ = error_payload(exc)
        headers = {"WWW-Authenticate": "Bearer"}
        await JSONResponse(body, status, headers=headers)(scope, receive, send)

    def _open(self, scope: Scope) -> bool:
        return ui.is_public(scope["path"]) or self._allowed(scope)

    def _allowed(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        # The scheme is case-insensitive (RFC 9110 11.1): `bearer KEY` is the same credential.
        right_scheme = scheme.lower() == b"bearer"
        return hmac.compare_digest(token.strip(), self.expected or b"") and right_scheme


# Routes whose successful answers carry what a model generated: that text is the model's, not
# ours, and masking a short key ("k", "test") in it would garble the answer ("to***ens"). Their
# error answers and the error events of their streams are ours, and are scrubbed.
GENERATION_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"}
)


class RedactJson:
    """Every JSON body we write passes the one scrubber (`llmlb_node.redact`): no configured
    secret leaves in a route's answer, whatever text (a status, a server's error) it carries.
    A model's own output is left as generated (GENERATION_PATHS)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_secrets():
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        chunks: list[bytes] = []
        streamed = generated = False

        async def scrub(message: Message) -> None:
            nonlocal start, streamed, generated
            if message["type"] == "http.response.start":
                generated = scope["path"] in GENERATION_PATHS and message["status"] < 400
                kind = _content_type(message)
                if kind == b"application/json" and not generated:
                    start = message  # held until the body is whole: its length may change
                    return
                streamed = kind in (b"application/x-ndjson", b"text/event-stream")
            elif message["type"] == "http.response.body" and streamed:
                body = message.get("body", b"")
                if not generated or b'"error"' in body:  # an error event is our text
                    message = {**message, "body": _redact_bytes(body, redact_lines)}
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                body = _redact_bytes(b"".join(chunks), redact_json)
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, scrub)


def _redact_bytes(body: bytes, scrub: Callable[[str], str]) -> bytes:
    try:
        text = body.decode()
    except UnicodeDecodeError:  # not text we wrote (JSON and our streams are UTF-8)
        return body
    clean = scrub(text)
    return body if clean == text else clean.encode()


def _content_type(start: Message) -> bytes:
    kind = dict(start.get("headers", [])).get(b"content-type", b"")
    return kind.partition(b";")[0].strip().lower()


class AccessLog:
    """One line per request: method, path, model, status, latency, tokens."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            state = scope.get("state") or {}
            access_log.info(
                "%s %s model=%s status=%s latency=%.1fms tokens=%s",
                scope["method"],
                scope["path"],
                state.get("model", "-"),
                status or 499,
                (time.perf_counter() - started) * 1000,
                state.get("tokens", "-"),
            )


# -- the app ---------------------------------------------------------------------------------
routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/responses", create_response, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id}", get_model, methods=["GET"]),
    Route("/v0/models/{model_id}/status", model_status, methods=["GET"]),
    Route("/v0/supported-models", supported_models, methods=["GET"]),
    Route("/v0/downloads", downloads, methods=["GET"]),
    Route("/api/health", lb.health, methods=["GET"]),
    Route("/api/system", lb.system, methods=["GET"]),
    Route("/api/models/{model_id}/info", lb.model_info, methods=["GET"]),
    Route("/api/models/pull", management.pull, methods=["POST"]),
    Route("/api/tags", management.tags, methods=["GET"]),
    Route("/api/ps", management.ps, methods=["GET"]),
    Route("/api/models/unload", management.unload, methods=["POST"]),
    Route("/api/models/{model_id}", management.delete, methods=["DELETE"]),
    Route("/metrics", metrics.metrics, methods=["GET"]),
    Route("/v0/models/blob/{model_id:path}", blob.blob, methods=["GET", "HEAD"]),
    Route("/", ui.page, methods=["GET"]),
    Route("/ui/{name}", ui.asset, methods=["GET"]),
]


def _cors(origins: tuple[str, ...]) -> list[Middleware]:
    """Browser pages of `origins` may call the node: preflights are answered here, before the
    key is checked (a browser sends none with them), and every answer says who may read it."""
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=list(origins),
            allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    ]


def create_app(settings: ServerSettings | None = None, pool: ModelPool | None = None) -> Starlette:
    """The node's ASGI app; its lifespan creates the model pool (or uses `pool`)."""
    settings = settings or ServerSettings.from_env()
    node_metrics = metrics.NodeMetrics()
    stopping = shutdown.Shutdown(settings.shutdown_grace)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        own = pool or ModelPool(settings)
        node_metrics.watch(own)
        stopping.attach(own)
        await asyncio.to_thread(lambda: own.resolver.catalog)  # parse it once, off the loop
        await asyncio.to_thread(own.resolver.unusable_models)  # WARN what this node cannot run
        await management.resume_interrupted(own)
        hardware = lb.Hardware()
        hardware.start()
        feeds = blob.Feeds(own)
        try:
            yield {
                "pool": own,
                "started": int(time.time()),
                "hardware": hardware,
                "metrics": node_metrics,
                "feeds": feeds,
            }
        finally:
            stopping.expire()  # downloads stop now, resumably
            await hardware.stop()
            await own.close()

    app = Starlette(
        routes=routes,
        exception_handlers={LlmlbError: on_error, HTTPException: on_http_error},
        middleware=[
            Middleware(metrics.RequestMetrics, metrics=node_metrics, routes=routes),
            Middleware(AccessLog),
            Middleware(RedactJson),
            *_cors(settings.cors_origins),
            Middleware(shutdown.EndAtDeadline, shutdown=stopping),
            Middleware(BearerAuth, api_key=settings.api_key),
        ],
        lifespan=lifespan,
    )
    app.state.shutdown = stopping  # `serve` hands it the signals
    return app
