"""Decoding attention that reads each row's own length of the cache (split-KV "flash decoding", a Triton kernel).

Why a kernel of its own (issue 30, one H200, the 1.5B architecture): a decoding step used to attend every row over
the furthest column any row used (rounded up to a power of two) with sdpa and a visibility mask. In a batch of 256
rows with R1-like lengths (median 900, one row at 2,048 and more) every row then read the widest row's keys and
values: about 30 GB a step over the 28 layers, most of a step's time. flash-attn, FlashInfer and vLLM builds are not
installable beside the pinned torch, and FlexAttention's decoding as shipped measured slower than the windowed sdpa
(bench/README.md), so this is the one attention lawtune writes itself.

The kernel: a program per (row, key/value head, chunk of ``CHUNK`` columns) reads the row's columns of its chunk
below the row's length (programs past it return at once), with the ``group`` query heads of that key/value head
together (grouped-query attention without repeating keys), and writes its partial output with its log-sum-exp; a
second kernel combines a row's chunks. A row's length is the column it writes this step plus one: the engine's rows
see a prefix of their columns, which ``ModelRunner`` keeps (see its visibility mask).

``decode_attention`` is a torch custom op, so a compiled decoding step treats it as one opaque call and a CUDA graph
records its two launches. Without Triton (a CPU machine) ``available()`` is False and the engine keeps sdpa.
"""

from __future__ import annotations

import math

import torch

try:  # Triton ships with torch's CUDA builds only
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

# Columns a program reads (a row of length n runs ceil(n / CHUNK) programs a key/value head) and columns a loop turn
# reads; the chunk count bounds the slot length the kernel serves (CHUNK * MAX_CHUNKS columns).
CHUNK = 256
BLOCK_N = 64
MAX_CHUNKS = 128


def tuning(rows: int) -> tuple[int, int, int, int]:
    """The kernel's (chunk, block, warps, stages) for a step of ``rows`` rows. Measured on one H200 (bench/README.md,
    bench/decode_step.py --sweep): at 256 rows of the 512-request workload's lengths 1,024-column chunks read in
    128-column blocks took 100 µs a layer against 196 for 256/64; a few rows keep short chunks, whose programs spread
    one row's columns over more of the GPU."""
    return (1024, 128, 4, 2) if rows > 16 else (CHUNK, BLOCK_N, 4, 2)


