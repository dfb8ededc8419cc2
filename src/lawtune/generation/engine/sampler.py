"""Choosing each row's next token on the device, greedy and sampled alike, inside the step a CUDA graph records.

Temperature, top-p and top-k are per row; the randomness is a counter-based hash of (the sequence's seed, its step,
the token id) turned into Gumbel noise, so a sequence's samples depend on its own seed only, never on which other
sequences share the batch, on the order of requests, or on a preemption on the way. Log-probabilities are under the
model's own distribution (temperature 1, no top-p/k).
"""

from __future__ import annotations

import torch

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
