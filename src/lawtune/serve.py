"""`lawtune serve`: an OpenAI-compatible HTTP API and a one-page UI for one loaded model.

Standard library only (``http.server.ThreadingHTTPServer``): each request has its own thread, and all of them
generate through one generation engine running in the background (``generation/engine.py``): a request that
arrives while others run joins their batch at the next step, and a client that disconnects frees its row.

* ``GET /v1/models``: the one model id, ``lawtune``.
* ``POST /v1/chat/completions``: streaming (server-sent events ``data: {...}`` then ``data: [DONE]``)
  and non-streaming. The last user message is the question: a JEC-QA-shaped JSON record, or plain
  text whose trailing lines ``A. …``, ``B. …`` are read as its options. Extra request field ``mode``
  (``direct``, the default, or ``reasoning``). The reasoning comes back in ``reasoning_content``
  beside ``content`` (split at ``</think>``), and the letters read from the answer in ``answer``. ``n`` > 1
  samples (``temperature`` > 0) come back as that many choices (not streamed).
* ``GET /``: a self-contained page to type a question and options and watch the answer arrive.

Every bad request gets a 4xx status with ``{"error": {"message": …, "type": …}}``; no request can
stop the server.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from .config import INFER_MODES, ConfigError, GenerationConfig
from .config import replace as replace_config
from .data import DataError, Record
from .generation import default_budget, uses_engine
from .generation.engine import GenerationEngine
from .infer import LoadedModel, generate_events, record_from_text
from .prompts import render_prompt

log = logging.getLogger("lawtune")

MODEL_ID = "lawtune"
MAX_BODY = 1 << 20
MAX_TOKENS_LIMIT = 32768
MAX_CHOICES = 16


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclasses.dataclass
class ChatRequest:
    record: Record
    mode: str
    stream: bool
    max_tokens: int | None
    gcfg: GenerationConfig
    n: int = 1


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        texts = [p for p in parts if isinstance(p, str)]
        if parts and len(texts) == len(parts):
            return "\n".join(texts)
    raise RequestError(400, "messages: the user message content must be a string or a list of text parts",
                       param="messages")


def context_size(engine: LoadedModel) -> int | None:
    """Tokens a request may hold, prompt and answer: the model's max_position_embeddings, and the engine's slot."""
    sizes = [getattr(engine.model.config, "max_position_embeddings", None),
             engine.generator.max_len if engine.generator is not None else None]
    known = [s for s in sizes if s]
    return min(known) if known else None


def check_prompt_length(engine: LoadedModel, req: ChatRequest, max_prompt_tokens: int | None) -> None:
    """Refuse, before the request waits for the model, a prompt that is over the limit or leaves no room in the
    context for the request's token budget (one long prompt would otherwise hold the model for minutes)."""
    prompt = render_prompt(req.record, engine.tokenizer, engine.prompt_format, think=req.mode == "reasoning")
    n = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    context = context_size(engine)
    limit = min(x for x in (max_prompt_tokens, context) if x) if (max_prompt_tokens or context) else None
    if limit and n > limit:
        where = "serve.max_prompt_tokens" if limit == max_prompt_tokens else "the model's context"
        raise RequestError(400, f"messages: the prompt is {n} tokens, over the limit of {limit} ({where})",
                           param="messages", code="context_length_exceeded")
    budget = default_budget(req.mode, req.max_tokens or req.gcfg.max_new_tokens)
    if context and n + budget > context:
        raise RequestError(400, f"messages: the prompt's {n} tokens and a budget of {budget} new tokens exceed the "
                                f"model's context of {context} tokens; send a shorter prompt or a smaller max_tokens",
                           param="messages", code="context_length_exceeded")