def available() -> bool:
    """Whether the kernel can run here (Triton present and a GPU, or Triton's interpreter)."""
    import os

    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

    @triton.jit
    def _partial_kernel(q_ptr, k_ptr, v_ptr, lengths_ptr, out_ptr, lse_ptr,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                        stride_ob, stride_oh, stride_oc, stride_lb, stride_lh,
                        scale, group, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                        D: tl.constexpr, IEEE: tl.constexpr):
        row, kv_head, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(lengths_ptr + row)
        start = chunk * CHUNK
        if start < length:
            heads = kv_head * group + tl.arange(0, GROUP)
            head_ok = tl.arange(0, GROUP) < group
            dims = tl.arange(0, D)
            q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + dims[None, :], mask=head_ok[:, None],
                        other=0.0)
            best = tl.full([GROUP], float("-inf"), tl.float32)
            total = tl.zeros([GROUP], tl.float32)
            acc = tl.zeros([GROUP, D], tl.float32)
            end = tl.minimum(start + CHUNK, length)
            k_row = k_ptr + row * stride_kb + kv_head * stride_kh
            v_row = v_ptr + row * stride_vb + kv_head * stride_vh
            for first in range(start, end, BLOCK_N):
                cols = first + tl.arange(0, BLOCK_N)
                ok = cols < end
                k = tl.load(k_row + cols[:, None] * stride_kl + dims[None, :], mask=ok[:, None], other=0.0)
                if IEEE:  # float32 caches stay float32 (tf32 would change greedy tokens of float32 models)
                    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                else:
                    scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
                scores = tl.where(ok[None, :], scores, float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, 1))
                weights = tl.exp(scores - new_best[:, None])
                fade = tl.exp(best - new_best)
                total = total * fade + tl.sum(weights, 1)
                v = tl.load(v_row + cols[:, None] * stride_vl + dims[None, :], mask=ok[:, None], other=0.0)
                if IEEE:
                    acc = acc * fade[:, None] + tl.dot(weights, v, input_precision="ieee")
                else:
                    acc = acc * fade[:, None] + tl.dot(weights.to(v.dtype), v).to(tl.float32)
                best = new_best
            out = out_ptr + row * stride_ob + heads[:, None] * stride_oh + chunk * stride_oc + dims[None, :]
            tl.store(out, acc / total[:, None], mask=head_ok[:, None])
            tl.store(lse_ptr + row * stride_lb + heads * stride_lh + chunk, best + tl.log(total), mask=head_ok)

    @triton.jit
    def _combine_kernel(part_ptr, lse_ptr, lengths_ptr, out_ptr, stride_pb, stride_ph, stride_pc, stride_lb,
                        stride_lh, stride_ob, stride_oh, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, D: tl.constexpr):
        row, head = tl.program_id(0), tl.program_id(1)
        used = tl.cdiv(tl.load(lengths_ptr + row), CHUNK)
        chunks = tl.arange(0, CHUNKS)
        ok = chunks < used
        lse = tl.load(lse_ptr + row * stride_lb + head * stride_lh + chunks, mask=ok, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, 0))
        weights = weights / tl.sum(weights, 0)
        dims = tl.arange(0, D)
        part = tl.load(part_ptr + row * stride_pb + head * stride_ph + chunks[:, None] * stride_pc + dims[None, :],
                       mask=ok[:, None], other=0.0)
        out = tl.sum(part * weights[:, None], 0)
        tl.store(out_ptr + row * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


@torch.library.custom_op("lawtune::decode_attention", mutates_args=())
def decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                     scale: float, chunk: int = CHUNK, block_n: int = BLOCK_N, warps: int = 4,
                     stages: int = 2) -> torch.Tensor:
    """Attention of one query a row over the row's first ``lengths[row]`` cached columns.

    query (rows, heads, head_dim); keys, values (rows or more, kv_heads, columns, head_dim) with unit stride in
    head_dim; lengths (rows,) int, each between 1 and columns. Returns (rows, heads, head_dim) in the query's dtype.
    ``chunk``, ``block_n``, ``warps``, ``stages``: the kernel's tuning (bench/decode_step.py --sweep)."""
    rows, heads, dim = query.shape
    kv_heads, columns = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    chunks = max(1, triton.cdiv(columns, chunk))
    part = torch.empty(rows, heads, chunks, dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(rows, heads, chunks, dtype=torch.float32, device=query.device)
    _partial_kernel[(rows, kv_heads, chunks)](
        query, keys, values, lengths, part, lse,
        query.stride(0), query.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1), scale, group,
        CHUNK=chunk, BLOCK_N=block_n, GROUP=max(16, triton.next_power_of_2(group)), D=dim,
        IEEE=query.dtype == torch.float32, num_warps=warps, num_stages=stages)
    out = torch.empty_like(query)
    _combine_kernel[(rows, heads)](
        part, lse, lengths, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), CHUNK=chunk, CHUNKS=triton.next_power_of_2(chunks), D=dim)
    return out


@decode_attention.register_fake
def _(query, keys, values, lengths, scale, chunk=CHUNK, block_n=BLOCK_N, warps=4, stages=2):
    return torch.empty_like(query)


def reference_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """The same attention with sdpa and a length mask, in float32 (what the tests compare the kernel with)."""
    rows, heads, dim = query.shape
    kv_heads, columns = keys.shape[1], keys.shape[2]
    k = keys[:rows].float().repeat_interleave(heads // kv_heads, dim=1)
    v = values[:rows].float().repeat_interleave(heads // kv_heads, dim=1)
    mask = torch.arange(columns, device=query.device)[None, :] < lengths[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(query.float()[:, :, None], k, v,
                                                           attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0].to(query.dtype)


def supports(head_dim: int, max_len: int) -> bool:
    """Shapes the kernel serves: a power-of-two head size of at least 16, rows of at most CHUNK * MAX_CHUNKS."""
    return head_dim >= 16 and head_dim == 1 << int(math.log2(head_dim)) and max_len <= CHUNK * MAX_CHUNKS
