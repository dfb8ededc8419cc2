"""What a caller asks for and what the engine keeps of it: a request (``Request``: a prompt and its
``SamplingParams``), its samples (``Sample``: the tokens as they are made), and per sample the ``Sequence`` that runs
in a row of the cache.

A sample's randomness comes from its own seed, ``sample_seed(request seed, request key, sample index)``: the same
three give the same tokens whatever else shares the batch, whatever order the requests came in, and whether or not
the sample was preempted on the way (its step numbering survives preemption).
"""

from __future__ import annotations

import collections
import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

# Stop tokens a request may name besides the end token (a fixed table on the device)
MAX_STOP_TOKENS = 4


def sample_seed(seed: int, key: str, index: int) -> int:
    """A sequence's own seed from (the request's seed, its key, the sample index): the same three give the same
    samples whatever else runs beside them."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # 62 bits: stays positive in int64 arithmetic


@dataclass
class SamplingParams:
    """How one request is generated."""

    max_new_tokens: int
    """Token budget of each sample, the end token included."""
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 = no limit."""
    seed: int = 0
    n: int = 1
    """Samples of the prompt (one prefill)."""
    min_tokens: int = 0
    """The end token is not chosen before this many tokens."""
    ignore_eos: bool = False
    """The end token does not end a sample (benchmarks: every sample runs to its budget)."""
    stop_token_ids: tuple[int, ...] = ()
    """More tokens that end a sample (kept in its tokens, as the end token is)."""
    top_logprobs: int = 0
    """The likeliest tokens of each step kept beside the chosen one (at most the engine's ``top_logprobs``)."""
    prompt_logprobs: int | None = None
    """Keep the log-probability of every prompt token after the first (and this many likeliest tokens at each
    position); None = not computed."""
    forced_answer: Callable[[list[int]], list[int]] | None = None
    """Reasoning mode's forced answer: a sample that uses up ``max_new_tokens`` without ending gets the tokens this
    returns for its tokens so far (the closing of its think block) appended on its own row, and decodes on for
    ``answer_reserve`` more tokens. None = the budget ends the sample."""
    answer_reserve: int = 0
    """Tokens a forced answer may add after its closing tokens."""
    closing_tokens: int = 0
    """The most closing tokens ``forced_answer`` returns: what ``submit`` keeps room for in a row."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature >= 0, 0 < top_p <= 1 and top_k >= 0 required, got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")
        if self.answer_reserve < 0 or self.closing_tokens < 0:
            raise ValueError("answer_reserve and closing_tokens must be >= 0")

    @property
    def row_tokens(self) -> int:
        """Tokens a sample may add to its row: its budget, and a forced answer's closing and reserve."""
        if self.forced_answer is None:
            return self.max_new_tokens
        return self.max_new_tokens + self.closing_tokens + self.answer_reserve


@dataclass
class Sample:
    """One generated sequence of a request."""

    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    """The tokens the model chose, the end token included (a forced answer's closing tokens are not among them)."""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per token, the request's ``top_logprobs`` likeliest (token, log-probability) of its step."""
    finish_reason: str | None = None
    """stop (end or stop token), length (budget), cancelled, or error."""
    forced_at: int | None = None
    """A forced answer: its closing tokens come after ``tokens[:forced_at]``."""
    closing: list[int] = field(default_factory=list)
    """A forced answer's closing tokens."""


class Request:
    """A prompt, how to generate it, and its samples as they are made. Made by ``GenerationEngine.submit``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, key: str):
        self.prompt_ids, self.params, self.key = list(prompt_ids), params, key
        self.samples = [Sample(i, sample_seed(params.seed, key, i)) for i in range(params.n)]
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        # Per sample, (sample index, token, logprob) as read, for stream()
        self.events: list[collections.deque] = [collections.deque() for _ in range(params.n)]
        self.wake = threading.Condition()
        self.waiting = 0
        """Callers waiting on ``wake`` now (counted under it): the engine's thread takes the lock to tell them only
        then (a streaming request on serve's pump has none)."""
        # Called in the engine's thread whenever the request has new events or has ended (after they are queued):
        # one thread that streams many requests (serve's pump) learns which to look at without a thread waiting on
        # each one's ``wake``. A listener must not block.
        self.listeners: list[Callable[[Request], None]] = []
        self.streaming = False
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
        """With ``params.prompt_logprobs``: per prompt token after the first, its log-probability and the likeliest
        tokens at its position."""

    @property
    def finished(self) -> bool:
        for sample in self.samples:  # a loop, not all(...): the engine's thread asks this of every row it reads
            if sample.finish_reason is None:
                return False
        return True


@dataclass(eq=False)
class Sequence:
    """One sample as it runs in a row of the cache: everything the host keeps of that row.

    The device holds the row's tokens a few steps ahead of the host; ``count(steps)`` is how many the device has
    made (the host's count of the device's ``step_no``), ``len(sample.tokens)`` how many the host has read."""

    request: Request
    sample: Sample
    slot: int = -1
    """Its row while running; -1 while waiting."""
    order: int = 0
    """When it was (last) admitted, in admissions: preemption takes the newest."""
    since: int = 0
    """The engine's step count when the device last set the row (a prefill or a forced answer's closing)."""
    base: int = 0
    """Tokens the device held for it just after that."""
    epoch: int = 0
    """Bumped whenever the row is set anew: a reading taken before then is not read for it."""
    params: SamplingParams = field(init=False)
    offset: int = field(init=False)
    """Cache columns that are not its tokens: the prompt, and a forced answer's closing once it came."""
    budget: int = field(init=False)
    """Its token budget now: ``max_new_tokens``; for a forced answer its tokens before the closing and the reserve."""

    def __post_init__(self) -> None:
        # plain attributes, not properties: the step loop reads them for every running row
        self.params = self.request.params
        self.offset = len(self.request.prompt_ids) + len(self.sample.closing)
        self.budget = self.params.max_new_tokens

    @property
    def delivered(self) -> int:
        """Tokens the host has read."""
        return len(self.sample.tokens)

    def count(self, steps: int) -> int:
        """Tokens the device has made for it after ``steps`` steps (ended rows run on; the host reads the end)."""
        return self.base + steps - self.since

    def columns(self, steps: int) -> int:
        """Cache columns its row uses after the next step."""
        return self.offset + self.base + steps - self.since

    def context(self) -> list[int]:
        """What a prefill puts in its row when it is (re)admitted: the prompt and the tokens so far, a forced
        answer's closing where it came; the prefill's last position gives its next token."""
        s = self.sample
        if s.forced_at is None:
            return self.request.prompt_ids + s.tokens
        return self.request.prompt_ids + s.tokens[: s.forced_at] + s.closing + s.tokens[s.forced_at:]

    def force(self, closing: list[int]) -> None:
        """Its budget ran out while thinking: the closing tokens follow, then up to ``answer_reserve`` more."""
        self.sample.forced_at, self.sample.closing = self.delivered, list(closing)
        self.offset += len(closing)
        self.budget = self.delivered + self.params.answer_reserve
