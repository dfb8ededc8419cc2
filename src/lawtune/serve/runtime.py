"""What every route of `lawtune serve` shares: its state (the model, the queue, the metrics), OpenAI-shaped errors,
and ``Job``, one request's generation.

Generation runs outside the event loop (lawtune's generators block): each request's generation is a ``Job``, whose
events reach the event loop as they come, so the loop never blocks and any number of requests wait without holding a
worker of the loop's thread pool. On the engine's background loop one thread, the ``StreamPump``, drives the
generators of every request; a model the engine cannot run gets a thread a request (transformers' generate blocks).

Why one thread for all streams: with a thread a request, every engine step woke each streaming request's thread, and
each of those threads woke the event loop; all of them took the interpreter lock in turn with the engine's own
thread, which needs it between its steps. On the development CPU (2 cores, the demo-sized model, 32 streaming
clients) the engine's thread held the lock 40% of its time inside those wake-ups (py-spy ``--gil``). The pump is
woken at most once for whatever a reading of the rows brought (``Request.listeners``), takes every ready generation
as far as it goes without waiting (``wait=False``: they yield ``IDLE`` there), and wakes the event loop once for all
of them. Measured on that CPU (``bench/generation.py --cpu --clients 32,128 --serve-tokens 256``, five runs a side,
alternating): 32 clients 2,970 tokens/s against 2,529 (1.17x), 128 clients 3,654 against 3,109 (1.18x), one client
unchanged, with the bench's clients of then (a thread each, in one process), which capped what a wave measured
(bench/README.md, twenty-first session); not yet measured on a GPU.

A stream's tokens go out in chunks (``chunk_tokens``, ``serve.stream_interval``): the engine's thread wakes the pump
for a streamed job at its first token and then once a chunk's tokens wait, for a job that does not stream only at its
end, so the pump's and the event loop's work a wake-up is spread over several tokens.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..config import ConfigError, GenerationConfig, ServeConfig
from ..config import replace as replace_config
from ..generation import uses_engine
from ..infer import IDLE, LoadedModel, SharedSamples
from . import protocol as api

log = logging.getLogger("lawtune")


class RequestError(Exception):
    """A request answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(api.error_body(exc.message, exc.kind, exc.param, exc.code), exc.status, exc.headers)


