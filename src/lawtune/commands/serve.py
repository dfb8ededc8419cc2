"""`lawtune serve`: an OpenAI-compatible HTTP API and a question page, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

from ..config import ServeRun
from ..errors import UsageError
from ..infer import load_model
from ..prompts import NATIVE_NEEDS
from ..serve import MODEL_ID, make_server


def run_serve(cfg: ServeRun, say=print) -> int:
    """`lawtune serve`: listen at once, load the model in the background (/health is 503 until it is ready), answer
    requests until SIGTERM or Ctrl-C, then drain (serve.shutdown_grace_s) and exit 0."""
    host, port = cfg.serve.host, cfg.serve.port
    if cfg.adapter.prompt_format == "native":
        raise UsageError(f"adapter.prompt_format: {NATIVE_NEEDS}; serve takes questions, not a LawBench file (use "
                         f"chat or plain)")
    api_key = cfg.serve.api_key.get_secret_value() if cfg.serve.api_key else os.environ.get("LAWTUNE_API_KEY") or None

    def load():
        return load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force,
                      cfg.adapter.fold)

    def ready() -> None:
        engine = server.state.loaded.generator if server.state.loaded is not None else None
        rows = f"; {engine.slots} rows of {engine.max_len} tokens, KV cache {engine.cache_gib:.1f} GiB" if engine else ""
        say(f"serving model id {MODEL_ID!r} on {url}/ (API: {url}/v1){rows}; SIGTERM or Ctrl-C stops", flush=True)

    try:
        server = make_server(load, cfg.serve, api_key, on_ready=ready)
    except (OSError, OverflowError) as exc:
        raise UsageError(f"serve: cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    bound_host, bound_port = server.server_address
    url = f"http://{'[' + bound_host + ']' if ':' in bound_host else bound_host}:{bound_port}"
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without an API key (--api-key or LAWTUNE_API_KEY)", file=sys.stderr)
    # uvicorn hands SIGTERM back to the process after its graceful shutdown; a drained server exits 0, so the
    # signal's default action (ending the process with 143) must not run then.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if server.state.error is not None:
        raise server.state.error
    return 0
