"""The sampler's nucleus threshold by a many-way search on a GPU (a Triton kernel): 8 passes over the probabilities
instead of the bisection's 31.

Why a kernel (issue 30, one H200, the 1.5B architecture): with the KV budget's 512 rows a sampled step cost about
twice a greedy one (512 R1-like requests: 15,078 sampled against 32,347 greedy useful tokens/s, bench/README.md). The
bisection of ``sampler.bisect`` reads the 512 x 151,936 float32 probabilities once a halving, 31 times a
step. Here a pass tests ``CANDIDATES`` values of the search interval at once (the mass and the count of tokens above
each), so the interval shrinks 17-fold a pass and 8 passes pin the 31 bits of a float32.

The rule is the bisection's: the threshold is the smallest float32 (as its bits) whose mass above is at most top-p
with fewer than top-k tokens above it. Only the order of the mass sums differs (a program sums its chunk, the chunks
are summed after), which can move a value that sits exactly on the top-p boundary by a rounding in the last place,
as the bisection's own sums can against the full sort's cumulative sum.
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA builds only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

CANDIDATES = 16  # values tested a pass: 17 sub-intervals
PASSES = 8  # 17 ** 8 > 2 ** 31: the interval of float32 bits shrinks to one value
CHUNK = 8192  # vocabulary columns a program reads
BLOCK = 512  # columns a loop turn reads (BLOCK x CANDIDATES comparisons in registers)


def available(device: torch.device) -> bool:
    """Whether the search runs on ``device``: Triton and a GPU, or Triton's interpreter (tests on a CPU)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _above_kernel(bits_ptr, cand_ptr, mass_ptr, count_ptr, vocab, stride_row, chunks,
                      CHUNK: tl.constexpr, BLOCK: tl.constexpr, M: tl.constexpr):
        row, chunk = tl.program_id(0), tl.program_id(1)
        m = tl.arange(0, M)
        cand = tl.load(cand_ptr + row * M + m)
        mass = tl.zeros([M], dtype=tl.float32)
        count = tl.zeros([M], dtype=tl.int32)
        for off in range(0, CHUNK, BLOCK):
            cols = chunk * CHUNK + off + tl.arange(0, BLOCK)
            bits = tl.load(bits_ptr + row * stride_row + cols, mask=cols < vocab, other=0)
            prob = bits.to(tl.float32, bitcast=True)
            above = bits[:, None] > cand[None, :]
            mass += tl.sum(tl.where(above, prob[:, None], 0.0), axis=0)
            count += tl.sum(above.to(tl.int32), axis=0)
        out = (row * chunks + chunk) * M + m
        tl.store(mass_ptr + out, mass)
        tl.store(count_ptr + out, count)


def search(probs: torch.Tensor, top_p: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The smallest float32 bits (rows, 1) int64 whose mass above is at most ``top_p`` (rows,) with fewer than ``k``
    (rows, 1) tokens above, for contiguous float32 ``probs`` (rows, vocab); device work only (a CUDA graph records
    it)."""
    rows, vocab = probs.shape
    bits = probs.view(torch.int32)
    p = top_p[:, None]
    lo = torch.zeros(rows, 1, dtype=torch.long, device=probs.device)  # not kept as first of its ties; hi is
    hi = bits.max(-1, keepdim=True).values.long()
    steps = torch.arange(1, CANDIDATES + 1, device=probs.device)[None, :]
    chunks = triton.cdiv(vocab, CHUNK)
    mass = torch.empty(rows, chunks, CANDIDATES, dtype=torch.float32, device=probs.device)
    count = torch.empty(rows, chunks, CANDIDATES, dtype=torch.int32, device=probs.device)
    for _ in range(PASSES):
        cand = lo + (hi - lo) * steps // (CANDIDATES + 1)  # ascending, within [lo, hi)
        _above_kernel[(rows, chunks)](bits, cand.int().contiguous(), mass, count, vocab, bits.stride(0), chunks,
                                      CHUNK=CHUNK, BLOCK=BLOCK, M=CANDIDATES, num_warps=8)
        ok = (mass.sum(1) <= p) & (count.sum(1) < k)  # monotone in the value: a suffix of the candidates
        first = torch.where(ok.any(-1, keepdim=True), ok.int().argmax(-1, keepdim=True), CANDIDATES)
        hi = torch.where(first < CANDIDATES, cand.gather(1, first.clamp(max=CANDIDATES - 1)), hi)
        lo = torch.where(first > 0, cand.gather(1, (first - 1).clamp(min=0)), lo)
    return hi
