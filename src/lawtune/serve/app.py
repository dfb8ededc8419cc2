"""The FastAPI application of `lawtune serve`: its routes, and the guard in front of them (body limit, draining,
the access log and request metrics)."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as api
from .chat import chat_json, chat_stream, plan_chat, rows_of
from .completions import completions_json, completions_stream, plan_completion
from .runtime import RequestError, ServeState, error_response

access_log = logging.getLogger("lawtune.access")

# An over-long body is read and thrown away (so that the client reads its 413 instead of a reset) up to this many
# times the limit; past that the connection is closed.
DISCARD_FACTOR = 64
ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/", "/openapi.json")


class Guard:
    """Outermost ASGI layer: refuses what must not reach the application (an over-long body: read and thrown away, so
    the client gets its 413 and a clean close, never a reset; requests while the server drains), counts every request
    for /metrics and writes the access log line."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.monotonic(), {"code": 0}

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.state.draining and scope["path"].startswith("/v1/"):
                await self.answer(sending, RequestError(503, "the server is shutting down", "server_error",
                                                        code="shutdown",
                                                        headers={"Connection": "close", "Retry-After": "1"}))
                return
            body_receive = await self.read_body(scope, receive, sending)
            if body_receive is not None:
                await self.app(scope, body_receive, sending)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.state.metrics.requests.labels(route, str(status["code"])).inc()
            prompt, generated = scope.get("lawtune.tokens", (0, 0))
            access_log.info("%s %s %s prompt_tokens=%d completion_tokens=%d %.3fs", scope["method"], scope["path"],
                            status["code"], prompt, generated, time.monotonic() - start)

    @staticmethod
    async def answer(send, exc: RequestError) -> None:
        body = json.dumps(api.error_body(exc.message, exc.kind, exc.param, exc.code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (exc.headers or {}).items()]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def read_body(self, scope, receive, send):
        """The request's receive, its body read ahead and checked against the limit; None when answered here."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive
        headers = dict(scope["headers"])
        limit = self.state.cfg.max_body_bytes
        declared = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        too_long = RequestError(413, f"the request body is over serve.max_body_bytes={limit} bytes",
                                code="request_too_large", headers={"Connection": "close"})
        if declared is None and not chunked:
            await self.answer(send, RequestError(411, "a Content-Length header (or a chunked body) is required",
                                                 headers={"Connection": "close"}))
            return None
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if await self.discard(receive, 0, limit):
                await self.answer(send, too_long)
            return None
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                if not more or await self.discard(receive, len(body), limit):
                    await self.answer(send, too_long)
                return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then what the server tells about the client (a disconnect)

        return replay

    @staticmethod
    async def discard(receive, seen: int, limit: int) -> bool:
        """Read the rest of a body without keeping it; False when the client went away or it ran past what is worth
        reading (then the connection is just closed)."""
        while seen <= DISCARD_FACTOR * limit:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
        return False


def validation_message(exc: RequestValidationError) -> RequestError:
    err = exc.errors()[0]
    loc = [part for part in err["loc"] if part != "body"]
    # A union's error names the member it tried (prompt.str, prompt.list[int]): the field is what the user wrote.
    key = ".".join(str(p) for p in loc if isinstance(p, str) and "[" not in p and p not in ("str", "function-after"))
    if err["type"] == "json_invalid":
        return RequestError(400, f"the request body is not valid JSON ({err.get('ctx', {}).get('error', err['msg'])})")
    if not loc and err["type"] in ("model_attributes_type", "dict_type", "model_type"):
        return RequestError(400, "the request body must be a JSON object")
    message = str(err.get("ctx", {}).get("error", "")) if err["type"] == "value_error" else ""
    if not message:
        message = f"{key or 'body'}: {err['msg'][0].lower()}{err['msg'][1:]}"
    return RequestError(400, message, param=key.split(".")[0] or None)


def authorize(request: Request) -> None:
    key = request.app.state.lawtune.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise RequestError(401, "a valid API key is required (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def make_app(state: ServeState, load: Callable[[], None] | None = None) -> Guard:
    """The application, wrapped in its ``Guard``. ``load`` runs in a thread at startup (the model, the engine and
    its graphs); until it has, /health and the generation routes answer 503."""

    @asynccontextmanager
    async def lifespan(_app):
        if load is not None:
            threading.Thread(target=load, name="lawtune-load", daemon=True).start()
        yield
        state.close_pump()
        generator = state.loaded.generator if state.loaded else None
        if generator is not None:
            generator.close()  # the server made it: its loop, cache, graphs and model reference go

    app = FastAPI(title="lawtune serve", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="An OpenAI-compatible API for one model fine-tuned on Chinese legal exam questions.")
    app.state.lawtune = state

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"no route {request.url.path}" if exc.status_code == 404 else f"{exc.detail} ({request.method})"
        return error_response(RequestError(exc.status_code, message, kind))

    def require_ready() -> None:
        if not state.ready.is_set():
            raise RequestError(503, "the model is loading; retry shortly (GET /health says when it is ready)",
                               "server_error", code="loading", headers={"Retry-After": "5"})

    def deadline_of(arrived: float) -> float | None:
        limit = state.cfg.request_timeout_s
        return None if limit is None else arrived + limit

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @v1.get("/models", response_model=api.ModelList)
    async def models() -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(created=state.started)])

    @v1.post("/chat/completions", response_model=api.ChatCompletion,
             responses={400: {"model": api.ErrorResponse}, 503: {"model": api.ErrorResponse}})
    async def chat_completions(body: api.ChatRequest, request: Request) -> Response:
        """A chat completion: the last user message is the question (a JEC-QA record as JSON, or text with trailing
        option lines); ``reasoning_content`` holds the think text and ``answer`` the letters read from the answer."""
        arrived = time.monotonic()
        require_ready()
        plan = await run_in_threadpool(plan_chat, state, body)
        rows = rows_of(body)
        state.admit(rows)
        if body.stream:  # the stream releases its rows when it ends
            try:
                return await chat_stream(state, body, plan, arrived, deadline_of(arrived), request.scope)
            except BaseException:
                state.release(rows)
                raise
        try:
            return await chat_json(state, body, plan, arrived, deadline_of(arrived), request.scope)
        finally:
            state.release(rows)

    @v1.post("/completions", response_model=api.Completion,
             responses={400: {"model": api.ErrorResponse}, 503: {"model": api.ErrorResponse}})
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        """A text completion of a raw prompt (text or token ids, no chat template); ``echo`` with ``logprobs``
        returns the prompt's log-probabilities (``max_tokens`` 0: scoring only)."""
        arrived = time.monotonic()
        require_ready()
        prompts, gcfg = await run_in_threadpool(plan_completion, state, body)
        rows = len(prompts) * body.n
        state.admit(rows)
        if body.stream:
            try:
                return await completions_stream(state, body, prompts, gcfg, arrived, deadline_of(arrived),
                                                request.scope)
            except BaseException:
                state.release(rows)
                raise
        try:
            return await completions_json(state, body, prompts, gcfg, arrived, deadline_of(arrived), request.scope)
        finally:
            state.release(rows)

    app.include_router(v1)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lawtune").joinpath("assets/serve.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 once the model is loaded and its graphs recorded; 503 while loading or shutting down."""
        if state.ready.is_set() and not state.draining:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "draining" if state.draining else "loading"}, 503)

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics: requests by route and status, tokens, queue depth, running rows, latencies."""
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, state)
