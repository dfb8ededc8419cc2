"""lawtune's generation engine: continuous batching on a static KV cache, greedy and sampled decoding, streaming.

Why its own engine (issue 16, one H200, the 1.5B architecture): transformers' ``generate`` streamed one question
at 13 tokens/s; its continuous batching (``init_continuous_batching``, transformers 5.17) reached 320 tokens/s on
a mixed-length workload; and static batches spend half their steps on rows that have ended and wait for the
longest row. vLLM is not installable beside the pinned torch here. The engine keeps what made lawtune's decoder
fast (each decoding step replayed from one CUDA graph) and adds what the static decoder lacked:

* **Slots.** The cache holds ``slots`` sequences of at most ``max_len`` tokens (prompt and generation), one row
  each (``SlotCache``). When a sequence ends, its row takes the next waiting request at once: the new prompts are
  prefilled (one padded batch) between two decoding steps. Every decoding step runs all rows with the same fixed
  tensors (token, position, visibility mask, sampling settings), which is what lets a GPU replay it from a graph;
  a free row computes on stale data that nothing reads.
* **Sampling on the same path.** Temperature, top-p and top-k per row; the randomness is a counter-based hash of
  (the sequence's seed, its step, the token id) turned into Gumbel noise, so a sequence's samples depend on its
  own seed only, never on which other sequences share the batch or on the order of requests. A sequence's seed
  comes from (the request's seed, its key, the sample index) (``sample_seed``). ``n`` samples of one prompt share
  one prefill (the prompt's cache row is copied).
* **Log-probabilities** of every generated token under the model's own distribution (temperature 1, no top-p/k);
  an engine made with ``top_logprobs=K`` also keeps the K likeliest tokens of every step (an OpenAI server's
  ``top_logprobs``), and a request may ask for its prompt's log-probabilities (``prompt_logprobs``: an OpenAI
  completion's ``echo``), computed in its prefill.
* **Streaming.** ``stream`` yields a request's tokens as they are made; with the background loop running
  (``start``, used by ``serve``) many callers stream at once from one batch, and a caller that stops listening
  frees its row at the next step.
* **Only the rows in use.** A new sequence takes the lowest free row, and a step runs the rows up to the highest
  one in use, rounded up to a power of two (one graph per such width): one stream in a server of 32 slots costs
  one row's step, not 32 (issue 16: 92 tokens/s for one client of a 32-slot server before this).
* **Only the columns in use.** A step attends the cache columns up to the furthest position a running row writes
  in it, rounded up to a power of two (at least ``MIN_COLUMNS``; one graph per rows and columns), not the whole
  slot: attention over a one-row batch is latency-bound in its length (issue 16, one H200, one row of a
  32-slot server of 4,096 tokens a slot: 116 tokens/s over all 4,096 columns, 211 in a slot of 768).
* **The host reads behind the GPU.** After queueing step k the host takes what step k-2 made (copied to pinned
  memory behind it, ``LOOK_LAG``), while the GPU runs steps k-1 and k: a streaming caller's per-step work
  (reading its tokens, decoding text, waking its thread) overlaps the GPU instead of idling it. With a
  synchronous read after every step one stream through ``ask`` ran at 157 tokens/s, against the static decoder's
  204 for one row (issue 16).
* **Live weights.** The engine holds the model itself, never a copy: captured graphs point at its parameters,
  which optimizer steps update in place, so generation after a training step uses the new LoRA weights.

On a CPU (or ``use_graph=False``) the same scheduler runs each step eagerly: that is what the tests check
against ``generate``. Limits: sdpa-family attention and full attention in every layer (``engine_supported``);
anything else goes through transformers' ``generate`` (``generation.generate``).
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from .decode import base_model, cache_keyword, graph_decode_supported

log = logging.getLogger("lawtune")

MASK64 = (1 << 64) - 1
# Stop tokens a request may name besides the end token (a fixed table on the device)
MAX_STOP_TOKENS = 4
# Without a streaming caller the host looks at the rows every this many steps (or sooner, when a row's budget
# runs out): a row that ends on its end token waits at most this many steps for its successor, and the GPU is
# not held up by the host after every step.
CHECK_EVERY = 8
# The narrowest window of cache columns a decoding step attends (see "Only the columns in use").
MIN_COLUMNS = 256
# Admission of waiting requests with rows running: once 1/ADMIT_FRACTION of the rows are free, or after ADMIT_WAIT
# steps (see GenerationEngine._admit).
ADMIT_FRACTION = 16
ADMIT_WAIT = 8
# The host takes a reading of the rows this many steps after it: with two steps queued behind it, a pause of the
# host's thread (another thread holding the interpreter, a slow client) shorter than a step does not idle the GPU.
LOOK_LAG = 2


def _signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


# splitmix64's constants, as signed 64-bit integers (torch has no unsigned 64-bit arithmetic)
_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
_STEP = _signed(0xD1B54A32D192ED03)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), a function of (seed, step, token) alone: splitmix64 of their combination.
    float32 with 24 random bits, which is all a float32 in (0, 1) holds near 1."""
    x = seed * _GOLDEN + step * _STEP + token
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    x = x ^ _shift_right(x, 31)
    return (_shift_right(x, 40).float() + 0.5) / float(1 << 24)


