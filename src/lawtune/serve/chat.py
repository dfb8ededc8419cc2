"""``POST /v1/chat/completions``: a legal question (a JEC-QA record, or text with trailing option lines) asked in
direct or reasoning mode, answered whole or streamed as server-sent events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from ..config import GenerationConfig
from ..config import replace as replace_config
from ..data import DataError, Record
from ..generation import closing_room, default_budget, split_budget
from ..infer import SharedSamples, generate_events, prompt_text, record_from_text
from ..scoring import extract_answer, majority
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


def chat_logprobs(tokenizer, tokens: list[tuple[int, float, list]]) -> api.ChatLogprobs:
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return api.ChatLogprobs(content=[api.TokenLogprob(**entry(t, lp), top_logprobs=[
        api.TopLogprob(**entry(a, alp)) for a, alp in top]) for t, lp, top in tokens])


@dataclass
class ChatPlan:
    record: Record
    gcfg: GenerationConfig
    max_tokens: int | None
    prompt_ids: list[int]
    """The question's prompt in the request's mode, tokenized (generated from, not rendered again)."""

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def plan_chat(state: ServeState, body: api.ChatRequest) -> ChatPlan:
    """Validate a chat request against the model (in a worker thread: tokenizing a long prompt takes a while)."""
    assert state.loaded is not None
    check_common(state, body, body.logprobs)
    check_vote(body)
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise RequestError(400, "messages: no user message (the last one is the question)", param="messages")
    content = users[-1].content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not content or any(part.type != "text" or part.text is None for part in content):
            raise RequestError(400, "messages: a user message's parts must all be text", param="messages")
        content = "\n".join(part.text or "" for part in content)
    if content is None:
        raise RequestError(400, "messages: the user message has no content", param="messages")
    try:
        record = record_from_text(content, where="messages[-1].content", require_options=False)
    except DataError as exc:
        raise RequestError(400, str(exc).splitlines()[0], param="messages") from None
    if body.vote is not None and not record.options:
        raise RequestError(400, "vote: a vote counts answer sets; this question has no options", param="vote")
    gcfg = sampling_of(state, body)
    if (body.vote or 1) > 1 and not gcfg.do_sample:  # K votes imply sampling, at the server's temperature
        gcfg = replace_config(gcfg, do_sample=True)
    max_tokens = body.max_completion_tokens or body.max_tokens
    loaded = state.loaded
    ids = loaded.tokenizer(prompt_text(loaded, record, body.mode == "reasoning"), add_special_tokens=False)["input_ids"]
    n = len(ids)
    budget = default_budget(body.mode, max_tokens or gcfg.max_new_tokens)
    if body.mode == "reasoning" and split_budget(budget)[1]:  # a forced answer's closing takes room in the row too
        budget += closing_room(loaded.tokenizer, loaded.prompt_format)
    check_length(state, n, budget, "messages")
    return ChatPlan(record, gcfg, max_tokens, ids)


def check_vote(body: api.ChatRequest) -> None:
    """``vote``: K samples voted into one choice, returned whole."""
    if body.vote is None:
        return
    if body.stream:
        raise RequestError(400, "vote: a voted answer needs all its samples first, it is not streamed (stream false)",
                           param="vote")
    if body.n > 1:
        raise RequestError(400, "vote: the K samples make one voted choice; leave n out", param="vote")
    if body.vote > 1 and body.temperature == 0:
        raise RequestError(400, "vote: K samples need sampling; leave temperature out (the server's) or above 0",
                           param="vote")


def rows_of(body: api.ChatRequest) -> int:
    """Engine rows a chat request takes: its choices, or its vote's samples."""
    return body.vote or body.n


