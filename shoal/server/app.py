"""The HTTP application: `build_app(llm, ...)` returns a FastAPI app serving the OpenAI API for one
model, plus /health and /metrics. Every error leaves in the OpenAI format; a bug is a 500 whose
text stays in the server's log.

Outermost first, a request meets: the Host / Origin check (security.py), the per-client cap when set
(limits.py), then GuardMiddleware (API key, body size and read time), then the routes. Connection-level limits live in limits.py.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.engine.async_engine import DEFAULT_MAX_WAITING, AsyncEngine
from shoal.errors import ShoalError
from shoal.server.embeddings import EmbeddingRequest, EmbeddingServing
from shoal.server.metrics import CONTENT_TYPE, ServerMetrics
from shoal.server.limits import ClientConcurrencyMiddleware, ServerLimits, TokenizerPool
from shoal.server.openapi import install_openapi
from shoal.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    error_body,
)
from shoal.server.responses import ResponsesRequest, ResponsesServing
from shoal.server.security import LOOPBACK_NAMES, HostCheckMiddleware
from shoal.server.serving import INTERNAL_ERROR, OpenAIServing, request_error
from shoal.server.tokenization import TokenizationServing

logger = logging.getLogger("shoal.server")

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
DEMO_MODEL_NAME = "shoal-demo"
STATIC = Path(__file__).parent / "static"  # the chat page served at /
KEYED_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})  # besides /v1: they read the model too


def default_model_name(llm) -> str:
    return llm.config.model or DEMO_MODEL_NAME


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class GuardMiddleware:
    """Checks the API key of /v1 requests and reads bodies up to a size limit, within a time limit, before
    anything else runs."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, body_timeout: float = 60.0) -> None:
        self.app, self.max_body_bytes, self.body_timeout = app, max_body_bytes, body_timeout
        self.api_key = api_key.encode("utf-8") if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and (scope["path"].startswith("/v1") or scope["path"] in KEYED_PATHS):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = RequestError("Incorrect API key provided.", 401, code="invalid_api_key",
                                     headers={"WWW-Authenticate": "Bearer"})
                await _error_response(error)(scope, receive, send)
                return
        too_large = RequestError(f"the request body is larger than {self.max_body_bytes} bytes", 413,
                                 code="request_too_large")
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await _error_response(too_large)(scope, receive, send)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                slow = RequestError(f"the request body did not arrive within {self.body_timeout:g} s", 408,
                                    code="request_timeout", headers={"Connection": "close"})
                await _error_response(slow)(scope, receive, send)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _error_response(too_large)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def build_app(
    llm,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """An app serving `llm` (a shoal.LLM) under `served_model_name`; its engine thread runs while the app does.

    `allowed_hosts`: the Host (and Origin) names it answers (security.allowed_hosts_for; None: any), by
    default those of a loopback bind."""
    limits = limits or ServerLimits()
    model_name = served_model_name or default_model_name(llm)
    metrics = ServerMetrics(model_name)
    engine = AsyncEngine(llm.engine, max_waiting=max_waiting, on_finished=metrics.observe)
    llm.engine.on_step = metrics.observe_step
    tokenizer_pool = TokenizerPool(limits.tokenizer_threads)
    serving = OpenAIServing(llm, engine, model_name, max_prompt_bytes, tool_call_parser, reasoning_parser,
                            tokenizer_pool)
    tokenization = TokenizationServing(serving)
    embeddings = EmbeddingServing(serving)
    responses = ResponsesServing(serving)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        engine.start()
        try:
            yield
        finally:
            tokenizer_pool.shutdown()
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="shoal", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.engine, app.state.serving, app.state.metrics, app.state.limits = engine, serving, metrics, limits

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError) -> Response:
        return _error_response(exc)

    @app.exception_handler(ShoalError)
    async def on_shoal_error(request: Request, exc: ShoalError) -> Response:
        return _error_response(request_error(exc))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = f"{'.'.join(loc)}: {first.get('msg')}" if loc else str(first.get("msg", "invalid request"))
        return _error_response(RequestError(message, param=loc[0] if loc else None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(error_body(INTERNAL_ERROR, "server_error"), status_code=500)

    @app.get("/")
    async def chat_page() -> Response:
        """The chat page: static files shipped in the package, no build step, nothing fetched from elsewhere."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> Response:
        if engine.healthy and engine.closed_reason is None:
            return Response(status_code=200)
        reason = engine.failed_message() if not engine.healthy else engine.closed_reason
        return JSONResponse(error_body(reason, "server_error", code="engine_unavailable"), status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(engine.stats()), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [serving.model_card(started)]})

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> Response:
        serving.check_model(name)
        return JSONResponse(serving.model_card(started))

    # Each reads its own body (serving.parse: a validation error in the OpenAI format); /openapi.json gets the
    # models from install_openapi below.
    bodies = {"/v1/completions": (serving.completions, CompletionRequest),
              "/v1/chat/completions": (serving.chat, ChatCompletionRequest),
              "/v1/responses": (responses.create, ResponsesRequest),
              "/v1/embeddings": (embeddings.embeddings, EmbeddingRequest),
              "/tokenize": (tokenization.tokenize, TokenizeRequest),
              "/detokenize": (tokenization.detokenize, DetokenizeRequest)}
    for path, (handler, _) in bodies.items():
        app.add_api_route(path, handler, methods=["POST"], response_class=Response)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> Response:
        return JSONResponse(tokenization.info())

    install_openapi(app, {path: model for path, (_, model) in bodies.items()})
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes,
                       body_timeout=limits.body_timeout)
    if limits.max_requests_per_client is not None:
        app.add_middleware(ClientConcurrencyMiddleware, limit=limits.max_requests_per_client)
    if allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=frozenset(allowed_hosts))  # added last: runs first
    return app

