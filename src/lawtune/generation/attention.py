"""Attention while evaluating and generating (switched on around every evaluation batch).

``fast_attention`` runs grouped-query attention on the key/value heads while decoding, instead of
copying every cached key and value once per query head (older transformers releases do that whenever a
padding mask is present, which is always the case for left-padded batches), and keeps sdpa off cuDNN's
kernels. ``eager_stance`` runs layers that training compiled eagerly, since evaluation has other shapes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..compat import attn_implementation, is_module_compiled, set_attn_implementation
from ..model import base_model
from .decode_attention import decode_attention

FAST_ATTENTION = "lawtune_sdpa"
_registered = False
# cuDNN's attention builds an execution plan for every new input shape, and evaluation batches all differ in
# width (left-padded to their longest prompt), so it is left out while evaluating; None allows every backend.
EVAL_SDPA_BACKENDS: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                       is_causal=None, **kwargs):
    """transformers' sdpa attention, except that a single decoding query runs on the key/value heads.

    query (B, H, 1, D) becomes (B, H_kv, H / H_kv, D): the query heads of a group sit where query positions
    would, and the padding mask (B, 1, 1, L) broadcasts over them. Exactly the same attention, without the
    per-head copy of the whole KV cache that repeating the key/value heads makes at every step.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths, tuning = kwargs.pop("decode_lengths", None), kwargs.pop("decode_tuning", ())
    if lengths is not None and query.shape[2] == 1:  # the engine's decoding step with its kernel (see there)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return decode_attention(query[:, :, 0], key, value, lengths, scale, *tuning)[:, None], None
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups > 1 and query.shape[2] == 1 and attention_mask is not None and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1 and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not torch.compiler.is_compiling()):
        b, h, _, d = query.shape
        q = query.reshape(b, h // groups, groups, d)
        mask = attention_mask[:, :, :, : key.shape[-2]]
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FAST_ATTENTION, gqa_sdpa_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, sdpa_mask)
    _registered = True


def _configs(model) -> list:
    config = getattr(base_model(model), "config", None)
    return [config] if config is not None else []


@contextlib.contextmanager
def fast_attention(model):
    """Evaluate with ``gqa_sdpa_attention`` where the model uses sdpa or flex attention (flex is for
    training; decoding with it recompiles for every cache length). Eager and flash attention are kept.
    Attention kernels are limited to ``EVAL_SDPA_BACKENDS``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    configs = [c for c in _configs(model) if attn_implementation(c) in ("sdpa", "flex_attention")]
    saved = [attn_implementation(c) for c in configs]
    allowed = [getattr(SDPBackend, b) for b in EVAL_SDPA_BACKENDS or ()]
    backends = sdpa_kernel(allowed) if allowed else contextlib.nullcontext()
    try:
        if configs:
            _register()
            for c in configs:
                set_attn_implementation(c, FAST_ATTENTION)
        with backends:
            yield
    finally:
        for c, value in zip(configs, saved):
            set_attn_implementation(c, value)


def attention_implementation(model) -> str:
    configs = _configs(model)
    return attn_implementation(configs[0], "sdpa") if configs else "sdpa"


def is_compiled(model) -> bool:
    return any(is_module_compiled(m) for m in model.modules())


@contextlib.contextmanager
def eager_stance(model):
    """Run a model whose layers were compiled for training eagerly (evaluation has other shapes and a cache)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or not is_compiled(model):
        yield
        return
    with set_stance("force_eager"):
        yield