@dataclass
class ChatChoiceRun:
    """One choice of a chat request as its events arrive."""

    index: int
    job: Job
    stop: StopText
    reasoning: str = ""
    content: str = ""
    tokens: list[tuple[int, float, list]] = field(default_factory=list)
    answer: Any = None
    first_at: float | None = None
    error: BaseException | None = None
    streamed: bool = False
    """Its events come as the tokens do (else all at the end): only then is the first one's time a first token's."""

    async def pieces(self, deadline: float | None) -> AsyncIterator[tuple[str, Any]]:
        """("reasoning" | "content", text) as released past the stop strings, ("tokens", [...]) for each token. The
        text of what came at once goes out together (one chunk per channel)."""
        async for batch in self.job.batches(deadline):
            released: list[list] = []
            for kind, value in batch:
                if kind == "error":
                    self.error = value
                    break
                event, payload = value
                if event == "token":
                    self.first_at = self.first_at or time.monotonic()
                    self.tokens.append(payload)
                    yield "tokens", payload
                elif event == "done":
                    self.answer = payload
                else:
                    if self.streamed:
                        self.first_at = self.first_at or time.monotonic()
                    for channel, text in self.stop.feed(event, payload):
                        if released and released[-1][0] == channel:
                            released[-1][1] += text
                        else:
                            released.append([channel, text])
                    if self.stop.hit:
                        break
            for channel, text in released:
                setattr(self, channel, getattr(self, channel) + text)
                yield channel, text
            if self.error is not None:
                return
            if self.stop.hit:
                self.job.cancel("stop string")
                return
        for channel, text in self.stop.flush():
            setattr(self, channel, getattr(self, channel) + text)
            yield channel, text

    def read(self, record: Record) -> list[str] | None:
        """The letters read from this choice; None = unreadable, or a question without options."""
        if self.answer is not None and not self.stop.hit:
            return self.answer.answer
        options = "".join(record.options)
        return extract_answer(self.content, options) if options else None

    def letters(self, record: Record) -> list[str]:
        return self.read(record) or []

    def finish_reason(self) -> str:
        return "stop" if self.stop.hit or (self.answer is not None and self.answer.stopped) else "length"

    def generated(self) -> int:
        return self.answer.generated_tokens if self.answer is not None else len(self.tokens)


def start_chat_choice(state: ServeState, body: api.ChatRequest, plan: ChatPlan, index: int,
                      shared: SharedSamples | None = None, key: str | None = None) -> ChatChoiceRun:
    """Choice ``index``: sample ``index`` of the request the choices share on the engine (one prefill; ``key`` names
    it for its samples' seeds, default its prompt); a model the engine cannot run samples each choice on its own,
    seeded seed + index."""
    assert state.loaded is not None
    loaded = state.loaded
    gcfg = replace_config(plan.gcfg, seed=plan.gcfg.seed + index) if index and shared is None else plan.gcfg
    top = (body.top_logprobs or 0) if body.logprobs else 0
    stops = stops_of(body.stop)
    # A client that reads the whole answer at once is served without a per-step look at its row, unless it wants
    # what only the token stream has (log-probabilities, a stop string to watch for).
    stream = body.stream or body.logprobs or bool(stops)
    # Token events cost the server a hop per token: asked for only where the log-probabilities or the count of a
    # stopped answer need them.
    tokens = body.logprobs or bool(stops)

    def events(on_request, wait: bool):
        return generate_events(loaded, plan.record, body.mode, plan.max_tokens, gcfg, stream=stream, tokens=tokens,
                               top_logprobs=top, on_request=on_request, shared=shared, index=index, key=key,
                               wait=wait, prompt_ids=plan.prompt_ids)

    return ChatChoiceRun(index, Job(state, events), StopText(stops), streamed=stream)


async def chat_json(state: ServeState, body: api.ChatRequest, plan: ChatPlan, arrived: float,
                    deadline: float | None, scope: MutableMapping[str, Any]) -> JSONResponse:
    count = rows_of(body)
    shared = shared_samples(state, plan.gcfg, count)
    # A vote's samples are the question's, as in eval --samples: seeded by its id (the prompt names other requests)
    key = plan.record.id if body.vote is not None else None
    runs = [start_chat_choice(state, body, plan, i, shared, key) for i in range(count)]
    try:
        for run in runs:
            async for _ in run.pieces(deadline):
                pass
    except TimeoutError:
        for run in runs:
            run.job.cancel("timeout")
        raise timed_out(state) from None
    for run in runs:
        if run.error is not None:
            raise failed(run.error)
        if run.answer is None and not run.stop.hit:
            raise cancelled_error(run.job)
        observe(state, arrived, run, plan.prompt_tokens)
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]
    choices = [voted_choice(tokenizer, body, plan, runs)] if body.vote is not None else [api.ChatChoice(
        index=run.index, message=api.ChatMessageOut(
            content=run.content.strip(), reasoning_content=run.reasoning.strip(), answer=run.letters(plan.record)),
        logprobs=chat_logprobs(tokenizer, run.tokens) if body.logprobs else None,
        finish_reason=run.finish_reason()) for run in runs]
    completion = sum(run.generated() for run in runs)
    usage = api.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=completion,
                      total_tokens=plan.prompt_tokens + completion)
    scope["lawtune.tokens"] = (plan.prompt_tokens, completion)
    return JSONResponse(api.ChatCompletion(id=new_id("chatcmpl"), created=int(time.time()), choices=choices,
                                           usage=usage).model_dump())


