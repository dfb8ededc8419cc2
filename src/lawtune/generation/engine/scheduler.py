"""The scheduler: which sequences run in which rows, and when the waiting ones are let in.

* **Slots.** The cache holds ``slots`` sequences, one row each. When a sequence ends, its row takes the next waiting
  sequence: new prompts are prefilled (one padded batch) between two decoding steps. A new sequence takes the lowest
  free row (a heap), which keeps the rows a step runs few (see the runner's "Only the rows in use").
* **Admission.** A prefill is a whole forward pass of its own (on a GPU mostly kernel launches, whatever its size),
  so with rows running it waits until ``1/ADMIT_FRACTION`` of the rows are free or ``ADMIT_WAIT`` steps have passed:
  a free row idles a few steps instead of every step paying a prefill.
* **A token budget and preemption.** The rows together may hold ``max_tokens`` cache columns (default: all of
  them, ``slots * max_len``, when nothing is ever preempted). Each running row counts its prompt and its tokens so
  far; when the next step would take the rows over the budget, the newest admitted row is preempted: its row is
  freed and its sequence goes back to the front of the queue with its tokens, to be recomputed (one prefill of the
  prompt and its tokens) and continue where it stopped, with the same step numbering, so its tokens are the ones an
  unpreempted run makes. Nothing is dropped; a request that cannot fit even alone is refused at submit.
"""

from __future__ import annotations

import collections
import heapq
import threading

from .sequence import MAX_STOP_TOKENS, Request, SamplingParams, Sequence

# Admission of waiting sequences with rows running: once 1/ADMIT_FRACTION of the rows are free, or after ADMIT_WAIT
# steps (see the module docstring).
ADMIT_FRACTION = 16
ADMIT_WAIT = 8


class Scheduler:
    """The waiting queue (groups of sequences that share one prefill: a request's ``n`` samples, or one preempted
    sequence), the running rows, the free rows, and the token budget."""

    def __init__(self, slots: int, max_len: int, max_tokens: int | None, max_prefill_tokens: int) -> None:
        self.slots, self.max_len = slots, max_len
        self.max_tokens = slots * max_len if max_tokens is None else max_tokens
        # Below the cache's size the rows' columns are counted before every step; at it nothing can run over.
        self.limited = self.max_tokens < slots * max_len
        self.max_prefill_tokens = max_prefill_tokens
        self.free = list(range(slots))  # a heap: new sequences take the lowest free row
        self.running: dict[int, Sequence] = {}  # by row
        self.waiting: collections.deque[list[Sequence]] = collections.deque()
        self.lock = threading.Condition()  # guards waiting; the engine's loop waits on it when idle
        self.since_admit = 0
        self.admissions = 0
        self.preemptions = 0

    def check(self, prompt_ids: list[int], params: SamplingParams, top_logprobs: int) -> None:
        """Refuse (ValueError) a request that can never run here."""
        need = len(prompt_ids) + params.row_tokens
        if need > self.max_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens and {params.row_tokens} new tokens do not fit "
                             f"in a slot of {self.max_len} tokens")
        if params.n > self.slots:
            raise ValueError(f"n={params.n} samples need more than the engine's {self.slots} slots")
        if max(need, params.n * (len(prompt_ids) + 1)) > self.max_tokens:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens, {params.row_tokens} new tokens and n={params.n} "
                             f"do not fit in the engine's budget of {self.max_tokens} tokens (max_tokens)")
        if not prompt_ids:
            raise ValueError("an empty prompt")
        if params.top_logprobs > top_logprobs:
            raise ValueError(f"top_logprobs={params.top_logprobs}: this engine keeps at most {top_logprobs}")
        if len(params.stop_token_ids) > MAX_STOP_TOKENS:
            raise ValueError(f"at most {MAX_STOP_TOKENS} stop tokens, got {len(params.stop_token_ids)}")

    def add(self, request: Request) -> None:
        with self.lock:
            self.waiting.append([Sequence(request, sample) for sample in request.samples])
            self.lock.notify_all()

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def used(self, steps: int) -> int:
        """Cache columns the running rows hold after the next step."""
        return sum(s.offset + s.base - s.since for s in self.running.values()) + steps * len(self.running)

    def schedule(self, steps: int) -> list[list[Sequence]]:
        """The groups to prefill now (by the admission rule of the module docstring), each sequence given its row:
        a group's first row before any group's others, lowest first."""
        self.since_admit += 1
        enough = len(self.free) >= max(1, self.slots // ADMIT_FRACTION) or self.since_admit >= ADMIT_WAIT
        if self.running and not enough:
            return []
        batch: list[list[Sequence]] = []
        room = self.max_tokens - self.used(steps) if self.limited else 0
        with self.lock:
            free, tokens = len(self.free), 0
            while self.waiting and len(self.waiting[0]) <= free:
                group = self.waiting[0]
                length = group[0].offset + group[0].delivered
                if batch and tokens + length > self.max_prefill_tokens:
                    break
                if self.limited and len(group) * (length + 1) > room:
                    break
                self.waiting.popleft()
                batch.append(group)
                free -= len(group)
                tokens += length
                room -= len(group) * (length + 1)
        for seq in [group[0] for group in batch] + [seq for group in batch for seq in group[1:]]:
            seq.slot = heapq.heappop(self.free)
            seq.order = self.admissions
            self.admissions += 1
            self.running[seq.slot] = seq
        if batch:
            self.since_admit = 0
        return batch

    def over_budget(self, steps: int) -> bool:
        """Whether the next step takes the rows over ``max_tokens`` (never where the budget is the whole cache)."""
        return self.limited and len(self.running) > 1 and self.used(steps) > self.max_tokens

    def newest(self) -> Sequence:
        return max(self.running.values(), key=lambda s: s.order)

    def preempt(self, seq: Sequence) -> None:
        """Free the row of ``seq`` (every token it made read by the host) and queue it first, to be recomputed."""
        self.finish(seq)
        self.preemptions += 1
        with self.lock:
            self.waiting.appendleft([seq])

    def finish(self, seq: Sequence) -> None:
        del self.running[seq.slot]
        heapq.heappush(self.free, seq.slot)
        seq.slot = -1

    def take_cancelled(self) -> tuple[list[Sequence], list[Sequence]]:
        """The running and the waiting sequences of cancelled requests; the waiting ones leave the queue."""
        running = [seq for seq in self.running.values() if seq.request.cancelled]
        with self.lock:
            gone = [group for group in self.waiting if group[0].request.cancelled]
            for group in gone:
                self.waiting.remove(group)
        return running, [seq for group in gone for seq in group]

    def clear(self) -> tuple[list[Sequence], list[Sequence]]:
        """Empty the rows and the queue (a failed step); returns what ran and what waited."""
        with self.lock:
            waiting = [seq for group in self.waiting for seq in group]
            self.waiting.clear()
        running = list(self.running.values())
        self.running.clear()
        self.free = list(range(self.slots))
        for seq in running:
            seq.slot = -1
        return running, waiting
