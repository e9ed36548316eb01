"""The FastAPI application: routes, error handlers, and the guard middleware (guard.py).

    state = ServerState(settings)            # the model may still be loading: /health says 503
    app = create_app(state)
    state.attach(engine)                     # from then on the API answers

Every error is answered in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: bad
input is a 400 naming the field (never a 500), an unknown route 404, a full queue 503 with
Retry-After. Bodies never contain tracebacks or file paths.
"""

from __future__ import annotations

import logging
from collections import Counter

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from .. import __version__
from ..engine import Engine
from . import metrics
from .guard import Guard
from .protocol import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, ErrorResponse,
                       Health, ModelCard, ModelList)
from .service import RETRY_AFTER_S, ApiError, Service
from .settings import ServeSettings

log = logging.getLogger(__name__)

_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})
_ERRORS = {400: {"model": ErrorResponse, "description": "invalid request"},
           401: {"model": ErrorResponse, "description": "missing or wrong API key"},
           503: {"model": ErrorResponse, "description": "loading, or the queue is full (see Retry-After)"}}
_STREAM = {"text/event-stream": {"schema": {"type": "string", "description": "`data: {json}` events, "
                                             "then `data: [DONE]`"}}}


class ServerState:
    """What the routes share: the settings, response counters, and the service once the model
    is loaded (`attach`) or why it could not be (`fail`)."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.service: Service | None = None
        self.load_error: str | None = None
        self.http_counts: Counter = Counter()

    def attach(self, engine: Engine, model_id: str | None = None) -> Service:
        self.service = Service(engine, self.settings, model_id or self.settings.model_name or engine.model.path.name)
        return self.service

    def fail(self, message: str) -> None:
        self.load_error = message

    def require(self) -> Service:
        if self.service is not None:
            return self.service
        if self.load_error is not None:
            raise ApiError(503, "the model failed to load; see the server log", type="server_error",
                           code="model_load_failed")
        raise ApiError(503, "the model is still loading", type="server_error", code="model_loading",
                       headers={"Retry-After": str(RETRY_AFTER_S)})


class EventStream(StreamingResponse):
    """A server-sent event stream that cancels its request however the response ends (even if
    the client left before the first event)."""

    media_type = "text/event-stream"

    def __init__(self, events, handle):
        super().__init__(events, headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="ernie-edge", version=__version__, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible local API for ERNIE-4.5 Thinking (see docs/API.md).")
    app.state.server = state
    app.add_middleware(Guard, settings=state.settings, counts=state.http_counts)
    _add_error_handlers(app)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatCompletion, "content": _STREAM}, **_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Chat completion, streamed (`stream: true`) or not."""
        service = state.require()
        prepared = await run_in_threadpool(service.prepare_chat, body)
        handle = service.submit(prepared)
        if prepared.stream:
            return EventStream(service.chat_events(prepared, handle), handle)
        return _json_or_gone(await service.chat_response(prepared, handle, request))

    @app.post("/v1/completions", response_model=None,
              responses={200: {"model": Completion, "content": _STREAM}, **_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Raw text completion (no chat template), streamed or not."""
        service = state.require()
        prepared = await run_in_threadpool(service.prepare_completion, body)
        handle = service.submit(prepared)
        if prepared.stream:
            return EventStream(service.completion_events(prepared, handle), handle)
        return _json_or_gone(await service.completion_response(prepared, handle, request))

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> dict:
        """The served model."""
        return state.require().models()

    @app.get("/v1/models/{model_id}", response_model=ModelCard, responses={404: {"model": ErrorResponse}, **_ERRORS})
    async def model(model_id: str) -> dict:
        service = state.require()
        if model_id != service.model_id:
            raise ApiError(404, f"no model {model_id[:100]!r} here; this server serves {service.model_id!r}",
                           param="model", code="model_not_found")
        return service.model_card()

    @app.get("/health", response_model=Health, responses={503: {"model": Health}})
    async def health() -> Response:
        """200 once the model is loaded; 503 while it loads (or if it failed)."""
        if state.service is not None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics", response_class=PlainTextResponse, responses={401: _ERRORS[401]})
    async def prometheus() -> Response:
        """Prometheus text format: requests, tokens, tokens/s, queue depth, busy slots."""
        service = state.service
        text = metrics.render(service.engine.stats() if service else None, state.http_counts,
                              service.json_invalid if service else 0, service is not None)
        return Response(text, media_type=metrics.CONTENT_TYPE)

    return app


def _json_or_gone(result: dict | None) -> Response:
    """The answer, or an empty 204 when the client went away before it (nobody reads it)."""
    return JSONResponse(result) if result is not None else Response(status_code=204)


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = {404: f"no route {request.url.path[:200]}", 405: f"{request.method} is not allowed here"}
        return _error_response(ApiError(e.status_code, message.get(e.status_code, str(e.detail)), code=code,
                                        headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=e)
        return _error_response(ApiError(500, "internal server error; see the server log", type="server_error"))


def validation_error(errors: list[dict]) -> ApiError:
    """The most telling pydantic error as a 400: `param` is the field's path (messages.0.content).
    Of a union's errors (one per member), one about a value beats "not of this type"."""
    ranked = sorted(errors, key=lambda e: (str(e.get("type", "")).endswith("_type"), -len(e.get("loc", ()))))
    err = ranked[0] if ranked else {"loc": (), "msg": "invalid request", "type": ""}
    if err.get("type") == "json_invalid":
        return ApiError(400, "the body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kept = []
    for part in loc:
        if part in _TYPE_TAGS or "[" in part or "-" in part:
            break  # a union member's name, not a field
        kept.append(part)
    param = ".".join(kept) or None
    if not loc and err.get("type") == "missing":
        return ApiError(400, "the request needs a JSON object body", code="invalid_body")
    message = err.get("msg", "invalid value")
    return ApiError(400, f"{param}: {message}" if param else f"the body: {message}", param=param)
