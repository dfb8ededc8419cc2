"""Kernels of training: Liger's fused RMSNorm/SwiGLU, compiled decoder layers, and flex attention's
document mask for packed rows (``train.liger``, ``train.compile``, ``model.attn_implementation``).

* ``liger``: Liger-kernel's fused RMSNorm and SwiGLU (and its fused linear cross-entropy when
  ``sparse_logits`` is off). Needs a CUDA GPU and ``pip install lawtune[gpu]``; otherwise a warning and
  the plain path.
* ``compile``: ``torch.compile`` of each decoder layer (regional compilation: one graph that all layers
  share), fusing the element-wise work (norms, RoPE, SiLU, LoRA scaling and residual adds) that
  dominates once the matrix products are large.
* For packed rows under flex attention, the document mask is built directly on the GPU, so that no step
  waits for the GPU to finish the previous one.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from .. import compat
from ..model import base_model

log = logging.getLogger("lawtune")


def apply_liger(model, device: torch.device, fused_cross_entropy: bool) -> bool:
    """Liger-kernel's fused RMSNorm / SwiGLU on a base model (before LoRA is added).

    Returns False (with a warning) where it cannot run: no CUDA device, or liger-kernel not installed.
    """
    if device.type != "cuda":
        log.warning("train.liger: Liger kernels need a CUDA GPU; training with the plain kernels")
        return False
    try:
        apply_to_instance = compat.liger_apply_to_instance()
    except ImportError:
        log.warning("train.liger: liger-kernel is not installed (pip install 'lawtune[gpu]'); training with the "
                    "plain kernels")
        return False
    # Liger also replaces classes and functions in the transformers module itself, which would reach every
    # model built later in the process (a CPU model then fails in a Triton kernel): those are put back, so
    # only this model's own modules change. RoPE can only be patched module-wide, so it stays plain
    # (torch.compile fuses it anyway).
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    apply_to_instance(model=model, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                      fused_linear_cross_entropy=fused_cross_entropy)
    for name, value in saved.items():
        if getattr(module, name, None) is not value:
            setattr(module, name, value)
    return True


def decoder_layers(model) -> torch.nn.ModuleList | None:
    """The repeated decoder blocks of a (PEFT-wrapped) causal LM."""
    base = base_model(model)
    inner = getattr(base, "model", base)
    layers = getattr(inner, "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) else None


def compile_layers(model) -> int:
    """torch.compile every decoder layer in place (regional compilation); returns how many."""
    layers = decoder_layers(model)
    if layers is None:
        log.warning("train.compile: no decoder layers found; training uncompiled")
        return 0
    # All layers share one graph; allow a recompilation per layer should a guard tell them apart.
    compat.raise_recompile_limits(per_code=2 * len(layers) + 8, accumulated=512)
    if next(model.parameters()).is_cuda and "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ:
        # The steps are CPU-bound (the GPU waits for kernel launches): C++ instead of Python code around
        # the compiled kernels measured 1.19x the tokens/s of the default and 2.0x at ~8 sequences per
        # step on an H100 (bench/README.md). The environment variable, where set, decides instead. For the
        # whole process: torch cannot take it per compilation for training (compat.py says why).
        compat.enable_inductor_cpp_wrapper()
    for layer in layers:
        layer.compile()
    return len(layers)


def packed_block_mask(position_ids: torch.Tensor):
    """Flex attention's mask for one packed row: causal, within each example (positions restart at 0)."""
    doc = (position_ids[0] == 0).cumsum(0)

    def same_document_causal(b, h, q, kv):
        return (q >= kv) & (doc[q] == doc[kv])

    n = position_ids.shape[1]
    return compat.create_block_mask(same_document_causal, 1, None, n, n, device=position_ids.device,
                                    compile=position_ids.is_cuda)


def install_packed_block_mask(model) -> None:
    """Give flex attention the document mask of each packed training row directly, built on the GPU.

    transformers would detect packed sequences itself, but its check reads a GPU tensor back at every
    forward: a sync that keeps the CPU from queueing the next step while the GPU works. The mask is the
    same one (tests/test_fast.py).
    """

    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if (not module.training or kwargs.get("attention_mask") is not None or positions is None
                or positions.dim() != 2 or positions.shape[0] != 1):
            return None
        kwargs["attention_mask"] = packed_block_mask(positions)
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)