def sample_seed(seed: int, key: str, index: int) -> int:
    """A sequence's own seed from (the request's seed, its key, the sample index): the same three give the same
    samples whatever else runs beside them."""
    digest = hashlib.sha256(f"{seed}\x1f{key}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2  # 62 bits: stays positive in int64 arithmetic


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, ban: torch.Tensor, ban_token: int,
                  sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token, its log-probability) per row of ``logits`` (rows, vocab), float32.

    Rows with temperature 0 are greedy. ``ban`` rows may not pick ``ban_token`` (the end token before
    ``min_tokens``). With ``sampling`` False every row is greedy (the cheaper graph)."""
    vocab = logits.shape[-1]
    banned = logits[:, ban_token].masked_fill(ban, float("-inf"))
    logits = logits.clone()
    logits[:, ban_token] = banned
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy, logprobs.gather(1, greedy[:, None])[:, 0]
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    cut = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = ordered.softmax(-1)
    cut |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keep the smallest head whose mass reaches top_p
    u = uniform_noise(seed[:, None], step[:, None], order)
    pick = (ordered.masked_fill(cut, float("-inf")) - torch.log(-torch.log(u))).argmax(-1)
    sampled = order.gather(1, pick[:, None])[:, 0]
    token = torch.where(temperature > 0, sampled, greedy)
    return token, logprobs.gather(1, token[:, None])[:, 0]


def engine_supported(model) -> bool:
    """True where the engine reproduces transformers' greedy ``generate`` (the static decoder's limits)."""
    return graph_decode_supported(model)


# ----------------------------------------------------------------------------- the cache


class SlotCache(Cache):
    """Keys and values of ``slots`` sequences, one row each, ``max_len`` columns; a column is a position.

    While ``prefill_rows`` is set, a forward writes its (right-padded) prompts into those rows from column 0 and
    attends within the prompts only. Otherwise (decoding, one new token a row) each row's key and value go to that
    row's own column ``write_at`` and the first ``columns`` columns of the rows are attended, masked by the engine's
    visibility mask."""

    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__(layers=[])
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = torch.arange(slots, device=device)
        self.write_at = torch.zeros(slots, dtype=torch.long, device=device)
        self.prefill_rows: torch.Tensor | None = None
        self.active = slots  # decoding runs the rows [0, active)
        self.columns = max_len  # and attends their columns [0, columns)
        self.max_len = max_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            width = key_states.shape[2]
            keys[self.prefill_rows, :, :width] = key_states
            values[self.prefill_rows, :, :width] = value_states
            return key_states, value_states
        a = self.active
        keys[self.rows[:a], :, self.write_at[:a]] = key_states[:, :, 0]
        values[self.rows[:a], :, self.write_at[:a]] = value_states[:, :, 0]
        return keys[:a, :, : self.columns], values[:a, :, : self.columns]

    def copy_row(self, src: int, dst: list[int], width: int) -> None:
        """Row ``src``'s first ``width`` columns into rows ``dst`` (samples sharing one prompt)."""
        index = torch.tensor(dst, device=self.rows.device)
        for tensor in (*self.keys, *self.values):
            tensor[index, :, :width] = tensor[src, :, :width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0


# ----------------------------------------------------------------------------- requests


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

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {self.max_new_tokens} and {self.n}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"temperature >= 0, 0 < top_p <= 1 and top_k >= 0 required, got {self.temperature}, "
                             f"{self.top_p}, {self.top_k}")


@dataclass
class Sample:
    """One generated sequence of a request."""

    index: int
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    """Per token, the request's ``top_logprobs`` likeliest (token, log-probability) of its step."""
    finish_reason: str | None = None
    """stop (end or stop token), length (budget), cancelled, or error."""


