"""Training batches: token-budget planning, the collators, and the real-token count.

* ``batch_tokens``: micro-batches by token budget instead of a fixed number of examples. JEC-QA examples
  are short (median ~160 tokens), so two sequences a step leave the GPU mostly idle. With ``packing``
  the examples of a micro-batch are concatenated into one row of exactly ``batch_tokens`` tokens (one
  shape for every step, so compiled kernels are built once); without it, examples of similar length are
  grouped and right-padded, and the attention mask is left out because right padding under causal
  attention never reaches a real token.
* ``sparse_logits``: the batch says where the LM head must run (``SparseLogitsCollator``; the loss is in
  ``loss.py``).
* Tokens/s are counted on the CPU (``CountingCollator``), so that no step waits for the GPU.

Measured in ``bench/train_throughput.py``; numbers in ``bench/README.md``.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError

# ----------------------------------------------------------------------------- token-budget batches


def plan_batches(lengths: list[int], batch_tokens: int, packing: bool, seed: int = 0,
                 pad_multiple: int = 8) -> list[list[int]]:
    """Group example indices into micro-batches of at most ``batch_tokens`` tokens.

    packing: best-fit decreasing into bins of ``batch_tokens`` (few half-empty packs).
    otherwise: examples sorted by length (ties broken at random) and cut into batches whose padded size,
    rows x longest row rounded up to ``pad_multiple``, stays within the budget.
    The order of the batches does not matter: the Trainer's sampler shuffles them every epoch.
    """
    too_long = [n for n in lengths if n > batch_tokens]
    if too_long:
        raise UsageError(f"train.batch_tokens={batch_tokens} is smaller than an example of {max(too_long)} tokens; "
                         f"set it to at least data.max_length")
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    if packing:
        bins: list[list[int]] = []
        free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
        for i in reversed(order):  # longest first
            n = lengths[i]
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                left, b = free.pop(k)
                bins[b].append(i)
                bisect.insort(free, (left - n, b))
            else:
                bins.append([i])
                bisect.insort(free, (batch_tokens - n, len(bins) - 1))
        return bins
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the newest example is the longest of its batch
        width = -(-lengths[i] // pad_multiple) * pad_multiple
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class PlannedBatches(torch.utils.data.Dataset):
    """A dataset whose items are whole micro-batches (lists of encoded examples); use batch size 1."""

    def __init__(self, features: list[dict], plan: list[list[int]]):
        self.features, self.plan = features, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.features[j] for j in self.plan[i]]


def examples_of(items: list) -> list[dict]:
    """Items from the DataLoader are examples, or planned batches (lists of examples)."""
    out: list[dict] = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


class TokenBudgetCollator:
    """Collates planned micro-batches: one packed row (position ids restart per example) or right-padded rows.

    Neither form carries an attention mask: packed rows are separated through their position ids, and
    right padding under causal attention is never attended to by a real token.
    """

    def __init__(self, pad_token_id: int, packing: bool, pack_length: int | None = None, pad_multiple: int = 8):
        from transformers import DataCollatorWithFlattening

        self.pad_token_id, self.packing, self.pack_length, self.pad_multiple = pad_token_id, packing, pack_length, pad_multiple
        # transformers' own padding-free packing (labels of each example's first token ignored, positions
        # restarting at 0); lawtune only pads the row to one fixed length, so compiled kernels see one shape.
        self.flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        examples = examples_of(items)
        if self.packing:
            batch = self.flatten([{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in examples])
            batch = {k: batch[k] for k in ("input_ids", "labels", "position_ids")}
            tail = (self.pack_length or 0) - batch["input_ids"].shape[1]
            if tail > 0:  # one more "example" of padding, on its own positions, with no loss
                batch["input_ids"] = F.pad(batch["input_ids"], (0, tail), value=self.pad_token_id)
                batch["labels"] = F.pad(batch["labels"], (0, tail), value=-100)
                batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(tail).unsqueeze(0)], dim=1)
            return batch
        width = max(len(ex["input_ids"]) for ex in examples)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        ids_t = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels_t = torch.full((len(examples), width), -100, dtype=torch.long)
        for row, ex in enumerate(examples):
            n = len(ex["input_ids"])
            ids_t[row, :n] = torch.tensor(ex["input_ids"])
            labels_t[row, :n] = torch.tensor(ex["labels"])
        return {"input_ids": ids_t, "labels": labels_t}


def real_tokens(items: list) -> int:
    """Non-padding tokens in what a collator is given (examples or planned batches)."""
    return sum(len(ex["input_ids"]) for ex in examples_of(items))


COUNT_KEY = "lawtune_counted"


class CountingCollator:
    """Marks every batch with its real tokens and examples, counted on the CPU, under ``COUNT_KEY``; the trainer
    takes the mark off and adds it to ``tokens`` and ``examples`` when it trains the batch. Tokens/s without a GPU
    sync after every micro-step (transformers' own count reads a GPU tensor back each time, which stalls the CPU
    until the GPU is idle), and examples/s where a micro-batch is a packed row of many examples. Counted when
    trained, not when collated: the data loader collates ahead, and a resumed run would count such a batch twice.
    """

    def __init__(self, inner):
        self.inner, self.tokens, self.examples = inner, 0, 0

    def __call__(self, items: list):
        batch = self.inner(items)
        batch[COUNT_KEY] = (real_tokens(items), len(examples_of(items)))
        return batch

    def add(self, counted: tuple[int, int]) -> None:
        self.tokens += counted[0]
        self.examples += counted[1]


class SparseLogitsCollator:
    """Wraps a collator: keeps only the label positions, and tells the model where to compute logits.

    Position p's logits predict label p + 1. The batch gets ``logits_to_keep`` (the positions p, shared by
    all rows) and ``labels`` reduced to the matching targets, shape (rows, 1 + positions): the model's LM head
    then runs on those positions alone and ``sparse_logits_loss`` scores them.
    """

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, items: list) -> dict[str, torch.Tensor]:
        batch = self.inner(items)
        target = batch["labels"][:, 1:]
        keep = (target != -100).any(0).nonzero().flatten()
        if keep.numel() == 0:  # no label at all: one position whose targets are all ignored
            keep = torch.zeros(1, dtype=torch.long)
        # A leading ignored column: transformers counts a causal LM's labels from column 1 on (it expects
        # unshifted labels), and older releases count every column; with it both counts are the true one.
        ignored = torch.full((target.shape[0], 1), -100, dtype=target.dtype)
        batch["labels"] = torch.cat([ignored, target[:, keep]], dim=1)
        batch["logits_to_keep"] = keep
        return batch


def make_collator(tokenizer, tcfg, max_length: int):
    """The training collator for a TrainConfig (see the module docstring for each option)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    collator: Callable[[list[dict]], dict]
    if tcfg.batch_tokens:
        collator = TokenBudgetCollator(tokenizer.pad_token_id, tcfg.packing,
                                       pack_length=tcfg.batch_tokens if tcfg.packing else None)
    elif tcfg.packing:
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return SparseLogitsCollator(collator) if tcfg.sparse_logits else collator
