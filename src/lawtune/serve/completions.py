"""``POST /v1/completions``: raw prompts (text or token ids, no chat template), with ``echo`` and the prompt's
log-probabilities for scoring."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ..config import GenerationConfig
from ..config import replace as replace_config
from ..infer import IDLE, SharedSamples, TextPieces, stream_tokens
from . import protocol as api
from .runtime import (
    Job,
    RequestError,
    ServeState,
    StopText,
    cancelled_error,
    check_common,
    check_length,
    error_events,
    failed,
    first_item,
    new_id,
    observe,
    sampling_of,
    shared_samples,
    sse,
    stops_of,
    timed_out,
    token_text,
)


@dataclass
class CompletionRun:
    index: int
    prompt_ids: list[int]
    prompt_text: str
    job: Job
    stop: StopText
    text: str = ""
    tokens: list[tuple[int, float, list]] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish: str | None = None
    first_at: float | None = None
    error: BaseException | None = None

    def generated(self) -> int:
        return len(self.tokens)

    async def pieces(self, deadline: float | None, tokenizer) -> AsyncIterator[tuple[str, list]]:
        """(text, the tokens it came with) as released past the stop strings; what came at once goes out together."""
        pieces, shown, pending = TextPieces(tokenizer), "", []
        eos = tokenizer.eos_token_id  # once: transformers looks it up by name each time
        async for batch in self.job.batches(deadline):
            text = ""
            for kind, value in batch:
                if kind == "error":
                    self.error = value
                    break
                event, payload = value
                if event == "prompt":
                    self.prompt_logprobs = payload
                    continue
                if event == "done":
                    self.finish = payload.finish
                    rest = payload.text[len(shown):] if payload.text.startswith(shown) else ""
                    released = self.stop.feed("text", rest) + self.stop.flush()
                else:
                    self.first_at = self.first_at or time.monotonic()
                    self.tokens.append(payload)
                    pending.append(payload)
                    if payload[0] == eos:
                        continue
                    new = pieces.put(payload[0])
                    shown += new
                    released = self.stop.feed("text", new) if new else []
                text += "".join(piece for _, piece in released)
                if self.stop.hit:
                    break
            if text:
                self.text += text
                yield text, pending[:]
                pending.clear()
            if self.error is not None:
                return
            if self.stop.hit:
                self.finish = "stop"
                self.job.cancel("stop string")
                return
        if pending:
            yield "", pending


@dataclass
class Finished:
    text: str
    finish: str


def start_completion(state: ServeState, body: api.CompletionRequest, ids: list[int], text: str, index: int,
                     gcfg: GenerationConfig, shared: SharedSamples | None = None) -> CompletionRun:
    """Choice ``index``: with ``shared``, sample ``index % n`` of the request the prompt's choices share on the engine
    (one prefill); a model the engine cannot run samples each choice on its own, seeded seed + its index."""
    assert state.loaded is not None
    loaded = state.loaded
    budget = max(body.max_tokens, 1)  # max_tokens 0 (echo only): one token is made and left out
    top = body.logprobs or 0
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    if shared is None and index % body.n:
        gcfg = replace_config(gcfg, seed=gcfg.seed + index % body.n)

    def events(on_request, wait: bool):
        got: dict[str, Any] = {}

        def remember(engine, request) -> None:
            got["request"] = request
            on_request(engine, request)

        tokens = stream_tokens(loaded, ids, budget, gcfg, top_logprobs=top, prompt_logprobs=prompt_logprobs,
                               on_request=remember, shared=shared, index=index % body.n, wait=wait)
        sent_prompt = False
        try:
            while True:
                try:
                    token = next(tokens)
                except StopIteration as stop:
                    result = stop.value
                    break
                if token is None:
                    yield IDLE
                    continue
                if prompt_logprobs is not None and not sent_prompt:
                    sent_prompt = True
                    yield "prompt", got["request"].prompt_logprobs
                if body.max_tokens:
                    yield "token", token
        finally:
            tokens.close()
        text_out = result.text if body.max_tokens else ""
        yield "done", Finished(text_out, "stop" if result.stopped else "length")

    return CompletionRun(index, ids, text, Job(state, events), StopText(stops_of(body.stop)))


def completion_logprobs(tokenizer, run: CompletionRun, echo: bool, top: int) -> api.CompletionLogprobs:
    tokens, values, tops, offsets, at = [], [], [], [], 0

    def add(token: int, logprob: float | None, alternatives: list | None) -> None:
        nonlocal at
        text = token_text(tokenizer, token)
        tokens.append(text)
        values.append(logprob)
        # Tokens that decode to the same text (pieces of one character) share a key: the likeliest keeps it.
        tops.append({text_a: alp for text_a, alp in reversed([(token_text(tokenizer, a), alp) for a, alp in alternatives])}
                    if alternatives is not None else None)
        offsets.append(at)
        at += len(text)

    if echo:
        scored = run.prompt_logprobs or []
        for i, token in enumerate(run.prompt_ids):
            if i == 0 or i > len(scored):
                add(token, None, None)
            else:
                logprob, alternatives = scored[i - 1]
                add(token, logprob, alternatives if top else [])
    for token, logprob, alternatives in run.tokens:
        add(token, logprob, alternatives if top else [])
    return api.CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def plan_completion(state: ServeState, body: api.CompletionRequest) -> tuple[list[tuple[list[int], str]], GenerationConfig]:
    assert state.loaded is not None
    check_common(state, body, body.logprobs is not None)
    tokenizer = state.loaded.tokenizer
    raw = body.prompt
    prompts: list = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    if body.stream and len(prompts) > 1:
        raise RequestError(400, "prompt: one prompt per streamed request", param="prompt")
    vocab = len(tokenizer)
    out = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = tokenizer(prompt)["input_ids"]
            text = prompt
        else:
            if any(not 0 <= t < vocab for t in prompt):
                raise RequestError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            ids, text = list(prompt), tokenizer.decode(prompt)
        if not ids:
            raise RequestError(400, "prompt: empty", param="prompt")
        check_length(state, len(ids), max(body.max_tokens, 1), "prompt")
        out.append((ids, text))
    return out, sampling_of(state, body)


async def completions_json(state: ServeState, body: api.CompletionRequest, prompts: list, gcfg: GenerationConfig,
                           arrived: float, deadline: float | None, scope: MutableMapping[str, Any]) -> JSONResponse:
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    shared = [shared_samples(state, gcfg, body.n) for _ in prompts]
    runs = [start_completion(state, body, ids, text, p * body.n + j, gcfg, shared[p])
            for p, (ids, text) in enumerate(prompts) for j in range(body.n)]
    try:
        for run in runs:
            async for _ in run.pieces(deadline, tokenizer):
                pass
    except TimeoutError:
        for run in runs:
            run.job.cancel("timeout")
        raise timed_out(state) from None
    for run in runs:
        if run.error is not None:
            raise failed(run.error)
        if run.finish is None:
            raise cancelled_error(run.job)
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    for run in runs:
        observe(state, arrived, run, 0)
    state.metrics.prompt_tokens.inc(prompt_tokens)
    choices = [api.CompletionChoice(
        index=run.index, text=(run.prompt_text if body.echo else "") + run.text, finish_reason=run.finish,
        logprobs=completion_logprobs(tokenizer, run, body.echo, body.logprobs or 0)
        if body.logprobs is not None else None) for run in runs]
    completion = sum(run.generated() for run in runs)
    scope["lawtune.tokens"] = (prompt_tokens, completion)
    usage = api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)
    return JSONResponse(api.Completion(id=new_id("cmpl"), created=int(time.time()), choices=choices,
                                       usage=usage).model_dump())


async def completions_stream(state: ServeState, body: api.CompletionRequest, prompts: list, gcfg: GenerationConfig,
                             arrived: float, deadline: float | None, scope: MutableMapping[str, Any]) -> StreamingResponse:
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    [(ids, text)] = prompts
    run = start_completion(state, body, ids, text, 0, gcfg)
    pieces = run.pieces(deadline, tokenizer)
    try:
        first, has_first = await first_item(pieces)
    except TimeoutError:
        run.job.cancel("timeout")
        raise timed_out(state) from None
    if run.error is not None:
        raise failed(run.error)
    base: dict[str, Any] = {"id": new_id("cmpl"), "created": int(time.time())}

    def chunk(piece: str, tokens: list, finish: str | None = None) -> str:
        logprobs = None
        if body.logprobs is not None:
            part = CompletionRun(0, [], "", run.job, run.stop, tokens=tokens)
            logprobs = completion_logprobs(tokenizer, part, False, body.logprobs)
        return sse(api.Completion(**base, choices=[api.CompletionChoice(index=0, text=piece, logprobs=logprobs,
                                                                        finish_reason=finish)]).model_dump())

    async def events() -> AsyncIterator[str]:
        try:
            if body.echo:
                echo = CompletionRun(0, ids, text, run.job, run.stop, prompt_logprobs=run.prompt_logprobs)
                yield sse(api.Completion(**base, choices=[api.CompletionChoice(
                    index=0, text=text, logprobs=completion_logprobs(tokenizer, echo, True, body.logprobs or 0)
                    if body.logprobs is not None else None)]).model_dump())
            if has_first:
                yield chunk(*first)
            try:
                async for piece, tokens in pieces:
                    yield chunk(piece, tokens)
            except TimeoutError:
                run.job.cancel("timeout")
                for event in error_events(timed_out(state)):
                    yield event
                return
            if run.error is not None or run.finish is None:
                err = failed(run.error) if run.error is not None else cancelled_error(run.job)
                for event in error_events(err):
                    yield event
                return
            observe(state, arrived, run, len(ids))
            usage = api.Usage(prompt_tokens=len(ids), completion_tokens=run.generated(),
                              total_tokens=len(ids) + run.generated())
            scope["lawtune.tokens"] = (len(ids), run.generated())
            yield sse(api.Completion(**base, choices=[api.CompletionChoice(index=0, text="", finish_reason=run.finish)]
                                     ).model_dump())
            if body.stream_options and body.stream_options.include_usage:
                yield sse(api.Completion(**base, choices=[], usage=usage).model_dump())
            yield sse("[DONE]")
        finally:
            run.job.cancel("the client went away")
            state.release(body.n)

    return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8",
                             headers={"Cache-Control": "no-store"})
