"""`lawtune serve`: an OpenAI-compatible HTTP API and a one-page UI for one loaded model, on FastAPI and uvicorn.

What it promises (the README says the same):

* ``POST /v1/chat/completions``: the last user message is the question (a JEC-QA record as JSON, or text whose
  trailing lines ``A. …`` are its options). ``mode`` (lawtune's field: ``direct`` or ``reasoning``), streaming as
  server-sent events, ``reasoning_content`` beside ``content``, the letters read in ``answer``, ``n`` sampled
  choices, ``max_tokens`` as a hard cap (a forced answer included), ``stop`` strings (never half-streamed),
  ``seed``, ``logprobs``/``top_logprobs`` (up to 20), ``stream_options.include_usage``.
* ``POST /v1/completions``: a raw prompt (text or token ids, no chat template); ``echo`` with ``logprobs`` gives the
  prompt's log-probabilities (``max_tokens`` 0 scores the prompt only).
* ``GET /v1/models``; ``GET /openapi.json`` (the schema; no /docs page, which would need assets from a CDN);
  ``GET /`` the question page.
* Limits: a prompt over the context (or ``serve.max_prompt_tokens``) is a 400 ``context_length_exceeded`` at once;
  a body over ``serve.max_body_bytes`` (1 MiB) a 413 (read and thrown away, never held, never a reset); past
  ``serve.max_queue`` waiting choices a 503 with Retry-After; past ``serve.request_timeout_s`` a 504 before the first
  token, an error event after it. A client that goes away frees its row at the next step.
* Auth: with ``--api-key`` (or LAWTUNE_API_KEY) every /v1 route needs ``Authorization: Bearer <key>``.
* ``GET /health`` (503 until the model is loaded and its graphs recorded, and while shutting down), ``GET /metrics``
  (Prometheus), one access-log line per request (logger ``lawtune.access``).
* SIGTERM: no new connections; running requests get ``serve.shutdown_grace_s`` to finish, then end with an error
  event (or a 503); exit 0.
"""

from .protocol import MODEL_ID
from .runtime import RequestError, ServeState
from .server import Server, make_server, serving

__all__ = ["MODEL_ID", "RequestError", "ServeState", "Server", "make_server", "serving"]