def parse_chat_request(body, engine: LoadedModel) -> ChatRequest:
    """Validate a chat completion request body; raises RequestError with the status to answer."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model", MODEL_ID)
    if model not in (MODEL_ID, None):
        raise RequestError(404, f"model {model!r} does not exist; this server has {MODEL_ID!r}", "not_found_error", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "messages: expected a non-empty list of {role, content} objects", param="messages")
    users = [m for m in messages if m.get("role") == "user"]
    if not users:
        raise RequestError(400, "messages: no user message (the last one is the question)", param="messages")
    text = _message_text(users[-1].get("content"))
    mode = body.get("mode", "direct")
    if mode not in INFER_MODES:
        raise RequestError(400, f"mode: {mode!r} is not one of {', '.join(INFER_MODES)}", param="mode")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream: expected true or false", param="stream")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise RequestError(400, f"n: expected an integer from 1 to {MAX_CHOICES}", param="n")
    if n > 1 and stream:
        raise RequestError(400, "n: several choices are returned without streaming only (stream false)", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                   or not 1 <= max_tokens <= MAX_TOKENS_LIMIT):
        raise RequestError(400, f"max_tokens: expected an integer from 1 to {MAX_TOKENS_LIMIT}", param="max_tokens")
    gcfg = engine.gcfg
    temperature, top_p = body.get("temperature"), body.get("top_p")
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise RequestError(400, f"{name}: expected a number >= 0", param=name)
    try:
        if temperature:  # absent or 0: greedy, as in evaluation
            gcfg = replace_config(gcfg, do_sample=True, temperature=float(temperature),
                                       top_p=float(top_p) if top_p else gcfg.top_p)
        record = record_from_text(text, where="messages[-1].content", require_options=False)
    except (ConfigError, DataError) as exc:
        raise RequestError(400, str(exc).splitlines()[0], param="messages") from None
    return ChatRequest(record, mode, stream, max_tokens, gcfg, n)


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _usage(answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.generated_tokens,
            "total_tokens": answer.prompt_tokens + answer.generated_tokens}


def _answer(engine: LoadedModel, req: ChatRequest, index: int):
    """Choice ``index`` of a request: sample i draws with seed + i, so the n choices differ."""
    gcfg = replace_config(req.gcfg, seed=req.gcfg.seed + index) if index else req.gcfg
    answer = None
    for kind, value in generate_events(engine, req.record, req.mode, req.max_tokens, gcfg, stream=False):
        if kind == "done":
            answer = value
    return answer


def complete(engine: LoadedModel, req: ChatRequest) -> dict:
    """A non-streaming chat completion; its ``n`` choices are generated side by side in the engine's batch."""
    from concurrent.futures import ThreadPoolExecutor

    if req.n == 1:
        answers = [_answer(engine, req, 0)]
    else:
        with ThreadPoolExecutor(max_workers=req.n) as pool:
            answers = list(pool.map(lambda i: _answer(engine, req, i), range(req.n)))
    choices = [{"index": i, "message": {"role": "assistant", "content": a.content, "reasoning_content": a.reasoning,
                                        "answer": a.answer or []},
                "finish_reason": "stop" if a.stopped else "length"} for i, a in enumerate(answers)]
    usage = {"prompt_tokens": answers[0].prompt_tokens, "completion_tokens": sum(a.generated_tokens for a in answers)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": MODEL_ID,
            "choices": choices, "usage": usage}


def stream_chunks(engine: LoadedModel, req: ChatRequest):
    """The chunks of a streaming chat completion, as dicts (the caller frames them as SSE)."""
    base = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL_ID}

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    yield chunk({"role": "assistant", "content": ""})
    events = generate_events(engine, req.record, req.mode, req.max_tokens, req.gcfg, stream=True)
    try:
        for kind, value in events:
            if kind == "reasoning":
                yield chunk({"reasoning_content": value})
            elif kind == "content":
                yield chunk({"content": value})
            else:
                yield chunk({"answer": value.answer or []}, "stop" if value.stopped else "length", usage=_usage(value))
    finally:
        events.close()  # a client that went away stops the generation and frees the model


