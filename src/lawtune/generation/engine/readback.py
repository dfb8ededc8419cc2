"""Reading the rows back: what the device made reaches the samples, a few steps behind the GPU, and a sample's end is
decided here (finished, or a forced answer continued on its row).

* **The host reads behind the GPU.** After queueing step k the host takes what step k-2 made (copied to pinned
  memory behind it, ``LOOK_LAG``), while the GPU runs steps k-1 and k: a streaming caller's per-step work (reading
  its tokens, decoding text, waking its thread) overlaps the GPU instead of idling it. With a synchronous read
  after every step one stream through ``ask`` ran at 157 tokens/s, against the static decoder's 204 for one row
  (issue 16). Without a streaming caller the host reads every ``CHECK_EVERY`` steps, or when a row's budget runs out.
* **A forced answer on the live row.** A reasoning sample that reaches its thinking budget without ending
  (``SamplingParams.forced_answer``) is not finished when the host reads its end: the closing of its think block is
  appended to its row (one small prefill at its current position, one for all the rows of a reading) and it decodes on for its answer reserve. No
  second prefill of the prompt, no detokenising and retokenising of the trace.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Request, Sequence

# Without a streaming caller the host looks at the rows every this many steps (or sooner, when a row's budget
# runs out): a row that ends on its end token waits at most this many steps for its successor, and the GPU is
# not held up by the host after every step.
CHECK_EVERY = 8
# The host takes a reading of the rows this many steps after it: with two steps queued behind it, a pause of the
# host's thread (another thread holding the interpreter, a slow client) shorter than a step does not idle the GPU.
LOOK_LAG = 2


@dataclass
class Look:
    """A reading of the rows after step ``step``: each running sequence, its epoch and its token count then, and the
    table (``DeviceRows.reading``), with the event that says it reached the host."""

    step: int
    rows: list[tuple[Sequence, int, int]]
    width: int
    table: torch.Tensor
    event: torch.cuda.Event | None
    top: int = 0
    """Likeliest tokens per column in the table after alive and length (ids, then log-probabilities); 0 = none."""


def notify(request: Request) -> None:
    """Wake the request's waiting callers and tell its listeners (and mark it done once every sample has
    finished)."""
    if request.finished:
        request.done.set()
    for listener in request.listeners:
        listener(request)
    # A caller counts itself in ``waiting`` under the lock before it looks at the events, which were queued before
    # this: one that is not counted yet will see them and not wait.
    if request.waiting:
        with request.wake:
            request.wake.notify_all()


class ReadBack:
    """The readings on their way to the host, and what taking one does to the samples (see the module docstring)."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, eos_token_id: int, top_logprobs: int) -> None:
        self.runner, self.scheduler, self.eos, self.top = runner, scheduler, eos_token_id, top_logprobs
        self.pending: collections.deque[Look] = collections.deque()
        self.since_look = 0
        self.forcing: list[Sequence] = []  # out of thinking budget, waiting for force_pending

    def after_step(self, steps: int) -> None:
        """After step ``steps``: take the readings ``LOOK_LAG`` steps old; start one of this step when a streaming
        caller waits, a row's budget runs out, a request was cancelled or ``CHECK_EVERY`` steps have passed."""
        self.since_look += 1
        while self.pending and self.pending[0].step <= steps - LOOK_LAG:
            self.take(self.pending.popleft(), steps)
        running = self.scheduler.running
        if not running:
            self.pending.clear()  # readings of rows that are gone
            return
        budget_out = any(s.base + steps - s.since >= s.budget for s in running.values())
        streaming = any(seq.request.streaming for seq in running.values())
        cancelled = any(seq.request.cancelled for seq in running.values())
        if streaming or budget_out or cancelled or self.since_look >= CHECK_EVERY:
            self.since_look = 0
            self.pending.append(self.look(steps))

    def sync(self, steps: int) -> None:
        """Read everything the rows have made (waits for the device): every running sequence is then read up to
        its last token, and those that ended are finished."""
        while self.pending:
            self.take(self.pending.popleft(), steps)
        if self.scheduler.running:
            self.take(self.look(steps), steps)

    def look(self, steps: int) -> Look:
        """Start copying what the running rows made since the host's last reading to the host, behind the step
        just queued: per row the ``width`` columns before its step count (the device's ``step_no``, which the host's
        count equals), which hold every token the host has not seen. Nothing travels to the device, so the host does
        not wait for the step (a copy from host memory would)."""
        rows = [(seq, seq.epoch, seq.base + steps - seq.since) for seq in self.scheduler.running.values()]
        width = max(max(count - seq.delivered for seq, _, count in rows), 1)
        top = self.top if any(seq.params.top_logprobs for seq, _, _ in rows) else 0
        table = self.runner.rows.reading(width, top, max(seq.slot for seq, _, _ in rows) + 1)
        event = None
        if table.is_cuda:
            host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            host.copy_(table, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            table = host
        return Look(steps, rows, width, table, event, top)

    def take(self, look: Look, steps: int) -> None:
        """Record a reading: new tokens, and the rows that ended. A sequence whose row was freed or set anew since
        (cancelled, preempted, a forced answer's closing) is skipped."""
        if look.event is not None:
            look.event.synchronize()
        table, w, running = look.table.tolist(), look.width, self.scheduler.running
        for seq, epoch, count in look.rows:
            if seq.epoch != epoch or running.get(seq.slot) is not seq:
                continue
            row = table[seq.slot]
            alive = row[2 * w] > 0
            end = count if alive else int(row[2 * w + 1])
            # the index in the reading of a column c is c - count + w
            first, last = seq.delivered - count + w, end - count + w
            tops = None
            if look.top:
                k, ids_at, lps_at = look.top, 2 * w + 2, 2 * w + 2 + w * look.top
                tops = [list(zip((int(t) for t in row[ids_at + c * k: ids_at + (c + 1) * k]),
                                 row[lps_at + c * k: lps_at + (c + 1) * k])) for c in range(first, last)]
            self.record(seq, [int(t) for t in row[first:last]], row[w + first: w + last], not alive, tops, steps)
        self.force_pending(steps)

    def record(self, seq: Sequence, tokens: list[int], logprobs: list[float], ended: bool,
               tops: list[list[tuple[int, float]]] | None, steps: int) -> None:
        """New tokens of ``seq``; ``ended``: the device saw it end (the last token ends it); ``tops``: the likeliest
        tokens of each one's step, where the request asked for them."""
        request, sample, params = seq.request, seq.sample, seq.params
        sample.tokens.extend(tokens)
        sample.logprobs.extend(logprobs)
        if params.top_logprobs:
            sample.top_logprobs.extend(top[: params.top_logprobs] for top in tops or [[]] * len(tokens))
        index = sample.index
        request.events[index].extend([(index, t, lp) for t, lp in zip(tokens, logprobs)])
        if ended:
            last = sample.tokens[-1]
            stops = ((last == self.eos and not params.ignore_eos) or last in params.stop_token_ids) \
                and len(sample.tokens) >= params.min_tokens
            if not stops and params.forced_answer is not None and sample.forced_at is None:
                self.forcing.append(seq)  # finished or continued by force_pending, once the reading is taken
            else:
                self.finish(seq, "stop" if stops else "length")
        if tokens or ended:
            notify(request)

    def drop_cancelled(self) -> None:
        """Free the rows of cancelled requests and drop their waiting sequences; their callers are told."""
        running, waiting = self.scheduler.take_cancelled()
        for seq in running:
            self.finish(seq, "cancelled")
        for seq in waiting:
            seq.sample.finish_reason = "cancelled"
        for request in {id(seq.request): seq.request for seq in running + waiting}.values():
            notify(request)

    def fail(self, exc: BaseException) -> None:
        """Every running and waiting request fails with ``exc`` (a failed step, or the engine closed)."""
        running, waiting = self.scheduler.clear()
        self.pending.clear()
        for request in {id(seq.request): seq.request for seq in running + waiting}.values():
            request.error = exc
            for sample in request.samples:
                sample.finish_reason = sample.finish_reason or "error"
            notify(request)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        seq.sample.finish_reason = reason

    def force_pending(self, steps: int) -> None:
        """The forced answers of the samples read out of thinking budget (every token read): each one's closing
        tokens after its last token, then its next token. Closings of one length go in one small prefill, so a batch
        that ran out of budget together costs one forward, not one a row (measured on one H200: one a row took eval's
        256 forced answers from 7.5 s to 13.8 s, bench/README.md). A sample without a closing that fits finishes."""
        seqs, self.forcing = self.forcing, []
        groups: dict[int, list[tuple[Sequence, list[int]]]] = {}
        for seq in seqs:
            closing = list(seq.params.forced_answer(list(seq.sample.tokens)))  # type: ignore[misc]
            if not seq.params.answer_reserve or len(closing) > seq.params.closing_tokens:
                self.finish(seq, "length")
                notify(seq.request)
            else:
                groups.setdefault(len(closing), []).append((seq, closing))
        runner, d = self.runner, self.runner.device
        for group in groups.values():
            ats = [seq.offset + seq.delivered - 1 for seq, _ in group]  # the column of each last token
            for seq, closing in group:
                seq.force(closing)
            logits = runner.extend([seq.slot for seq, _ in group],
                                   [[seq.sample.tokens[-1], *closing] for seq, closing in group], ats)
            index = torch.tensor([seq.slot for seq, _ in group], device=d)
            runner.rows.budget[index] = torch.tensor([seq.budget for seq, _ in group], device=d)
            runner.rows.step_no[index] = torch.tensor([seq.delivered for seq, _ in group], device=d)
            runner.cache.write_at[index] = torch.tensor([at + 1 + len(c) for at, (_, c) in zip(ats, group)], device=d)
            seqs = [seq for seq, _ in group]
            sampling = any(seq.params.temperature > 0 for seq in seqs)
            top = self.top > 0 and any(seq.params.top_logprobs for seq in seqs)
            for seq, token, logprob, ended, tops in zip(seqs, *runner.start(seqs, logits, sampling, top)):
                seq.since, seq.base, seq.epoch = steps, seq.delivered + 1, seq.epoch + 1
                self.record(seq, [token], [logprob], ended, tops, steps)
