"""`lawtune serve`'s application on uvicorn: a socket bound before anything loads (port 0 = any free port, known at
once), the model loaded in the background (/health says when it is ready), and a graceful shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn

from ..config import ServeConfig
from ..generation import uses_engine
from ..generation.engine import GenerationEngine, budget_rows
from ..infer import LoadedModel
from .app import make_app
from .protocol import MAX_TOP_LOGPROBS
from .runtime import ServeState

log = logging.getLogger("lawtune")

# The last part of serve.shutdown_grace_s: the cancelled requests' ends and uvicorn's closing of connections.
CLOSE_S = 2.0
# 503s answered after the last running request ended, before the socket closes (under a Retry-After of 1 s).
LINGER_S = 0.5
# After the socket closes: the requests of connections accepted before it are read and answered.
ACCEPTED_S = 0.3


class Server(uvicorn.Server):
    """uvicorn's server; on shutdown (SIGTERM, Ctrl-C or ``stop``) it refuses new connections and requests, lets the
    running ones finish for ``serve.shutdown_grace_s``, then cancels the rest (each gets a clean error)."""

    def __init__(self, app, state: ServeState, sock: socket.socket):
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=1)
        super().__init__(config)
        self.state, self.sock = state, sock

    @property
    def server_address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def generator(self) -> GenerationEngine | None:
        return self.state.loaded.generator if self.state.loaded else None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Drain, then close: new requests get a 503 with Retry-After while the socket still listens (a connection
        waiting in the listen queue when it closes would be reset); running ones get ``serve.shutdown_grace_s`` to
        finish, then are cancelled; a last ``LINGER_S`` of 503s lets clients that just got their answer learn of
        the shutdown before the socket closes and new connections are refused."""
        state, loop = self.state, asyncio.get_running_loop()
        state.draining = True
        began = loop.time()
        # The whole shutdown fits in the grace period: what runs at its end (minus the linger and the closing) is
        # cancelled.
        end = began + max(0.0, state.cfg.shutdown_grace_s - LINGER_S - ACCEPTED_S - CLOSE_S)
        log.info("shutting down: %d running or waiting; new requests get 503", state.rows)
        while state.rows and loop.time() < end:
            await asyncio.sleep(0.05)
        if state.rows:
            log.info("shutting down: cancelling %d after %.1f s", state.rows, loop.time() - began)
            state.cancel_all("shutdown")
            while state.rows and loop.time() < end + CLOSE_S / 2:
                await asyncio.sleep(0.02)
        await asyncio.sleep(LINGER_S)
        # Stop listening first, and let requests on connections accepted just before get their 503: uvicorn's own
        # shutdown closes a connection whose request it has not read yet without an answer.
        for server in self.servers:
            server.close()
        await asyncio.sleep(ACCEPTED_S)
        await super().shutdown(sockets)
        log.info("shut down after %.1f s", loop.time() - began)

    def serve_forever(self) -> None:
        self.run(sockets=[self.sock])

    def stop(self) -> None:
        self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


# The most rows serve decodes at once by default (serve.slots): its step graphs for every power of two up to it are
# recorded before the first request.
MAX_ROWS = 256


def with_engine(loaded: LoadedModel, cfg: ServeConfig) -> LoadedModel:
    """The model with a background engine of ``cfg.slots`` rows (None: what generation.kv_cache holds, at most
    ``MAX_ROWS``), its step graphs recorded before the first request;
    a model the engine cannot run is served by transformers' generate, one request at a time."""
    if not uses_engine(loaded.model, loaded.gcfg):
        return loaded
    context = getattr(loaded.model.config, "max_position_embeddings", None) or cfg.max_len
    max_len = min(cfg.max_len, context)
    slots = cfg.slots or min(MAX_ROWS, budget_rows(loaded.model, max_len, loaded.gcfg.kv_cache))
    generator = GenerationEngine(loaded.model, loaded.tokenizer.eos_token_id, slots=slots, max_len=max_len,
                                 top_logprobs=MAX_TOP_LOGPROBS, use_graph=None if loaded.gcfg.cuda_graphs else False)
    generator.capture_graphs()
    generator.start()
    return dataclasses.replace(loaded, generator=generator)


def make_server(model: LoadedModel | Callable[[], LoadedModel], cfg: ServeConfig | None = None,
                api_key: str | None = None, on_ready: Callable[[], None] | None = None) -> Server:
    """A server bound to ``cfg.host:cfg.port`` (raises OSError where it cannot listen). ``model`` (or the function
    that loads it) is made ready in a thread once the server runs; ``on_ready`` is called then. A model that fails to
    load stops the server, which keeps the error in ``server.state.error``."""
    cfg = cfg or ServeConfig()
    state = ServeState(cfg, api_key)
    sock = bind(cfg.host, cfg.port)
    server: Server

    def load() -> None:
        try:
            loaded = model if isinstance(model, LoadedModel) else model()
            state.loaded = with_engine(loaded, cfg)
            state.ready.set()
            if on_ready is not None:
                on_ready()
        except BaseException as exc:  # noqa: BLE001 - handed to the command, which reports it after the server stops
            state.error = exc
            server.should_exit = True

    server = Server(make_app(state, load), state, sock)
    return server


@contextmanager
def serving(server: Server, timeout: float = 300.0) -> Iterator[str]:
    """Run ``server`` in a thread until the block ends; yields its URL once the model is ready (tests, benchmarks)."""
    thread = threading.Thread(target=server.serve_forever, name="lawtune-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not (server.state.ready.is_set() and server.started):
        if server.state.error is not None:
            raise server.state.error
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not become ready")
        time.sleep(0.01)
    host, port = server.server_address
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        thread.join(timeout)
