"""Choosing each row's next token on the device, greedy and sampled alike, inside the step a CUDA graph records.

Temperature, top-p and top-k are per row; the randomness is a counter-based hash of (the sequence's seed, its step,
the token id) turned into Gumbel noise, so a sequence's samples depend on its own seed only, never on which other
sequences share the batch, on the order of requests, or on a preemption on the way. Log-probabilities are under the
model's own distribution (temperature 1, no top-p/k).

**No sort of the vocabulary** (issue 30: a full sort a row a step made sampling run at ~72% of greedy on one H200).
The tokens top-p and top-k keep are the first m of the vocabulary in descending order, ties by token id (a stable
sort). Their smallest probability ``t`` is found by bisection on its float32 bits: a value is kept (as the first of
its ties) while the mass above it is at most top-p and fewer than top-k tokens lie above it, a condition monotone in
the value; 31 halvings pin it exactly. Ties at ``t`` are kept in token order as far as top-p's and top-k's counts
allow. That is the same set, hence the same token for the same noise, as the full sort (``sorted_choice``, which
the tests compare it with), up to float rounding of the mass in the last place; each halving is one pass over the
probabilities, which a compiled step fuses into one kernel.

**The bisection only where needed** (issue 30: 31 passes over the probabilities were two thirds of a sampled choice,
9.6 ms at 512 rows on one H200, and sampling ran at 0.56 of greedy). The sampled token is the kept token of the
largest scaled logit plus Gumbel noise. ``gumbel_first`` takes the largest over the whole vocabulary and asks, in one
pass, whether that token is kept: its rank (tokens of a larger probability, and ties of a smaller id) is below top-k
and the mass before it is at most top-p. If so it is also the largest among the kept tokens, hence the same token
(rows of a flat distribution: all but about 1 - top-p of them). The other rows take the bisection: on a GPU in one
Triton program a row (``sampler_kernel``; the rows that passed return at once, so a recorded step keeps its shapes),
on a CPU on those rows alone. A kernel that fails to build leaves its rows to torch's bisection (``first_working``).
"""

from __future__ import annotations

import torch

from . import sampler_kernel
from .compiled import compiled_or_eager, first_working

MASK64 = (1 << 64) - 1


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


def nucleus_threshold(probs: torch.Tensor, top_p: torch.Tensor,
                      top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest kept probability's float32 bits (rows, 1) and how many tokens of that value may be kept (the
    bisection of the module docstring; reductions only, which a compiled step fuses into one kernel a halving)."""
    vocab = probs.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    # top-p 1 bounds no mass: a sum of probabilities may round above 1, which would cut a top-k short
    p = torch.where(top_p >= 1, float("inf"), top_p)[:, None]
    bits = probs.view(torch.int32)  # non-negative floats order as their bits do
    lo = torch.zeros_like(k)  # invariant: the value of lo's bits is not kept (as first of its ties), hi's is
    hi = bits.max(-1, keepdim=True).values.long()
    # top-p 1 keeps every token (a sum of all the probabilities may round above 1), as does a top-k they all fit
    whole = ((probs * (probs > 0)).sum(-1, keepdim=True) <= p) | (p >= 1)
    keep_all = whole & ((probs > 0).sum(-1, keepdim=True) <= k)
    for _ in range(31):
        mid = (lo + hi) // 2
        above = bits > mid
        ok = ((probs * above).sum(-1, keepdim=True) <= p) & (above.sum(-1, keepdim=True) < k)
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    threshold = torch.where(keep_all, 0, hi)
    above = bits > threshold
    mass, count = (probs * above).sum(-1, keepdim=True), above.sum(-1, keepdim=True)
    value = threshold.int().view(torch.float32)
    by_mass = torch.floor((p - mass) / value.clamp(min=1e-38)).clamp(max=vocab).long() + 1
    return threshold, torch.minimum(by_mass, k - count)


def nucleus(probs: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, threshold=nucleus_threshold) -> torch.Tensor:
    """Which tokens top-p and top-k keep (rows, vocab) bool: the first m in descending order of ``probs``, ties by
    token id, where a token is kept while the mass before it is at most ``top_p`` and it is among the first
    ``top_k`` (0 = all). Found without sorting (see the module docstring); ``threshold``: ``nucleus_threshold`` or
    its compiled form."""
    value, allowed = threshold(probs, top_p, top_k)
    bits = probs.view(torch.int32)
    tied = bits == value
    return (bits > value) | (tied & (tied.cumsum(-1) <= allowed))


def noisy_logits(scaled: torch.Tensor, seed: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The scaled logits plus each token's Gumbel noise."""
    tokens = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
    return scaled - torch.log(-torch.log(uniform_noise(seed[:, None], step[:, None], tokens)))


