"""`lawtune serve`: an OpenAI-compatible HTTP API and a question page, until Ctrl-C."""

from __future__ import annotations

import sys

from ..config import ServeRun
from ..errors import UsageError
from ..infer import load_model
from ..serve import MODEL_ID, make_server


def run_serve(cfg: ServeRun, say=print) -> int:
    """`lawtune serve`: load the model once and answer requests until Ctrl-C."""
    engine = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force)
    host, port = cfg.serve.host, cfg.serve.port
    try:
        server = make_server(engine, host, port, cfg.serve.max_prompt_tokens, cfg.serve.slots, cfg.serve.max_len)
    except (OSError, OverflowError) as exc:
        raise UsageError(f"serve: cannot listen on {host}:{port} ({getattr(exc, 'strerror', None) or exc})") from None
    bound_host, bound_port = server.server_address[:2]
    assert isinstance(bound_host, str)  # an AF_INET(6) socket's address: (host, port, ...)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host} without authentication", file=sys.stderr)
    say(f"serving model id {MODEL_ID!r} on http://{bound_host}:{bound_port}/ (API: http://{bound_host}:{bound_port}/v1); "
        f"Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