def voted_choice(tokenizer, body: api.ChatRequest, plan: ChatPlan, runs: list[ChatChoiceRun]) -> api.ChatChoice:
    """The one choice of a vote: the first sample that gave the majority answer set (``scoring.majority``, eval's
    maj@K rule), the voted letters, and every sample."""
    preds = [run.read(plan.record) for run in runs]
    index, agreement = majority(preds)
    best = runs[index if index is not None else 0]
    samples = [api.VotedSample(content=run.content.strip(), reasoning_content=run.reasoning.strip(), answer=pred,
                               finish_reason=run.finish_reason()) for run, pred in zip(runs, preds)]
    message = api.ChatMessageOut(content=best.content.strip(), reasoning_content=best.reasoning.strip(),
                                 answer=(preds[index] or []) if index is not None else [], samples=samples,
                                 agreement=agreement)
    return api.ChatChoice(index=0, message=message, finish_reason=best.finish_reason(),
                          logprobs=chat_logprobs(tokenizer, best.tokens) if body.logprobs else None)


async def chat_stream(state: ServeState, body: api.ChatRequest, plan: ChatPlan, arrived: float,
                      deadline: float | None, scope: MutableMapping[str, Any]) -> StreamingResponse:
    """Headers go out with the first token: before it, a timeout or failure is still an HTTP error."""
    run = start_chat_choice(state, body, plan, 0)
    pieces = run.pieces(deadline)
    try:
        first, has_first = await first_item(pieces)
    except TimeoutError:
        run.job.cancel("timeout")
        raise timed_out(state) from None
    if run.error is not None:
        raise failed(run.error)
    if not has_first and run.answer is None and not run.stop.hit:
        raise cancelled_error(run.job)
    base: dict[str, Any] = {"id": new_id("chatcmpl"), "created": int(time.time())}
    tokenizer = state.loaded.tokenizer  # type: ignore[union-attr]

    def chunk(delta: dict, finish: str | None = None, tokens: list | None = None, **extra) -> str:
        # A plain dict shaped as api.ChatCompletionChunk: the per-token path, where building and dumping the
        # pydantic models cost more interpreter time than the rest of a chunk's work (bench/README.md, issue 27).
        logprobs = chat_logprobs(tokenizer, tokens).model_dump() if tokens else None
        return sse({**base, "object": "chat.completion.chunk", "model": api.MODEL_ID, "choices": [
            {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}],
            **{k: v.model_dump() for k, v in extra.items()}})

    async def events() -> AsyncIterator[str]:
        pending: list = []  # tokens whose log-probabilities go out with the next chunk

        def piece(item) -> str | None:
            kind, value = item
            if kind == "tokens":
                if body.logprobs:
                    pending.append(value)
                return None
            out = chunk({kind + ("_content" if kind == "reasoning" else ""): value}, tokens=list(pending))
            pending.clear()
            return out

        try:
            yield chunk({"role": "assistant", "content": ""})
            if has_first and (text := piece(first)):
                yield text
            try:
                async for item in pieces:
                    if text := piece(item):
                        yield text
            except TimeoutError:
                run.job.cancel("timeout")
                for event in error_events(timed_out(state)):
                    yield event
                return
            if run.error is not None or (run.answer is None and not run.stop.hit):
                err = failed(run.error) if run.error is not None else cancelled_error(run.job)
                for event in error_events(err):
                    yield event
                return
            observe(state, arrived, run, plan.prompt_tokens)
            generated = run.generated()
            usage = api.Usage(prompt_tokens=plan.prompt_tokens, completion_tokens=generated,
                              total_tokens=plan.prompt_tokens + generated)
            scope["lawtune.tokens"] = (plan.prompt_tokens, generated)
            yield chunk({"answer": run.letters(plan.record)}, run.finish_reason(), tokens=list(pending),
                        usage=usage)
            if body.stream_options and body.stream_options.include_usage:
                yield sse(api.ChatCompletionChunk(**base, choices=[], usage=usage).model_dump())
            yield sse("[DONE]")
        finally:
            run.job.cancel("the client went away")
            state.release(rows_of(body))

    return StreamingResponse(events(), media_type="text/event-stream; charset=utf-8",
                             headers={"Cache-Control": "no-store"}, background=None)