def first_kept(probs: torch.Tensor, first: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Whether top-p and top-k keep token ``first`` of each row: its rank (tokens of a larger probability, ties of a
    smaller id) is below top-k and the mass ranked before it is at most top-p. Reductions only."""
    vocab = probs.shape[-1]
    tokens = torch.arange(vocab, device=probs.device)[None, :]
    value = probs.gather(1, first[:, None])
    bits, first_bits = probs.view(torch.int32), value.view(torch.int32)
    above = bits > first_bits
    ties_before = ((bits == first_bits) & (tokens < first[:, None])).sum(-1, keepdim=True)
    rank = above.sum(-1, keepdim=True) + ties_before
    before = (probs * above).sum(-1, keepdim=True) + ties_before * value
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    return ((rank < k) & ((before <= top_p[:, None]) | (top_p >= 1)[:, None]))[:, 0]


def gumbel_first(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
                 step: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The token of the largest scaled logit plus its Gumbel noise over the whole vocabulary, a row, and whether
    top-p and top-k keep it (then it is the sampled token: see the module docstring); with the probabilities and the
    noisy logits that the rows it failed choose among. ``fused``: the noise and the check compiled, apart (one
    compiled function with the softmax and the argmax in it failed in the engine's step on an H200, after inductor
    split the softmax's reduction; the softmax and the argmax stay uncompiled, as they were before)."""
    noisy = (compiled_or_eager("noisy_logits", noisy_logits) if fused else noisy_logits)(scaled, seed, step)
    first = noisy.argmax(-1)
    probs = scaled.softmax(-1)
    kept = (compiled_or_eager("first_kept", first_kept) if fused else first_kept)(probs, first, top_p, top_k)
    return first, kept, probs, noisy


def kept_pick(probs: torch.Tensor, noisy: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
              threshold=nucleus_threshold) -> torch.Tensor:
    """The kept token of the largest noisy logit, a row, the kept set found by the bisection (``nucleus``)."""
    return noisy.masked_fill(~nucleus(probs, top_p, top_k, threshold), float("-inf")).argmax(-1)


def sample(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
           fused: bool = False) -> torch.Tensor:
    """The sampled token of each row of ``scaled`` (logits over the temperature): ``gumbel_first``, then the bisection
    for the rows whose first token top-p or top-k cut. ``fused``: through compiled functions (the fused step's)."""
    first, kept, probs, noisy = gumbel_first(scaled, top_p, top_k, seed, step, fused)

    def bisect(probs, noisy, top_p, top_k, kept, first):  # torch's bisection for the rows gumbel_first cut
        threshold = compiled_or_eager("nucleus_threshold", nucleus_threshold) if fused else nucleus_threshold
        if probs.is_cuda:  # every row, so a recorded step's shapes do not depend on the draw
            return torch.where(kept, first, kept_pick(probs, noisy, top_p, top_k, threshold))
        cut = (~kept).nonzero()[:, 0]
        if len(cut):
            first = first.clone()
            first[cut] = kept_pick(probs[cut], noisy[cut], top_p[cut], top_k[cut], threshold)
        return first

    # on a GPU a program a row, the rows kept returning at once (a recorded step's shapes)
    pick = first_working("the sampler's Triton kernel", sampler_kernel.kept_pick, bisect) \
        if sampler_kernel.usable(probs) else bisect
    return pick(probs, noisy, top_p, top_k, kept, first)


def sorted_choice(scaled: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, seed: torch.Tensor,
                  step: torch.Tensor) -> torch.Tensor:
    """The sampled token by a full stable sort of the vocabulary: the rule ``nucleus`` computes without one (kept to
    check it)."""
    vocab = scaled.shape[-1]
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    cut = ranks >= torch.where(top_k > 0, top_k, vocab)[:, None]
    probs = ordered.softmax(-1)
    # keep the smallest head whose mass reaches top_p; top-p 1 keeps all (a sum may round above 1)
    cut |= ((probs.cumsum(-1) - probs) > top_p[:, None]) & (top_p < 1)[:, None]
    u = uniform_noise(seed[:, None], step[:, None], order)
    pick = (ordered.masked_fill(cut, float("-inf")) - torch.log(-torch.log(u))).argmax(-1)
    return order.gather(1, pick[:, None])[:, 0]


def choose_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                  seed: torch.Tensor, step: torch.Tensor, ban: torch.Tensor, ban_token: int,
                  sampling: bool, fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(next token, its log-probability) per row of ``logits`` (rows, vocab), float32.

    Rows with temperature 0 are greedy. ``ban`` rows may not pick ``ban_token`` (the end token before
    ``min_tokens``). With ``sampling`` False every row is greedy (the cheaper graph). ``fused``: the sampling
    through compiled functions (the fused step's)."""
    banned = logits[:, ban_token].masked_fill(ban, float("-inf"))
    logits = logits.clone()
    logits[:, ban_token] = banned
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = logits.argmax(-1)
    if not sampling:
        return greedy, logprobs.gather(1, greedy[:, None])[:, 0]
    sampled = sample(logits / temperature.clamp(min=1e-6)[:, None], top_p, top_k, seed, step, fused)
    token = torch.where(temperature > 0, sampled, greedy)
    return token, logprobs.gather(1, token[:, None])[:, 0]