class Request:
    """A prompt, how to generate it, and its samples as they are made. Made by ``GenerationEngine.submit``."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, key: str):
        self.prompt_ids, self.params, self.key = list(prompt_ids), params, key
        self.samples = [Sample(i, sample_seed(params.seed, key, i)) for i in range(params.n)]
        self.done = threading.Event()
        self.cancelled = False
        self.error: BaseException | None = None
        self.events: collections.deque = collections.deque()  # (sample index, token, logprob), for stream()
        self.wake = threading.Condition()
        self.streaming = False
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
        """With ``params.prompt_logprobs``: per prompt token after the first, its log-probability and the likeliest
        tokens at its position."""

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


# ----------------------------------------------------------------------------- the engine


class GenerationEngine:
    """Continuous batching over ``slots`` rows of ``max_len`` tokens for one model (see the module docstring)."""

    def __init__(self, model, eos_token_id: int, slots: int = 64, max_len: int = 4096, use_graph: bool | None = None,
                 max_prefill_tokens: int = 32768, top_logprobs: int = 0):
        self.model = model
        base = base_model(model)
        config = base.config
        self.decoder, self.head = base.get_decoder(), base.get_output_embeddings()
        self.cache_kw = cache_keyword(model)
        weight = base.get_input_embeddings().weight
        self.device = weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        self.slots, self.max_len, self.eos = slots, max_len, eos_token_id
        self.max_prefill_tokens = max_prefill_tokens
        self.top = top_logprobs
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
        self.cache = SlotCache(config.num_hidden_layers, slots, max_len, getattr(config, "num_key_value_heads", heads),
                               head_dim, dtype, self.device)
        d, s = self.device, slots
        self.token = torch.zeros(s, dtype=torch.long, device=d)
        self.visible = torch.zeros(s, max_len, dtype=torch.bool, device=d)
        # Column 0 of a row that never held a sequence is visible too: a step's window of columns then never leaves
        # a free row with nothing to attend (a softmax of nothing is NaN, which would land in its cache).
        self.visible[:, 0] = True
        self.temperature = torch.zeros(s, device=d)
        self.top_p = torch.ones(s, device=d)
        self.top_k = torch.zeros(s, dtype=torch.long, device=d)
        self.seed = torch.zeros(s, dtype=torch.long, device=d)
        self.step_no = torch.zeros(s, dtype=torch.long, device=d)
        self.min_tokens = torch.zeros(s, dtype=torch.long, device=d)
        self.budget = torch.ones(s, dtype=torch.long, device=d)
        self.ignore_eos = torch.zeros(s, dtype=torch.bool, device=d)
        self.stop_ids = torch.full((s, MAX_STOP_TOKENS), -1, dtype=torch.long, device=d)
        # What the device keeps of each row between the host's looks: its tokens, their log-probabilities, whether
        # it still runs, and how many tokens it had when it ended.
        self.out_tokens = torch.zeros(s, max_len, dtype=torch.long, device=d)
        self.out_logprobs = torch.zeros(s, max_len, device=d)
        # The likeliest tokens of every step (an engine made with top_logprobs only: a top-k over the vocabulary a
        # step, and what the host reads grows with it).
        self.out_top_ids = torch.zeros(s, max_len, top_logprobs, dtype=torch.long, device=d)
        self.out_top_logprobs = torch.zeros(s, max_len, top_logprobs, device=d)
        self.alive = torch.zeros(s, dtype=torch.bool, device=d)
        self.length = torch.zeros(s, dtype=torch.long, device=d)
        self.offsets = torch.arange(max_len, device=d)  # column offsets of a reading
        self.delivered = [0] * s  # tokens of the row's sample the host has recorded
        self.admitted_at = [0] * s  # self.steps when the row's sample was admitted
        self.prompt_len = [0] * s  # the column its first decoding step writes
        self.free = list(range(slots))  # a heap: new sequences take the lowest free row
        self.running: dict[int, tuple[Request, Sample]] = {}
        self.pending: collections.deque[Look] = collections.deque()  # readings on their way to the host
        self.waiting: collections.deque[Request] = collections.deque()
        # By (sampling, rows, columns, top): a step that keeps the likeliest tokens is a graph of its own, recorded when
        # first needed (capture_graphs records the others), so steps that need none never pay for them.
        self.graphs: dict[tuple[bool, int, int, bool], torch.cuda.CUDAGraph] = {}
        self.warm: set[tuple[bool, int, int, bool]] = set()
        self.pool: Any = None  # one memory pool for all graphs (they never run at the same time); torch's handle
        self.lock = threading.Condition()  # guards waiting; the loop waits on it when idle
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decoding steps run, the rows busy in them (slot occupancy), the rows computed and the
        self.busy_rows = 0  # cache columns attended
        self.row_steps = 0
        self.column_steps = 0
        self.since_look = 0
        self.since_admit = 0

    # -- submitting

    def submit(self, prompt_ids: list[int], params: SamplingParams, key: str | None = None,
               stream: bool = False) -> Request:
        """Queue a request (thread-safe). ``key`` names it for its samples' seeds (default: its prompt); ``stream``:
        its tokens are wanted as they come (the host looks after every step while it runs)."""
        if len(prompt_ids) + params.max_new_tokens > self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens and {params.max_new_tokens} new tokens do not fit "
                             f"in a slot of {self.max_len} tokens")
        if params.n > self.slots:
            raise ValueError(f"n={params.n} samples need more than the engine's {self.slots} slots")
        if not prompt_ids:
            raise ValueError("an empty prompt")
        if params.top_logprobs > self.top:
            raise ValueError(f"top_logprobs={params.top_logprobs}: this engine keeps at most {self.top}")
        if len(params.stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(params.stop_token_ids)}")
        key = key if key is not None else hashlib.sha256(str(prompt_ids).encode()).hexdigest()[:16]
        request = Request(prompt_ids, params, key)
        request.streaming = stream
        with self.lock:
            self.waiting.append(request)
            self.lock.notify_all()
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: its rows are freed at the next step."""
        request.cancelled = True
        with self.lock:
            self.lock.notify_all()

    # -- the loop

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free rows (one prefill), then one decoding step of every running row."""
        from .attention import eager_stance, fast_attention

        with fast_attention(self.model), eager_stance(self.model):
            self._admit()
            if self.running:
                self._decode()

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """Record every step graph now (each width of rows and of columns, greedy and sampling) instead of when a
        width first occurs: a server's requests then never wait for a capture (a warm-up step and a recording of the
        whole model each). Runs steps on free rows only, whose state a prefill resets. Returns the graphs held."""
        from .attention import eager_stance, fast_attention

        if not self.use_graph or self.running or self.thread is not None:
            return len(self.graphs)
        widths = sorted({self._rows(1 << k) for k in range(self.slots.bit_length() + 1)})
        windows = sorted({self._window(1 << k) for k in range(self.max_len.bit_length() + 1)})
        with fast_attention(self.model), eager_stance(self.model):
            for sampling in (False, True):
                for rows in widths:
                    for columns in windows:
                        while (sampling, rows, columns, False) not in self.graphs:
                            self._run_step(sampling, rows, columns, False)
        torch.cuda.synchronize(self.device)
        return len(self.graphs)

    def run(self) -> None:
        """Step until nothing is waiting or running (in the caller's thread)."""
        while self.has_work():
            self.step()

    def start(self) -> None:
        """Run the loop in a background thread (``serve``): requests submitted from any thread join the batch."""
        if self.thread is not None:
            return
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lawtune-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is None:
            return
        with self.lock:
            self.stopping = True
            self.lock.notify_all()
        self.thread.join()
        self.thread = None

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.has_work():
                    self.lock.wait()
                if self.stopping:
                    return
            try:
                self.step()
            except BaseException as exc:  # noqa: BLE001 - every waiting caller is told, the loop goes on
                # must catch everything: a waiting caller would otherwise wait forever. Each re-raises it; the
                # traceback is logged here too, where no caller may be left to see it.
                log.exception("generation engine: a step failed; every waiting and running request fails with it")
                self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self.lock:
            failed = [r for r, _ in self.running.values()] + list(self.waiting)
            self.waiting.clear()
        for _request, sample in list(self.running.values()):
            sample.finish_reason = sample.finish_reason or "error"
        self.free = list(range(self.slots))
        self.running.clear()
        self.pending.clear()
        for request in failed:
            request.error = exc
            for sample in request.samples:
                sample.finish_reason = sample.finish_reason or "error"
            self._notify(request)

    # -- consuming

    def stream(self, request: Request) -> Iterator[tuple[int, int, float]]:
        """(sample index, token, log-probability) of ``request`` as they are made. Drives the loop itself unless
        the background loop runs. Closing the iterator early cancels the request."""
        completed = False
        try:
            while True:
                while request.events:
                    yield request.events.popleft()
                if request.done.is_set():
                    while request.events:
                        yield request.events.popleft()
                    break
                if self.thread is None:
                    self.step()
                else:
                    with request.wake:
                        if not request.events and not request.done.is_set():
                            request.wake.wait(timeout=1.0)
            completed = True
        finally:
            if not completed:
                self.cancel(request)
                if self.thread is None:
                    self._drop_cancelled()
        if request.error is not None:
            raise request.error

    def generate(self, requests: Sequence[tuple[list[int], SamplingParams, str | None]]) -> list[Request]:
        """Submit all, run until all are done, return them in their order (their samples hold tokens and
        log-probabilities). Known up front, they are admitted largest budget first: the rows still running at the
        end, alone, are then the short ones."""
        order = sorted(range(len(requests)), key=lambda i: -requests[i][1].max_new_tokens)  # stable: ties keep order
        by_index = {i: self.submit(*requests[i]) for i in order}
        submitted = [by_index[i] for i in range(len(requests))]
        if self.thread is None:
            self.run()
        for request in submitted:
            request.done.wait()
            if request.error is not None:
                raise request.error
        return submitted

    # -- inside a step

    def _notify(self, request: Request) -> None:
        if request.finished:
            request.done.set()
        with request.wake:
            request.wake.notify_all()

    def _finish(self, slot: int, reason: str) -> None:
        request, sample = self.running.pop(slot)
        sample.finish_reason = reason
        heapq.heappush(self.free, slot)

    def _drop_cancelled(self) -> None:
        for slot, (request, _sample) in list(self.running.items()):
            if request.cancelled:
                self._finish(slot, "cancelled")
                self._notify(request)
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            for request in gone:
                self.waiting.remove(request)
        for request in gone:
            for sample in request.samples:
                sample.finish_reason = "cancelled"
            self._notify(request)

    def _record(self, slot: int, tokens: list[int], logprobs: list[float], ended: bool,
                tops: list[list[tuple[int, float]]] | None = None) -> None:
        """New tokens of the sample in ``slot``; ``ended``: the device saw it end (the last token ends it); ``tops``:
        the likeliest tokens of each one's step, where the request asked for them."""
        request, sample = self.running[slot]
        sample.tokens.extend(tokens)
        sample.logprobs.extend(logprobs)
        if request.params.top_logprobs:
            sample.top_logprobs.extend(top[: request.params.top_logprobs] for top in tops or [[]] * len(tokens))
        request.events.extend((sample.index, t, lp) for t, lp in zip(tokens, logprobs))
        self.delivered[slot] += len(tokens)
        if ended:
            last, params = sample.tokens[-1], request.params
            stops = (last == self.eos and not params.ignore_eos) or last in params.stop_token_ids
            self._finish(slot, "stop" if stops and len(sample.tokens) >= params.min_tokens else "length")
        if tokens or ended:
            self._notify(request)

    def _admit(self) -> None:
        """Prefill waiting requests into free rows. A prefill is a whole forward pass of its own (on a GPU mostly
        kernel launches, whatever its size), so with rows running it waits until ``ADMIT_FRACTION`` of the rows are
        free or ``ADMIT_WAIT`` steps have passed: a free row idles a few steps instead of every step paying a
        prefill."""
        self._drop_cancelled()
        self.since_admit += 1
        enough = len(self.free) >= max(1, self.slots // ADMIT_FRACTION) or self.since_admit >= ADMIT_WAIT
        if self.running and not enough:
            return
        batch: list[Request] = []
        with self.lock:
            free, tokens = len(self.free), 0
            while self.waiting and self.waiting[0].params.n <= free:
                request = self.waiting[0]
                if batch and tokens + len(request.prompt_ids) > self.max_prefill_tokens:
                    break
                self.waiting.popleft()
                batch.append(request)
                free -= request.params.n
                tokens += len(request.prompt_ids)
        if batch:
            self._prefill(batch)
            self.since_admit = 0

    def _prefill(self, batch: list[Request]) -> None:
        """Prompts of ``batch`` into free rows, right-padded in one forward; each sample's first token."""
        d = self.device
        lengths = [len(r.prompt_ids) for r in batch]
        width = max(lengths)
        rows = [heapq.heappop(self.free) for _ in batch]  # the first sample's row of each request
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : lengths[i]] = torch.tensor(r.prompt_ids)
        ids = ids.to(d)
        positions = torch.arange(width, device=d).expand(len(batch), width)
        # Right padding: a real token never sees a pad (pads come after it), so plain causal attention is exact.
        causal = torch.ones(width, width, dtype=torch.bool, device=d).tril()[None, None]
        row_index = torch.tensor(rows, device=d)
        self.cache.prefill_rows = row_index
        try:
            hidden = self.decoder(input_ids=ids, attention_mask={"full_attention": causal}, position_ids=positions,
                                  use_cache=True, **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            self.cache.prefill_rows = None
        last = hidden[torch.arange(len(batch), device=d), torch.tensor(lengths, device=d) - 1]
        logits = self.head(last).float()
        for i, request in enumerate(batch):
            if request.params.prompt_logprobs is not None:
                request.prompt_logprobs = self._prompt_logprobs(hidden[i, : lengths[i] - 1], request)
        # Every sample's row: its settings, its prompt's cache, the same first-token logits.
        sample_rows, owner = [], []
        for i, request in enumerate(batch):
            own = [rows[i]] + [heapq.heappop(self.free) for _ in range(request.params.n - 1)]
            if len(own) > 1:
                self.cache.copy_row(rows[i], own[1:], lengths[i])
            for slot, sample in zip(own, request.samples):
                self.running[slot] = (request, sample)
                p = request.params
                self.temperature[slot] = p.temperature
                self.top_p[slot] = p.top_p
                self.top_k[slot] = p.top_k
                self.seed[slot] = sample.seed
                self.min_tokens[slot] = p.min_tokens
                self.budget[slot] = p.max_new_tokens
                self.ignore_eos[slot] = p.ignore_eos
                self.stop_ids[slot] = -1
                if p.stop_token_ids:
                    self.stop_ids[slot, : len(p.stop_token_ids)] = torch.tensor(p.stop_token_ids)
                self.step_no[slot] = 0
                self.delivered[slot] = 0
                self.admitted_at[slot] = self.steps
                self.prompt_len[slot] = lengths[i]
                self.visible[slot] = False
                self.visible[slot, : lengths[i]] = True
                self.cache.write_at[slot] = lengths[i]
                sample_rows.append(slot)
                owner.append(i)
        index = torch.tensor(sample_rows, device=d)
        sampling = any(r.params.temperature > 0 for r in batch)
        token, logprob = choose_tokens(logits[torch.tensor(owner, device=d)], self.temperature[index], self.top_p[index],
                                       self.top_k[index], self.seed[index], self.step_no[index],
                                       self.min_tokens[index] > 0, self.eos, sampling)
        self.token[index] = token
        self.step_no[index] = 1
        self.out_tokens[index, 0] = token
        self.out_logprobs[index, 0] = logprob
        tops: list = [None] * len(sample_rows)
        if self.top and any(r.params.top_logprobs for r in batch):
            top = torch.log_softmax(logits[torch.tensor(owner, device=d)], dim=-1).topk(self.top)
            self.out_top_ids[index, 0], self.out_top_logprobs[index, 0] = top.indices, top.values
            tops = [[list(zip(i, v))] for i, v in zip(top.indices.tolist(), top.values.tolist())]
        ended = self._ends(token, torch.ones_like(token), index)
        self.alive[index] = ~ended
        self.length[index] = 1
        for slot, t, lp, e, top_of in zip(sample_rows, token.tolist(), logprob.tolist(), ended.tolist(), tops):
            self._record(slot, [t], [lp], e, top_of)

    def _prompt_logprobs(self, hidden: torch.Tensor, request: Request) -> list[tuple[float, list[tuple[int, float]]]]:
        """Each prompt token's log-probability given the ones before it (from the prefill's hidden states), with the
        likeliest tokens at its position; a chunk of positions at a time, so a long prompt never holds its whole
        vocabulary-wide logits at once."""
        targets, k = request.prompt_ids[1:], request.params.prompt_logprobs or 0
        out: list[tuple[float, list[tuple[int, float]]]] = []
        for start in range(0, len(targets), 512):
            logprobs = torch.log_softmax(self.head(hidden[start: start + 512]).float(), dim=-1)
            chunk = torch.tensor(targets[start: start + 512], device=logprobs.device)
            chosen = logprobs.gather(1, chunk[:, None])[:, 0].tolist()
            if k:
                top = logprobs.topk(k)
                alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            else:
                alternatives = [[] for _ in chosen]
            out.extend(zip(chosen, alternatives))
        return out

    def _ends(self, token: torch.Tensor, count: torch.Tensor, rows) -> torch.Tensor:
        """Whether a row's ``count``-th token ``token`` ends it: an end or stop token (after ``min_tokens``), or the
        budget."""
        stops = ((token == self.eos) & ~self.ignore_eos[rows]) | (self.stop_ids[rows] == token[:, None]).any(-1)
        return (stops & (count >= self.min_tokens[rows])) | (count >= self.budget[rows])

    def _decode_step(self, sampling: bool, rows: int, columns: int, top: bool) -> None:
        """One token for each of the first ``rows`` rows, attending their first ``columns`` columns, on fixed tensors
        only (what a CUDA graph records)."""
        r = slice(0, rows)
        write_at = self.cache.write_at[r]
        self.visible[r].scatter_(1, write_at[:, None], True)
        self.cache.active, self.cache.columns = rows, columns
        try:
            hidden = self.decoder(input_ids=self.token[r, None],
                                  attention_mask={"full_attention": self.visible[r, None, None, :columns]},
                                  position_ids=write_at[:, None], use_cache=True,
                                  **{self.cache_kw: self.cache}).last_hidden_state
        finally:
            self.cache.active, self.cache.columns = self.slots, self.max_len
        logits = self.head(hidden[:, -1]).float()
        step_no = self.step_no[r]
        token, logprob = choose_tokens(logits, self.temperature[r], self.top_p[r], self.top_k[r], self.seed[r], step_no,
                                       step_no < self.min_tokens[r], self.eos, sampling)
        column = step_no.clamp(max=self.max_len - 1)[:, None]  # an ended row's writes land past its end
        self.out_tokens[r].scatter_(1, column, token[:, None])
        self.out_logprobs[r].scatter_(1, column, logprob[:, None])
        if top:
            likeliest = torch.log_softmax(logits, dim=-1).topk(self.top)
            where = column[:, :, None].expand(-1, -1, self.top)
            self.out_top_ids[r].scatter_(1, where, likeliest.indices[:, None])
            self.out_top_logprobs[r].scatter_(1, where, likeliest.values[:, None])
        step_no.add_(1)
        alive = self.alive[r]
        self.length[r].copy_(torch.where(alive, step_no, self.length[r]))
        alive.logical_and_(~self._ends(token, step_no, r))
        self.token[r].copy_(token)
        # A free row's column stops at the end; a running row never gets there (its budget fits in the slot).
        write_at.add_(1).clamp_(max=self.max_len - 1)

    def _rows(self, needed: int) -> int:
        """Rows a step runs when row ``needed - 1`` is the highest in use: a power of two (few graphs)."""
        return min(self.slots, _power_of_two(needed))

    def _window(self, needed: int) -> int:
        """Columns a step attends when its furthest write is column ``needed - 1``: a power of two (few graphs)."""
        return min(self.max_len, max(MIN_COLUMNS, _power_of_two(needed)))

    def _rows_in_use(self) -> int:
        return self._rows(max(self.running) + 1)

    def _columns_in_use(self) -> int:
        """Columns the next step attends: each running row writes its prompt length plus the steps it has had."""
        return self._window(max(self.prompt_len[slot] + self.steps - self.admitted_at[slot] + 1
                                for slot in self.running))

    def _run_step(self, sampling: bool, rows: int, columns: int, top: bool = False) -> None:
        key = (sampling, rows, columns, top)
        if not self.use_graph:
            self._decode_step(sampling, rows, columns, top)
        elif key in self.graphs:
            self.graphs[key].replay()
        elif key in self.warm:  # warmed up once: record the step (recording does not run it), then replay
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._decode_step(sampling, rows, columns, top)
            self.graphs[key] = graph
            graph.replay()
        else:  # capture needs one eager run on a side stream first
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._decode_step(sampling, rows, columns, top)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.warm.add(key)

    def _decode(self) -> None:
        """One decoding step; then the host takes the previous step's reading (see the module docstring) and, when
        a streaming caller waits, a row's budget runs out or ``CHECK_EVERY`` steps have passed, starts a reading of
        this one."""
        sampling = any(request.params.temperature > 0 for request, _ in self.running.values())
        top = self.top > 0 and any(request.params.top_logprobs for request, _ in self.running.values())
        rows, columns = self._rows_in_use(), self._columns_in_use()
        self._run_step(sampling, rows, columns, top)
        self.steps += 1
        self.busy_rows += len(self.running)
        self.row_steps += rows
        self.column_steps += columns
        self.since_look += 1
        while self.pending and self.pending[0].step <= self.steps - LOOK_LAG:
            self._take(self.pending.popleft())
        running = list(self.running.items())
        if not running:
            self.pending.clear()  # readings of rows that are gone
            return
        counts = {slot: 1 + self.steps - self.admitted_at[slot] for slot, _ in running}
        budget_out = any(counts[slot] >= request.params.max_new_tokens for slot, (request, _) in running)
        streaming = any(request.streaming for request, _ in self.running.values())
        cancelled = any(request.cancelled for request, _ in self.running.values())
        if streaming or budget_out or cancelled or self.since_look >= CHECK_EVERY:
            self.since_look = 0
            self.pending.append(self._look(running, counts))

    def _look(self, running: list, counts: dict[int, int]) -> Look:
        """Start copying what the running rows made since the host's last reading to the host, behind the step
        just queued: per row the ``width`` columns before its step count (the device's ``step_no``, which the host's
        count equals), which hold every token the host has not seen. Nothing travels to the device, so the host does
        not wait for the step (a copy from host memory would)."""
        width = max(max(counts[slot] - self.delivered[slot] for slot, _ in running), 1)
        columns = (self.step_no[:, None] - width + self.offsets[None, :width]).clamp(0, self.max_len - 1)
        # One transfer: float64 holds token ids and lengths exactly.
        parts = [self.out_tokens.gather(1, columns).double(), self.out_logprobs.gather(1, columns).double(),
                 self.alive[:, None].double(), self.length[:, None].double()]
        top = self.top if any(request.params.top_logprobs for _, (request, _sample) in running) else 0
        if top:  # then each column's likeliest tokens: ids, then log-probabilities
            where = columns[:, :, None].expand(-1, -1, top)
            parts += [self.out_top_ids.gather(1, where).flatten(1).double(),
                      self.out_top_logprobs.gather(1, where).flatten(1).double()]
        table = torch.cat(parts, dim=1)
        event = None
        if table.is_cuda:
            host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            host.copy_(table, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            table = host
        return Look(self.steps, [(slot, sample) for slot, (_, sample) in running], counts, width, table, event, top)

    def _take(self, look: Look) -> None:
        """Record a reading: new tokens, and the rows that ended. A row freed since (cancelled) is skipped."""
        if look.event is not None:
            look.event.synchronize()
        table, w = look.table.tolist(), look.width
        for slot, sample in look.rows:
            if slot not in self.running or self.running[slot][1] is not sample:
                continue
            row, count = table[slot], look.counts[slot]
            alive = row[2 * w] > 0
            end = count if alive else int(row[2 * w + 1])
            first, last = self.delivered[slot] - count + w, end - count + w  # index in the reading of a column c: c - count + w
            tops = None
            if look.top:
                k, ids_at, lps_at = look.top, 2 * w + 2, 2 * w + 2 + w * look.top
                tops = [list(zip((int(t) for t in row[ids_at + c * k: ids_at + (c + 1) * k]),
                                 row[lps_at + c * k: lps_at + (c + 1) * k])) for c in range(first, last)]
            self._record(slot, [int(t) for t in row[first:last]], row[w + first: w + last], not alive, tops)


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


@dataclass
class Look:
    """A reading of the rows after step ``step``: which sample each row held then, its token count then, and the
    table (tokens, log-probabilities, alive, length per row), with the event that says it reached the host."""

    step: int
    rows: list
    counts: dict
    width: int
    table: torch.Tensor
    event: torch.cuda.Event | None
    top: int = 0
    """Likeliest tokens per column in the table after alive and length (ids, then log-probabilities); 0 = none."""


# ----------------------------------------------------------------------------- one engine per model

_ENGINES: weakref.WeakKeyDictionary[torch.nn.Module, GenerationEngine] = weakref.WeakKeyDictionary()


def engine_for(model, eos_token_id: int, slots: int, max_len: int, use_graph: bool | None = None) -> GenerationEngine:
    """The model's engine, reused while it has these slots and at least ``max_len`` tokens a slot; else a new one
    (the old cache is given back first). ``max_len`` is rounded up to a multiple of 256 so that nearby lengths
    share one engine."""
    max_len = -(-max_len // 256) * 256
    engine = _ENGINES.get(model)
    if (engine is not None and engine.slots == slots and engine.max_len >= max_len and engine.eos == eos_token_id
            and (use_graph is None or engine.use_graph == use_graph) and engine.thread is None):
        return engine
    if engine is not None and engine.thread is None:
        del _ENGINES[model]
        del engine
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    engine = GenerationEngine(model, eos_token_id, slots=slots, max_len=max_len, use_graph=use_graph)
    _ENGINES[model] = engine
    return engine