class Handler(BaseHTTPRequestHandler):
    server_version = "lawtune"
    protocol_version = "HTTP/1.1"
    engine: LoadedModel  # set on the subclass made by make_server
    server: Server
    max_prompt_tokens: int | None = None

    def log_message(self, fmt: str, *args) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- responses

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (malformed request line, headers too long …) as JSON too."""
        self.close_connection = True
        try:
            self._send_json(code, error_body(message or HTTPStatus(code).phrase))
        except OSError:
            pass

    def _error(self, exc: RequestError) -> None:
        if exc.status in (411, 413):  # the body was not read: the connection cannot be reused
            self.close_connection = True
        self._send_json(exc.status, error_body(exc.message, exc.kind, exc.param, exc.code))

    # -- routes

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = resources.files("lawtune").joinpath("assets/serve.html").read_bytes()
            self._send(200, page, "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": MODEL_ID, "object": "model", "created": self.server.started, "owned_by": "lawtune"}]})
        elif path == "/v1/chat/completions":
            self._error(RequestError(405, "use POST for /v1/chat/completions"))
        else:
            self._error(RequestError(404, f"no route {path}", "not_found_error"))

    do_HEAD = do_GET

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        self._streaming = False
        try:
            body = self._read_json()
            if path != "/v1/chat/completions":
                raise RequestError(404, f"no route {path}", "not_found_error")
            req = parse_chat_request(body, self.engine)
            check_prompt_length(self.engine, req, self.max_prompt_tokens)
        except RequestError as exc:
            self._error(exc)
            return
        try:
            if req.stream:
                self._stream(req)
            else:
                self._send_json(200, complete(self.engine, req))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one failed generation must not end the server
            log.exception("generation failed")
            self.close_connection = True
            if not getattr(self, "_streaming", False):
                self._send_json(500, error_body(f"generation failed: {type(exc).__name__}: {exc}", "server_error"))

    def _unsupported(self) -> None:
        self._error(RequestError(405, f"method {self.command} is not allowed"))

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _unsupported

    def _read_json(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raise RequestError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if length < 0:
            raise RequestError(411, "a Content-Length header is required")
        if length > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({getattr(exc, 'msg', exc)})") from None

    def _stream(self, req: ChatRequest) -> None:
        self._streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(data: str) -> None:
            payload = f"data: {data}\n\n".encode()
            self.wfile.write(f"{len(payload):x}\r\n".encode("ascii") + payload + b"\r\n")
            self.wfile.flush()

        chunks = stream_chunks(self.engine, req)
        try:
            for item in chunks:
                send(json.dumps(item, ensure_ascii=False))
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as exc:  # noqa: BLE001 - reported in the stream, whose headers are sent
            log.exception("generation failed")
            send(json.dumps(error_body(f"generation failed: {type(exc).__name__}: {exc}", "server_error")))
        finally:
            chunks.close()
        send("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5, and a user saw 4 of 160 requests from 20 clients reset. Requests
    # wait for the model in their own threads, so the queue in front of accept() only has to hold a burst of
    # connections. (640 requests from 64 threads on loopback here lost none even with 5: not reproduced.)
    request_queue_size = 256
    started = 0
    generator: GenerationEngine | None = None

    def server_close(self) -> None:
        super().server_close()
        if self.generator is not None:
            self.generator.stop()

    def handle_error(self, request, client_address) -> None:
        """A client that hangs up (before reading its answer, or in the middle of its request) is not a server
        error: no traceback in the log for it. Anything else is reported as socketserver does."""
        import sys

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("%s: the client went away", client_address[0])
            return
        super().handle_error(request, client_address)


def make_server(engine: LoadedModel, host: str = "127.0.0.1", port: int = 8000, max_prompt_tokens: int | None = None,
                slots: int = 32, max_len: int = 8192) -> Server:
    """A ready server (port 0 = any free port; the bound one is ``server.server_address[1]``) whose requests share
    one background generation engine of ``slots`` rows of ``max_len`` tokens (stopped by ``server_close``)."""
    generator = None
    if uses_engine(engine.model, engine.gcfg):
        context = getattr(engine.model.config, "max_position_embeddings", None) or max_len
        generator = GenerationEngine(engine.model, engine.tokenizer.eos_token_id, slots=slots,
                                     max_len=min(max_len, context),
                                     use_graph=None if engine.gcfg.cuda_graphs else False)
    served = dataclasses.replace(engine, generator=generator)
    handler = type("LawtuneHandler", (Handler,), {"engine": served, "max_prompt_tokens": max_prompt_tokens})
    try:
        server = Server((host, port), handler)
    except BaseException:
        del generator
        raise
    server.started = int(time.time())
    if generator is not None:
        generator.capture_graphs()  # before the first request, not during it
        generator.start()
        server.generator = generator
    return server
