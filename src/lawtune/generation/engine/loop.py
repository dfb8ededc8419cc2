"""The engine's loop: ``GenerationEngine`` takes requests (``submit``), and each ``step`` schedules (admits waiting
sequences into free rows, preempts when the token budget runs out), runs one decoding step of every running row, and
reads back what the rows made, behind the GPU. ``stream`` yields a request's tokens as they come; with the
background loop running (``start``, used by ``serve``) many callers stream at once from one batch, and a caller that
stops listening frees its row at the next step.

What the device made reaches the samples through ``readback.py``, a few steps behind the GPU.

Why its own engine (issue 16, one H200, the 1.5B architecture): transformers' ``generate`` streamed one question
at 13 tokens/s; its continuous batching (``init_continuous_batching``, transformers 5.17) reached 320 tokens/s on a
mixed-length workload; static batches spend half their steps on rows that have ended and wait for the longest row.
vLLM is not installable beside the pinned torch here.

An engine is owned: whoever makes it closes it (``close``, or ``with GenerationEngine(...) as engine``), which gives
its cache, graphs and model reference back.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from collections.abc import Sequence as Seq

import torch

from ...compat import clear_cublas_workspaces
from ..attention import fast_attention
from ..folded import FoldedLora, fold_adapter
from .cache import budget_bytes, cache_dtype, rows_within, token_bytes
from .readback import ReadBack
from .runner import ModelRunner, base_model
from .scheduler import Scheduler
from .sequence import Request, SamplingParams, Sequence

log = logging.getLogger("lawtune")


class GenerationEngine:
    """Continuous batching over ``slots`` rows of ``max_len`` tokens for one model (see the module docstring).
    ``max_tokens``: the cache columns the rows may hold together (default all; less preempts). ``compile_step``,
    ``attention_kernel``: the fused step and the length-aware attention (None = where they run: a GPU)."""

    def __init__(self, model, eos_token_id: int, slots: int = 64, max_len: int = 4096, use_graph: bool | None = None,
                 max_prefill_tokens: int = 32768, top_logprobs: int = 0, max_tokens: int | None = None,
                 compile_step: bool | None = None, attention_kernel: bool | None = None):
        self.runner: ModelRunner | None = ModelRunner(model, eos_token_id, slots, max_len, use_graph, top_logprobs,
                                                      compile_step, attention_kernel)
        self.scheduler = Scheduler(slots, max_len, max_tokens, max_prefill_tokens)
        self.slots, self.max_len, self.eos, self.top = slots, max_len, eos_token_id, top_logprobs
        self.use_graph = self.runner.use_graph
        self.readback = ReadBack(self.runner, self.scheduler, eos_token_id, top_logprobs)
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.steps = 0  # decoding steps run, the rows busy in them (slot occupancy), the rows computed and the
        self.busy_rows = 0  # cache columns attended
        self.row_steps = 0
        self.column_steps = 0

    @property
    def model(self):
        return self.runner.model if self.runner is not None else None

    @property
    def cache_gib(self) -> float:
        """The KV cache's size in GiB (0 once closed)."""
        cache = self.runner.cache if self.runner is not None else None
        return sum(t.nbytes for t in (*cache.keys, *cache.values)) / 2**30 if cache is not None else 0.0

    @property
    def running(self) -> dict[int, Sequence]:
        return self.scheduler.running

    @property
    def lock(self) -> threading.Condition:
        return self.scheduler.lock

    def fits(self, slots: int, max_len: int, top_logprobs: int = 0) -> bool:
        """Whether this (open, idle) engine can take a call that needs ``slots`` rows of ``max_len`` tokens."""
        return (self.runner is not None and self.thread is None and self.slots >= slots and self.max_len >= max_len
                and self.top >= top_logprobs)

    # -- submitting

    def submit(self, prompt_ids: list[int], params: SamplingParams, key: str | None = None,
               stream: bool = False) -> Request:
        """Queue a request (thread-safe). ``key`` names it for its samples' seeds (default: its prompt); ``stream``:
        its tokens are wanted as they come (the host looks after every step while it runs)."""
        if self.runner is None:
            raise RuntimeError("the generation engine is closed")
        self.scheduler.check(prompt_ids, params, self.top)
        key = key if key is not None else hashlib.sha256(str(prompt_ids).encode()).hexdigest()[:16]
        request = Request(prompt_ids, params, key)
        request.streaming = stream
        self.scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request: its rows are freed at the next step."""
        request.cancelled = True
        with self.lock:
            self.lock.notify_all()

    # -- the loop

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        """Schedule (admit waiting sequences with one prefill; preempt over the token budget), run one decoding step
        of every running row, read back what an earlier step made."""
        # Layers that training compiled run eagerly in the runner's uncompiled passes (its own choice, see there).
        with fast_attention(self.model):
            self._step_once()

    @torch.inference_mode()
    def _step_once(self) -> None:
        """``step``, inside ``fast_attention``."""
        self.readback.drop_cancelled()
        admitted = self.scheduler.schedule(self.steps)
        if admitted:
            self._prefill(admitted)
        if self.scheduler.over_budget(self.steps):
            self._preempt()
        if self.running:
            self._run()
            self.readback.after_step(self.steps)

    @torch.inference_mode()
    def capture_graphs(self) -> int:
        """Record every step graph now (each width of rows and of columns, greedy and sampling) instead of when a
        width first occurs: a server's requests then never wait for a capture (a warm-up step and a recording of the
        whole model each). Returns the graphs held."""
        assert self.runner is not None, "the generation engine is closed"
        if not self.use_graph or self.running or self.thread is not None:
            return len(self.runner.graphs)
        with fast_attention(self.model):
            return self.runner.capture_graphs()

    def run(self) -> None:
        """Step until nothing is waiting or running (in the caller's thread)."""
        with fast_attention(self.model):  # once for all the steps (see ``_loop``)
            while self.has_work():
                self._step_once()

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

    def close(self) -> None:
        """Stop the loop, fail what still runs or waits, and give back the model reference, the cache, the graphs and
        their memory pool (then CUDA's cached blocks). A closed engine takes no requests."""
        self.stop()
        if self.runner is None:
            return
        if self.has_work():
            self.readback.fail(RuntimeError("the generation engine was closed"))
        device = self.runner.device
        self.runner.close()
        self.runner = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            clear_cublas_workspaces()
            torch.cuda.empty_cache()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopping and not self.has_work():
                    self.lock.wait()
                if self.stopping:
                    return
            try:
                # The attention stays switched while the loop has work, not set and restored every step: that took
                # ~80 µs of the engine's thread a step (development CPU), which it needs between its steps.
                with fast_attention(self.model):
                    while not self.stopping and self.has_work():
                        self._step_once()
            except BaseException as exc:  # noqa: BLE001 - every waiting caller is told, the loop goes on
                # must catch everything: a waiting caller would otherwise wait forever. Each re-raises it; the
                # traceback is logged here too, where no caller may be left to see it.
                log.exception("generation engine: a step failed; every waiting and running request fails with it")
                self.readback.fail(exc)

    # -- consuming

    def stream(self, request: Request, sample: int | None = None, cancel_on_close: bool = True,
               wait: bool = True) -> Iterator[tuple[int, int, float] | None]:
        """(sample index, token, log-probability) of ``request`` as they are made: of every sample, or of sample
        ``sample`` alone (the choices of one serve request share the request, one sample each). Drives the loop itself
        unless the background loop runs. Closing the iterator early cancels the request (unless not
        ``cancel_on_close``: whoever shares it decides). Not ``wait``, with the background loop running: yields None
        where it would wait for the next token (its caller looks again once a listener of the request is told,
        ``Request.listeners``)."""
        queues = request.events if sample is None else [request.events[sample]]

        def ended() -> bool:
            return request.done.is_set() if sample is None else request.samples[sample].finish_reason is not None

        completed = False
        try:
            while True:
                for queue in queues:
                    while queue:
                        yield queue.popleft()
                if ended():  # its last events were queued before it ended
                    for queue in queues:
                        while queue:
                            yield queue.popleft()
                    break
                if self.thread is None:
                    self.step()
                elif not wait:
                    yield None
                else:
                    with request.wake:
                        request.waiting += 1
                        try:
                            if not any(queues) and not ended():
                                request.wake.wait(timeout=1.0)
                        finally:
                            request.waiting -= 1
            completed = True
        finally:
            if not completed and cancel_on_close:
                self.cancel(request)
                if self.thread is None:
                    self.readback.drop_cancelled()
        if request.error is not None:
            raise request.error

    def generate(self, requests: Seq[tuple[list[int], SamplingParams, str | None]]) -> list[Request]:
        """Submit all, run until all are done, return them in their order (their samples hold tokens and
        log-probabilities). Known up front, they are admitted largest budget first: the rows still running at the
        end, alone, are then the short ones."""
        order = sorted(range(len(requests)), key=lambda i: -requests[i][1].row_tokens)  # stable: ties keep order
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

    def _prefill(self, groups: list[list[Sequence]]) -> None:
        """Each group's context into its first row (one padded forward), copied to the group's other rows; every
        sequence's settings into its row and its next token."""
        runner = self.runner
        assert runner is not None
        contexts = [group[0].context() for group in groups]
        hidden, logits = runner.prefill(contexts, [group[0].slot for group in groups])
        seqs, owner = [], []
        for i, group in enumerate(groups):
            request = group[0].request
            if request.params.prompt_logprobs is not None and request.prompt_logprobs is None:
                prompt = request.prompt_ids
                request.prompt_logprobs = runner.prompt_logprobs(hidden[i, : len(prompt) - 1], prompt[1:],
                                                                 request.params.prompt_logprobs)
            if len(group) > 1:
                runner.cache.copy_row(group[0].slot, [seq.slot for seq in group[1:]], len(contexts[i]))
            for seq in group:
                runner.load(seq, len(contexts[i]))
                seqs.append(seq)
                owner.append(i)
        sampling = any(seq.params.temperature > 0 for seq in seqs)
        top = self.top > 0 and any(seq.params.top_logprobs for seq in seqs)
        made = runner.start(seqs, logits[torch.tensor(owner, device=runner.device)], sampling, top)
        for seq, token, logprob, ended, tops in zip(seqs, *made):
            seq.since, seq.base, seq.epoch = self.steps, seq.delivered + 1, seq.epoch + 1
            self.readback.record(seq, [token], [logprob], ended, tops, self.steps)
        self.readback.force_pending(self.steps)

    def _run(self) -> None:
        """One decoding step of the rows in use, attending the columns in use."""
        assert self.runner is not None
        running, steps = self.running, self.steps
        sampling = any(seq.params.temperature > 0 for seq in running.values())
        top = self.top > 0 and any(seq.params.top_logprobs for seq in running.values())
        rows = self.runner.width(max(running) + 1)
        # each running row writes its offset plus the tokens it has made
        columns = self.runner.window(max(s.offset + s.base - s.since for s in running.values()) + steps)
        self.runner.run_step(sampling, rows, columns, top)
        self.steps += 1
        self.busy_rows += len(running)
        self.row_steps += rows
        self.column_steps += columns

    def _preempt(self) -> None:
        """Read every token the rows have made (ended rows finish), then free the newest rows until the next step
        fits the token budget."""
        self.readback.sync(self.steps)
        while self.scheduler.over_budget(self.steps):
            self.scheduler.preempt(self.scheduler.newest())


class EngineHolder:
    """The engine of one owner (a command, a trainer, a loaded model): ``get`` hands out an engine for the model with
    at least the rows and the row length a call needs, the one it holds while that one is large enough (a call
    needing fewer rows reuses it: a step runs only the rows in use), else a larger one (the old one closed first, its
    memory given back); ``close`` closes it. Row lengths are rounded up to a multiple of 256, so that nearby lengths
    share one engine. ``kv_cache`` (``generation.kv_cache``) caps the rows to what its budget holds at the row
    length; the requests beyond them wait for a free row.

    ``fold``: the engine samples a model that carries a LoRA adapter from an inference copy with the adapter folded
    in (``folded.py``), made at the first ``get`` and refreshed at each, so every call samples the weights the model
    has then (a trainer's optimizer steps between calls); the copy goes with ``close``."""

    def __init__(self, eos_token_id: int, use_graph: bool | None = None, top_logprobs: int = 0,
                 kv_cache: str | None = None, fold: bool = False) -> None:
        self.eos, self.use_graph, self.top, self.kv_cache = eos_token_id, use_graph, top_logprobs, kv_cache
        self.engine: GenerationEngine | None = None
        self.fold = fold
        self.folded: tuple[object, FoldedLora | None] | None = None  # (the model it was made for, its copy or None)

    def sampled(self, model):
        """What the engine runs for ``model``: its folded copy, refreshed, where ``fold`` and it has an adapter to
        fold; else ``model``."""
        if not self.fold:
            return model
        if self.folded is None or self.folded[0] is not model:
            self.close()
            self.folded = (model, fold_adapter(model))
            return model if self.folded[1] is None else self.folded[1].model
        copy = self.folded[1]
        if copy is None:
            return model
        copy.refresh()
        return copy.model

    def get(self, model, slots: int, max_len: int, least: int = 1) -> GenerationEngine:
        """An engine with ``slots`` rows of ``max_len`` tokens, or as many rows as the KV budget holds (at least
        ``least``), for ``model`` (or its folded copy, see ``fold``)."""
        model = self.sampled(model)
        max_len = -(-max_len // 256) * 256
        old = self.engine
        slots = min(slots, self.room(model, max_len, least))
        if old is not None and old.model is model and old.fits(slots, max_len):
            return old
        if old is not None:
            if old.model is model:  # never smaller than before: calls alternating between two sizes keep one engine
                slots, max_len = max(slots, old.slots), max(max_len, old.max_len)
                slots = min(slots, self.room(model, max_len, least))
            old.close()
            self.engine = None
        self.engine = GenerationEngine(model, self.eos, slots=slots, max_len=max_len, use_graph=self.use_graph,
                                       top_logprobs=self.top)
        return self.engine

    def room(self, model, max_len: int, least: int) -> int:
        """Rows of ``max_len`` tokens the KV budget holds for ``model`` (no cap without a budget)."""
        if self.kv_cache is None:
            return 1 << 62
        old = self.engine
        # a share is of the memory free without this holder's cache, which a larger engine would replace
        held = old.slots * old.max_len if old is not None and old.runner is not None else 0
        return budget_rows(model, max_len, self.kv_cache, least, held)

    def close(self) -> None:
        """Close the engine held, if any, and let go of the folded copy (the holder stays usable: a later ``get``
        makes new ones)."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.folded = None

    def __enter__(self) -> EngineHolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def budget_rows(model, max_len: int, kv_cache: str, least: int = 1, held_tokens: int = 0) -> int:
    """Rows of ``max_len`` tokens a KV budget (``generation.kv_cache``) holds for ``model``, the ``held_tokens`` of a
    cache it would replace counted as free; an error below ``least``."""
    base = base_model(model)
    weight = base.get_input_embeddings().weight
    per_token = token_bytes(base.config, cache_dtype(weight))
    return rows_within(budget_bytes(kv_cache, weight.device, held_tokens * per_token), max_len, per_token, least)
