"""The OpenAI-shaped requests and responses of `lawtune serve`, as pydantic models (they also make the OpenAPI schema
at ``/openapi.json``).

Requests ignore fields they do not know, as vLLM's do: a client library may send its own. A field that would change
the answer but that lawtune does not implement (tools, a response format, logit biases, penalties, …) is refused
with a 400 naming it, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_serializer, model_validator

from ..config import InferMode

MODEL_ID = "lawtune"
MAX_TOKENS_LIMIT = 32768
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP = 4

# Fields of OpenAI's requests that would change what is generated, with the value that changes nothing.
NOT_IMPLEMENTED: dict[str, Any] = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "response_format": None,
    "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "suffix": None, "audio": None,
    "modalities": None, "prediction": None, "guided_json": None, "guided_regex": None, "guided_choice": None,
    "guided_grammar": None,
}

Count = Annotated[int, Field(ge=1, le=MAX_CHOICES)]
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
Stop = str | Annotated[list[str], Field(max_length=MAX_STOP)]


class ApiModel(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _not_implemented(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            given = [k for k, inert in NOT_IMPLEMENTED.items() if raw.get(k, inert) not in (inert, None)]
            if given:
                raise ValueError(f"{', '.join(given)}: not implemented by lawtune serve (remove the field)")
        return raw


class StreamOptions(BaseModel):
    include_usage: StrictBool = False
    """Send one more chunk before [DONE] with the request's usage and no choices."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart] | None = None


class SamplingFields(ApiModel):
    """What chat and text completions share."""

    model: str | None = MODEL_ID
    """The served model's id (``lawtune``)."""
    stream: StrictBool = False
    """Server-sent events as tokens come, then ``data: [DONE]``."""
    stream_options: StreamOptions | None = None
    n: Count = 1
    """Choices; more than one are sampled (temperature > 0) and not streamed."""
    temperature: Temperature | None = None
    """0 or absent: greedy; above 0: sampling with top_p (the server's default 0.95)."""
    top_p: TopP | None = None
    seed: int | None = None
    """Sampling seed: the same request with the same seed gives the same samples, whatever runs beside it."""
    stop: Stop | None = None
    """Up to 4 strings that end the text (not included); a partial match is never streamed."""


class ChatRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    """The last user message is the question: a JEC-QA record as JSON, or text with trailing option lines."""
    mode: InferMode = "direct"
    """lawtune's field: direct (an empty think block) or reasoning (think first)."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    """Hard cap on generated tokens, a forced answer's included; absent = the mode's default budget."""
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_LIMIT)] | None = None
    """OpenAI's newer name of max_tokens (wins when both are given)."""
    logprobs: StrictBool = False
    """Return each generated token's log-probability."""
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """With logprobs: that many likeliest tokens of each step."""
    vote: Count | None = None
    """lawtune's field: K sampled answers (one engine request of K samples: one prefill; sample i seeded by (seed,
    the question's id, i), as `eval --samples K`) voted into one by eval's maj@K rule. The one choice is the first
    sample that gave the majority answer set (``content``, ``reasoning_content``; ``answer`` = the voted letters),
    its message adds ``samples`` (every sample's content, reasoning, answer and finish reason) and ``agreement``.
    Implies sampling (temperature absent: the server's); not with stream, n > 1 or a question without options."""


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[int], Field(min_length=1)] | Annotated[list[str], Field(min_length=1)] | \
        Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)]
    """Raw prompt(s), as text (tokenized with the tokenizer's special tokens) or token ids; no chat template."""
    max_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS_LIMIT)] = 16
    """Tokens to generate (OpenAI's default 16); 0 with echo scores the prompt only."""
    echo: StrictBool = False
    """Return the prompt before the completion (with logprobs: the prompt tokens' log-probabilities too)."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    """Log-probabilities of the tokens, and this many likeliest tokens at each position."""
    best_of: int | None = None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of not in (None, self.n):
            raise ValueError("best_of: not implemented by lawtune serve (leave it out, or equal to n)")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens: 0 only with echo (scoring the prompt)")
        return self


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class VotedSample(BaseModel):
    """One of the K samples of a voted answer."""

    content: str
    reasoning_content: str
    answer: list[str] | None
    """The letters read from this sample; null = unreadable (it did not vote)."""
    finish_reason: str


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str
    """The think text (reasoning mode), split at </think>."""
    answer: list[str]
    """The option letters read from the answer (empty for a question without options); with ``vote``: the majority
    answer set (empty when no sample could be read)."""
    samples: list[VotedSample] | None = None
    """With ``vote`` only: every sample, in sample order."""
    agreement: float | None = None
    """With ``vote`` only: the share of the K samples that gave the majority answer set."""

    @model_serializer(mode="wrap")
    def _vote_fields_only_when_voted(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None or k not in ("samples", "agreement")}


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str = MODEL_ID
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """A piece of a streamed message; fields not in this piece are left out of it."""

    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    answer: list[str] | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler) -> dict:
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str = MODEL_ID
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str = MODEL_ID
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str = MODEL_ID
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lawtune"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code)).model_dump()
