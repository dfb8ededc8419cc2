"""The sampler's bisection for the rows that need it, one Triton program a row (see ``sampler``'s docstring).

Why a kernel of its own (issue 30, one H200): ``sampler.gumbel_first`` settles most rows of a sampled step in one pass,
and the rest need the kept set's threshold, 31 halvings each reading the row's probabilities. In torch that is 31
passes over every row (a recorded step cannot pick rows by a value it computes), which cost 9.6 ms of a 512-row step;
here a program whose row passed returns after one load, and a program whose row did not runs the halvings over its
own row (``nucleus_threshold``'s arithmetic, the ties cut by token id as ``nucleus`` cuts them) and picks its kept
token of the largest noisy logit. Launched plainly, so a CUDA graph records it with the step.

Measured on one H200 (bench/README.md, twenty-second session): a sampled choice of 512 rows took 3.2 ms, against
9.6 with torch's bisection over every row in an earlier call of the same day; by subtraction of the first pass and
the greedy part, about half of it is this kernel serving the 16-30 rows the first pass leaves, each one program
through 33 dependent passes. A 16-way search (8 passes, 15 values
tested a pass) was 0.59 ms slower and was not kept.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA builds only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

# Probabilities a loop turn reads (a row of the 1.5B model's 151,936 tokens is 38 turns a pass).
BLOCK = 4096


def usable(probs: torch.Tensor) -> bool:
    """Whether the kernel can serve these probabilities: Triton present, and a GPU's tensors (or Triton's
    interpreter)."""
    return triton is not None and (probs.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def kept_pick(probs: torch.Tensor, noisy: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
              kept: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Each row's sampled token: ``first`` where ``kept``, else the kept token of the largest ``noisy`` logit, the kept
    set as ``sampler.nucleus`` finds it from ``probs`` (rows, vocab), float32."""
    rows, vocab = probs.shape
    token = first.clone()
    if rows:
        _kept_pick_kernel[(rows,)](probs, noisy, top_p.float().contiguous(), top_k.long().contiguous(),
                                   kept.to(torch.int8), token, vocab, probs.stride(0), noisy.stride(0),
                                   BLOCK=BLOCK, num_warps=8)
    return token


if triton is not None:

    @triton.jit
    def _pass_stats(row_ptr, vocab, cut, BLOCK: tl.constexpr):
        """The mass and the count of the row's probabilities whose bits are above ``cut``. Summed lane by lane over
        the pass and across lanes once at its end: a sum across the program every turn made each turn wait for it."""
        mass = tl.zeros([BLOCK], dtype=tl.float32)
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offsets, mask=offsets < vocab, other=0.0)
            above = x.to(tl.int32, bitcast=True) > cut
            mass += tl.where(above, x, 0.0)
            count += above.to(tl.int32)
        return tl.sum(mass, 0), tl.sum(count, 0)

    @triton.jit
    def _kept_pick_kernel(probs_ptr, noisy_ptr, top_p_ptr, top_k_ptr, kept_ptr, token_ptr, vocab, stride_p, stride_n,
                          BLOCK: tl.constexpr):
        row = tl.program_id(0)
        if tl.load(kept_ptr + row) == 0:
            p_row = probs_ptr + row.to(tl.int64) * stride_p
            n_row = noisy_ptr + row.to(tl.int64) * stride_n
            top_k = tl.load(top_k_ptr + row)
            k = tl.where(top_k > 0, top_k, vocab)
            top_p = tl.load(top_p_ptr + row)
            # top-p 1 bounds no mass (a sum of probabilities may round above 1), as in nucleus_threshold
            bound = tl.where(top_p >= 1.0, float("inf"), top_p)
            largest = tl.zeros([BLOCK], dtype=tl.int32)
            for start in range(0, vocab, BLOCK):
                offsets = start + tl.arange(0, BLOCK)
                x = tl.load(p_row + offsets, mask=offsets < vocab, other=0.0)
                largest = tl.maximum(largest, x.to(tl.int32, bitcast=True))
            hi = tl.max(largest, 0)
            total, positive = _pass_stats(p_row, vocab, 0, BLOCK)
            keep_all = ((total <= bound) | (bound >= 1.0)) & (positive <= k)
            lo = 0  # as in nucleus_threshold: lo's value is not kept as the first of its ties, hi's is
            for _ in range(31):
                mid = lo + (hi - lo) // 2
                mass, count = _pass_stats(p_row, vocab, mid, BLOCK)
                ok = (mass <= bound) & (count < k)
                hi = tl.where(ok, mid, hi)
                lo = tl.where(ok, lo, mid)
            threshold = tl.where(keep_all, 0, hi)
            mass, count = _pass_stats(p_row, vocab, threshold, BLOCK)
            value = tl.maximum(threshold.to(tl.float32, bitcast=True), 1e-38)
            by_mass = tl.minimum(tl.floor((bound - mass) / value), vocab * 1.0).to(tl.int64) + 1
            allowed = tl.minimum(by_mass, k - count)
            best = float("-inf")
            best_at = 0
            ties = 0
            for start in range(0, vocab, BLOCK):
                offsets = start + tl.arange(0, BLOCK)
                inside = offsets < vocab
                bits = tl.load(p_row + offsets, mask=inside, other=0.0).to(tl.int32, bitcast=True)
                tied = inside & (bits == threshold)
                keep = inside & ((bits > threshold) | (tied & (ties + tl.cumsum(tied.to(tl.int32), 0) <= allowed)))
                scores = tl.where(keep, tl.load(n_row + offsets, mask=inside, other=float("-inf")), float("-inf"))
                top = tl.max(scores, 0)
                better = top > best  # strictly: the first of equal scores wins, as argmax does
                best_at = tl.where(better, start + tl.argmax(scores, 0, tie_break_left=True), best_at)
                best = tl.where(better, top, best)
                ties += tl.sum(tied.to(tl.int32), 0)
            tl.store(token_ptr + row, tl.cast(best_at, tl.int64))
