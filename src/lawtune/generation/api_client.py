"""A client of an OpenAI-compatible server (`lawtune serve`, vLLM, SGLang, a hosted API): the one that
`lawtune eval --api-url` and `lawtune distill --teacher-url` share.

* Requests go out ``concurrency`` at a time (threads: the work is waiting on the server).
* A request answered 429 or 5xx, or one that could not reach the server, is sent again after 1, 2, 4 … seconds
  (at most ``max_backoff_s``; the server's ``Retry-After`` where it gives one), ``retries`` times; then, and on
  any other answer than 200, the command stops with one line naming the setting (``key``) and what the server said.
* The bearer token is the one given, else ``OPENAI_API_KEY`` from the environment; it is sent, never printed.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from ..errors import UsageError
from ..think import answer_part
from ..think import split as split_reasoning

T = TypeVar("T")
R = TypeVar("R")
KEY_ENV = "OPENAI_API_KEY"


class ApiError(UsageError):
    """The server answered a request with an error that retries do not cure (``status``: its HTTP status)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def retryable(status: int) -> bool:
    """Answers worth asking again: rate limits and the server's own failures (overloaded, restarting)."""
    return status == 429 or status >= 500


class ApiClient:
    """Requests to one server. ``url`` is its API root (``http://host:8000/v1``); ``key`` the setting that named it,
    for errors (``eval.api_url``)."""

    def __init__(self, url: str, model: str, key: str, api_key: str | None = None, timeout_s: float = 600.0,
                 concurrency: int = 8, retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        self.url, self.model, self.key = url.rstrip("/"), model, key
        self.concurrency, self.retries = concurrency, retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        token = api_key or os.environ.get(KEY_ENV) or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(timeout=timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency))
        self.retried = 0  # requests sent again (429, 5xx, not reached), for the run's log

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def retry_wait(self, attempt: int, resp: httpx.Response | None) -> float:
        after = resp.headers.get("Retry-After") if resp is not None else None
        if after is not None:
            try:
                return min(max(float(after), 0.0), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP date: the doubling wait instead
        wait = min(self.backoff_s * 2 ** attempt, self.max_backoff_s)
        return wait * random.uniform(0.8, 1.0)  # clients told to wait together do not all come back together

    def post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` (with this client's model) to ``route`` (``/completions``): the JSON answer, after retries."""
        url = self.url + route
        body = {"model": self.model, **body}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self.http.post(url, json=body)
            except httpx.TimeoutException:
                raise UsageError(f"{self.key}: {url} did not answer within the timeout") from None
            except httpx.TransportError as exc:
                if last:
                    raise UsageError(f"{self.key}: {url} cannot be reached ({type(exc).__name__}: {exc})") from None
                self.retried += 1
                time.sleep(self.retry_wait(attempt, None))
                continue
            if retryable(resp.status_code) and not last:
                self.retried += 1
                time.sleep(self.retry_wait(attempt, resp))
                continue
            if resp.status_code != 200:
                hint = f" (check the API key: --api-key or {KEY_ENV})" if resp.status_code in (401, 403) else ""
                text = " ".join(resp.text[:300].split())
                raise ApiError(f"{self.key}: {url} answered {resp.status_code}{hint}: {text}", resp.status_code)
            try:
                answer = resp.json()
            except ValueError:
                answer = None
            if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
                raise UsageError(f"{self.key}: {url} did not answer a completion: {' '.join(resp.text[:200].split())}")
            return answer
        raise AssertionError("unreachable: the last attempt returns or raises")

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` of every item, ``concurrency`` at a time, in order."""
        items = list(items)
        if len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(items))) as pool:
            return list(pool.map(fn, items))


def choices_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """A completion's choices in the order of their ``index`` (a server may list them in any order)."""
    return sorted(answer["choices"], key=lambda c: c.get("index", 0))


def chat_reply(choice: dict[str, Any]) -> tuple[str | None, str, bool]:
    """(think text, None where the think block was never closed; the answer part; ended on its own) of a chat
    choice. The think text is ``reasoning_content`` (vLLM's reasoning parser, `lawtune serve`), closed where an answer
    followed it, else the ``<think>…</think>`` text of ``content``; the choice ended on its own when its
    ``finish_reason`` is ``stop`` (not the budget)."""
    message = choice.get("message") or {}
    content = message.get("content") or ""
    finished = choice.get("finish_reason") == "stop"
    if message.get("reasoning_content") is not None:
        return (message["reasoning_content"].strip() if content.strip() else None), answer_part(content), finished
    think, rest = split_reasoning(content)
    return (None if think is None else think.strip()), rest, finished