class Metrics:
    """Prometheus metrics of one server (a registry of its own: several servers in one process do not mix)."""

    def __init__(self, state: ServeState):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lawtune_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lawtune_prompt_tokens", "Prompt tokens of generation requests", registry=r)
        self.generated_tokens = Counter("lawtune_generation_tokens", "Tokens generated", registry=r)
        Gauge("lawtune_queue_depth", "Choices waiting for a free row", registry=r).set_function(state.waiting)
        Gauge("lawtune_running_rows", "Rows generating now", registry=r).set_function(state.running_rows)
        self.ttft = Histogram("lawtune_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.tpot = Histogram("lawtune_time_per_output_token_seconds",
                              "A request's time per generated token after its first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)


@dataclass
class ServeState:
    cfg: ServeConfig
    api_key: str | None = None
    loaded: LoadedModel | None = None
    """The model, with its background engine once ready."""
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    """What stopped the model from loading (the server then exits with it)."""
    draining: bool = False
    rows: int = 0
    """Choices admitted and not finished (running or waiting)."""
    jobs: set = field(default_factory=set)
    pump: StreamPump | None = None
    """Drives the jobs on the engine (made with the first one)."""
    started: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(self)

    def capacity(self) -> int:
        generator = self.loaded.generator if self.loaded else None
        return generator.slots if generator is not None else 1

    def waiting(self) -> int:
        return max(0, self.rows - self.capacity())

    def running_rows(self) -> int:
        generator = self.loaded.generator if self.loaded else None
        return len(generator.running) if generator is not None else min(self.rows, 1)

    def admit(self, n: int) -> None:
        """Take ``n`` rows' places, or refuse at once when the queue in front of the rows is full."""
        with self.lock:
            if self.rows + n - self.capacity() > self.cfg.max_queue:
                raise RequestError(503, f"the server is busy: {self.waiting()} choices wait for a row "
                                        f"(serve.max_queue={self.cfg.max_queue}); retry later", "server_busy",
                                   code="queue_full", headers={"Retry-After": "1"})
            self.rows += n

    def release(self, n: int) -> None:
        with self.lock:
            self.rows -= n

    def cancel_all(self, reason: str) -> None:
        for job in list(self.jobs):
            job.cancel(reason)

    def pump_for(self, loop: asyncio.AbstractEventLoop) -> StreamPump | None:
        """The pump of this server's jobs where the engine's background loop runs the model (else None: a thread a
        job)."""
        if self.loaded is None or self.loaded.generator is None or self.loaded.generator.thread is None:
            return None
        with self.lock:
            if self.pump is None or self.pump.loop is not loop or self.pump.closed:
                self.pump = StreamPump(loop)
            return self.pump

    def close_pump(self) -> None:
        if self.pump is not None:
            self.pump.close()


def shared_samples(state: ServeState, gcfg: GenerationConfig, n: int) -> SharedSamples | None:
    """One engine request for a request's ``n`` choices (one prefill), where the engine runs the model."""
    assert state.loaded is not None
    return SharedSamples(n) if n > 1 and uses_engine(state.loaded.model, gcfg) else None


# With ``serve.stream_interval`` unset, a streamed chunk waits for one token more for every ROWS_A_TOKEN rows running,
# up to MAX_CHUNK tokens: one client still gets every token as it comes, and many clients cost the server fewer
# chunks (development CPU, 32 and 128 streaming clients: a chunk of 4 or 8 tokens took the event loop's time a token
# from about 62 µs to 30 and 20, bench/README.md).
ROWS_A_TOKEN = 8
MAX_CHUNK = 8


def chunk_tokens(interval: int | None, rows: int) -> int:
    """Tokens a streamed chunk waits for (the first token and the last are sent at once): ``serve.stream_interval``,
    or by the load, with ``rows`` rows running (see ``ROWS_A_TOKEN``)."""
    return interval if interval is not None else min(MAX_CHUNK, max(1, rows // ROWS_A_TOKEN))


class StreamPump:
    """One thread that drives the generators of many jobs (see the module docstring): a job is taken up when it is
    added and whenever the engine tells its request's listeners; each is run until it would wait (``IDLE``) or ends,
    and what they all yielded reaches the event loop with one wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # A C queue: telling the pump is one call that wakes its thread only when it waits (no lock of Python's
        # own that the woken thread would take back from the engine's thread, as a Condition's wait does)
        self.queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="lawtune-streams", daemon=True)
        self.thread.start()

    def wake(self, job: Job) -> None:
        """Take ``job`` up soon (any thread; never blocks: the engine's thread calls it)."""
        self.queue.put(job)

    def close(self) -> None:
        self.closed = True
        self.queue.put(None)
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.closed:
            ready = {self.queue.get(): None}  # ordered, and a job told twice is taken up once
            while True:
                try:
                    ready[self.queue.get_nowait()] = None
                except queue.Empty:
                    break
            if self.closed:
                return
            moved = [job for job in ready if job is not None and job.advance()]
            if moved:
                try:
                    self.loop.call_soon_threadsafe(wake_jobs, moved)
                except RuntimeError:  # the loop has closed: nobody waits any more
                    return


def wake_jobs(jobs: list[Job]) -> None:
    for job in jobs:
        job.wakeup.set()


class Job:
    """A generation outside the event loop; its events reach the event loop in batches, ``batches`` takes everything
    queued at once (with 32 streams the loop falls behind the tokens, and then it makes one chunk of several:
    measured on one H200, waking it per event cost 12% of 32 clients' tokens/s, bench/README.md). On a ``pump`` the
    generation runs in the pump's thread, else in a thread of its own, which wakes the loop only when no wake-up is
    on its way. ``events(on_request, wait)`` makes the generator. ``cancel`` stops the generation at the engine (the
    row is freed at the next step)."""

    def __init__(self, state: ServeState, events: Callable[[Callable, bool], Generator]):
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.pending: collections.deque[tuple[str, Any]] = collections.deque()
        self.wakeup = asyncio.Event()
        self.waking = False
        self.cancelled: str | None = None
        self.target: tuple[Any, Any] | None = None
        self.finished = False
        self.interval, self.woken = state.cfg.stream_interval, False
        state.jobs.add(self)
        self.pump = state.pump_for(self.loop)
        self.engine = state.loaded.generator if self.pump is not None else None  # type: ignore[union-attr]
        self.events = events(self._on_request, self.pump is None)
        if self.pump is not None:
            self.pump.wake(self)
        else:
            threading.Thread(target=self._run, name="lawtune-request", daemon=True).start()

    def _on_request(self, engine, request) -> None:
        self.target = (engine, request)
        if self.pump is not None:
            request.listeners.append(self.on_tokens)
        if self.cancelled:
            engine.cancel(request)

    def on_tokens(self, request) -> None:
        """In the engine's thread, when ``request`` has new tokens or has ended: the pump takes a streamed job up at
        its first token and once a chunk's tokens wait (``chunk_tokens``), any job when a sample has ended (a job
        without streaming has nothing to do before)."""
        assert self.engine is not None and self.pump is not None
        if request.error is None and not request.cancelled and all(s.finish_reason is None for s in request.samples):
            if not request.streaming:
                return
            if self.woken and max(map(len, request.events)) < chunk_tokens(self.interval, len(self.engine.running)):
                return
        self.woken = True
        self.pump.wake(self)

    def _put(self, item: tuple[str, Any]) -> None:
        self.pending.append(item)
        if not self.waking:
            self.waking = True
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

    def _wake(self) -> None:
        self.waking = False
        self.wakeup.set()

    def _run(self) -> None:
        try:
            for event in self.events:
                if self.cancelled:
                    break
                self._put(("event", event))
        except Exception as exc:  # noqa: BLE001 - handed to the request, which reports it; the server goes on
            log.exception("generation failed")
            self._put(("error", exc))
        finally:
            self.events.close()
            self._put(("end", None))

    def advance(self) -> bool:
        """In the pump's thread: run the generator until it would wait or ends, queueing what it yields. Returns
        whether anything was queued."""
        if self.finished:
            return False
        queued = len(self.pending)
        try:
            while not self.cancelled:
                event = next(self.events)
                if event is IDLE:
                    return len(self.pending) > queued
                self.pending.append(("event", event))
        except StopIteration:
            pass
        except Exception as exc:  # noqa: BLE001 - as in _run
            log.exception("generation failed")
            self.pending.append(("error", exc))
        self.finished = True
        try:
            self.events.close()  # its cleanup (cancelling the request) runs here
        except Exception:  # noqa: BLE001 - the pump serves every other request: it must not stop here
            log.exception("closing a generation failed")
        self.pending.append(("end", None))
        return True

    def cancel(self, reason: str) -> None:
        self.cancelled = self.cancelled or reason
        if self.pump is not None:
            self.pump.wake(self)  # it ends there, even with no engine step to come
        if self.target is not None:
            engine, request = self.target
            # The engine's cancel takes its lock, which its loop holds while it admits: not in the event loop.
            self.loop.run_in_executor(None, engine.cancel, request)

    def done(self) -> None:
        self.state.jobs.discard(self)

    async def batches(self, deadline: float | None) -> AsyncIterator[list[tuple[str, Any]]]:
        """The job's ("event", e) items as they have come, a list at a time, then ("error", exc) if it failed;
        raises TimeoutError at ``deadline``. One timer for the deadline, not one a wait (``asyncio.wait_for`` makes a
        task and a timer each time: with 32 streams, 10% of the event loop's samples in a py-spy profile)."""
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self.wakeup.set()

        timer = None if deadline is None else self.loop.call_later(max(0.0, deadline - time.monotonic()), expire)
        try:
            while True:
                if not self.pending:
                    if expired:
                        raise TimeoutError
                    self.wakeup.clear()
                    if not self.pending:  # an item appended before the clear has its wake-up on its way
                        await self.wakeup.wait()
                        continue
                batch = [self.pending.popleft() for _ in range(len(self.pending))]
                end = next((i for i, (kind, _) in enumerate(batch) if kind == "end"), None)
                if end is not None:
                    if end:
                        yield batch[:end]
                    return
                yield batch
        finally:
            if timer is not None:
                timer.cancel()
            self.cancel("finished")
            self.done()


class StopText:
    """Holds back streamed text that may be the start of a stop string; once one appears, the text before it is
    released and ``hit`` is set. Text of one channel (reasoning, content) never completes a stop string of another."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held, self.channel, self.hit = "", "", False

    def feed(self, channel: str, text: str) -> list[tuple[str, str]]:
        if not self.stops:
            return [(channel, text)]
        if self.hit:
            return []
        out = self.flush() if channel != self.channel else []
        self.channel = channel
        text = self.held + text
        found = [text.find(s) for s in self.stops if s in text]
        if found:
            self.hit, self.held = True, ""
            return out + ([(channel, text[: min(found)])] if min(found) else [])
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held, text = text[len(text) - keep:] if keep else "", text[: len(text) - keep]
        return out + ([(channel, text)] if text else [])

    def flush(self) -> list[tuple[str, str]]:
        out, self.held = ([(self.channel, self.held)] if self.held and not self.hit else []), ""
        return out


def stops_of(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def context_size(loaded: LoadedModel) -> int | None:
    """Tokens a request may hold, prompt and answer: the model's max_position_embeddings, and the engine's slot."""
    sizes = [getattr(loaded.model.config, "max_position_embeddings", None),
             loaded.generator.max_len if loaded.generator is not None else None]
    known = [s for s in sizes if s]
    return min(known) if known else None


def check_length(state: ServeState, n: int, budget: int, param: str) -> None:
    """Refuse, before the request waits for the model, a prompt over the limit or one that leaves no room in the
    context for the request's budget (one long prompt would otherwise hold a row for minutes)."""
    assert state.loaded is not None
    limit_by_cfg, context = state.cfg.max_prompt_tokens, context_size(state.loaded)
    limit = min(x for x in (limit_by_cfg, context) if x) if (limit_by_cfg or context) else None
    if limit and n > limit:
        where = "serve.max_prompt_tokens" if limit == limit_by_cfg else "the model's context"
        raise RequestError(400, f"{param}: the prompt is {n} tokens, over the limit of {limit} ({where})",
                           param=param, code="context_length_exceeded")
    if context and n + budget > context:
        raise RequestError(400, f"{param}: the prompt's {n} tokens and a budget of {budget} new tokens exceed the "
                                f"model's context of {context} tokens; send a shorter prompt or a smaller max_tokens",
                           param=param, code="context_length_exceeded")


def sampling_of(state: ServeState, body: api.SamplingFields) -> GenerationConfig:
    assert state.loaded is not None
    gcfg = state.loaded.gcfg
    try:
        if body.temperature:  # absent or 0: greedy, as in evaluation
            gcfg = replace_config(gcfg, do_sample=True, temperature=body.temperature, top_p=body.top_p or gcfg.top_p)
        if body.seed is not None:
            gcfg = replace_config(gcfg, seed=body.seed)
    except ConfigError as exc:
        raise RequestError(400, str(exc).splitlines()[0]) from None
    return gcfg


def check_common(state: ServeState, body: api.SamplingFields, wants_logprobs: bool) -> None:
    if body.model not in (api.MODEL_ID, None):
        raise RequestError(404, f"model {body.model!r} does not exist; this server has {api.MODEL_ID!r}",
                           "not_found_error", "model")
    if body.n > 1 and body.stream:
        raise RequestError(400, "n: several choices are returned without streaming only (stream false)", param="n")
    if body.n > 1 and not body.temperature:
        raise RequestError(400, "n: several choices need sampling (temperature > 0); greedy ones would be equal",
                           param="n")
    assert state.loaded is not None
    if wants_logprobs and state.loaded.generator is None:
        raise RequestError(400, "logprobs: this model runs on transformers' generate, which gives none",
                           param="logprobs")


def observe(state: ServeState, arrived: float, run: Any, prompt_tokens: int) -> None:
    m, tokens = state.metrics, run.generated()
    m.prompt_tokens.inc(prompt_tokens)
    m.generated_tokens.inc(tokens)
    if run.first_at is not None:
        m.ttft.observe(run.first_at - arrived)
        if tokens > 1:
            m.tpot.observe((time.monotonic() - run.first_at) / (tokens - 1))


def timed_out(state: ServeState) -> RequestError:
    return RequestError(504, f"the request ran past serve.request_timeout_s={state.cfg.request_timeout_s}",
                        "timeout_error", code="timeout")


def failed(exc: BaseException) -> RequestError:
    return RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")


def error_events(err: RequestError) -> list[str]:
    """How a stream whose headers are out ends with an error: an error event, then [DONE]."""
    return [sse(api.error_body(err.message, err.kind, code=err.code)), sse("[DONE]")]


def cancelled_error(job: Job) -> RequestError:
    if job.cancelled == "shutdown":
        return RequestError(503, "the server is shutting down; the request was cancelled", "server_error",
                            code="shutdown", headers={"Retry-After": "1"})
    return RequestError(500, f"generation stopped: {job.cancelled}", "server_error")


def sse(obj: Any) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n"


async def first_item(pieces: AsyncIterator) -> tuple[Any, bool]:
    """The first item of a stream (None, False when it has none)."""
    try:
        return await pieces.__anext__(), True
    except StopAsyncIteration:
        return None, False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
