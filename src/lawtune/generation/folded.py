"""An inference copy of a LoRA model with the adapter folded in, for sampling from a model that is being trained.

GRPO samples its rollouts from the live policy, whose LoRA adapter an optimizer step changes after every rollout.
Run unfolded, every adapted projection of every decoding step is three matrix products (the base's, then the
adapter's two thin ones), with their launches: on one H200 one stream ran at 254 tokens/s with an r 16 adapter on
the seven projections against 416 without, and 512 mixed requests at 11,970 against 16,667 useful tokens/s
(bench/README.md, fourteenth session). ``FoldedLora`` is a second model object for the engine: every module without
an adapter in it (embeddings, norms, rotary embedding, output head) is the live model's own, shared; each adapted
projection is a plain ``nn.Linear`` whose weight holds the base weight plus the adapter's update (peft's
``get_delta_weight``), summed in float32 and rounded once to the base's dtype. ``refresh`` writes those weights again
in place, so CUDA graphs recorded on the copy stay valid.

Why not peft's own ``merge_adapter`` / ``unmerge_adapter`` around each rollout: they add ``dW`` to the live base
weights in their dtype and subtract it again, so every rollout would leave the frozen bf16 base a rounding off where
it was; the copy leaves the training model untouched. The fold is what TRL's vLLM path does (it merges the adapter
and sends vLLM the merged weights). Its cost: the adapted projections' weights once more in memory (2.6 GiB in
bf16 for the 1.5B model), and an update smaller than half a unit in the last place of a bf16 weight is rounded away
at that weight, where the unfolded path rounds the adapter's contribution at each output instead; the training pass
always runs the adapter unfolded.

Folded: peft's LoRA on ``nn.Linear`` layers (any rank, rsLoRA's scale, several active adapters) and DoRA (one active
adapter): DoRA's output is the bias plus ``m / ||W + dW||`` (each output row's learned magnitude over the row norm
of the updated weight, as peft's forward computes it) times ``(W + dW) x``, so the folded weight is that row scale
times ``W + dW``. Unfolded, DoRA's forward recomputes ``dW`` and its norm in every adapted projection of every
decoding step. Anything else (another variant, LoRA on embeddings, a quantized base layer, a merged or disabled
adapter) is not folded: ``fold_adapter`` returns None and the caller samples from the model as it is.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..model import base_model

log = logging.getLogger("lawtune")


def lora_layers(model) -> dict[str, Any]:
    """The modules of ``model`` that carry a peft LoRA adapter, by name (empty for a plain model)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def unfoldable(layer: Any) -> str | None:
    """Why ``layer`` (a peft LoRA layer) cannot be folded here, or None."""
    from peft.tuners.lora import Linear

    if type(layer) is not Linear or not isinstance(layer.base_layer, nn.Linear):
        return f"{type(layer).__name__} on {type(layer.get_base_layer()).__name__}"
    if layer.merged:
        return "an adapter merged into the base weights"
    if layer.disable_adapters:
        return "adapters disabled"
    variants = [name for name in layer.active_adapters if name in layer.lora_variant]
    other = [name for name in variants if not dora(layer, name)]
    if other:
        return f"a LoRA variant ({type(layer.lora_variant[other[0]]).__name__})"
    if variants and len(layer.active_adapters) > 1:
        return "DoRA beside other active adapters"
    return None


def dora(layer: Any, name: str) -> bool:
    """Whether adapter ``name`` of ``layer`` is DoRA (it has a magnitude vector)."""
    return name in layer.lora_magnitude_vector


class FoldedLora:
    """The inference copy of ``source`` (a peft model or its base model with LoRA layers; ``layers``: those, named
    as in the base model): ``model`` is a plain transformers model of the same class and config; ``refresh`` folds
    the adapter's present weights into it."""

    def __init__(self, source, layers: dict[str, Any]) -> None:
        base = base_model(source)
        # The copy's own config: the engine switches a model's attention implementation on its config while it runs.
        with torch.device("meta"):
            folded = type(base)(copy.deepcopy(base.config))
        self.pairs: list[tuple[Any, nn.Linear]] = []  # (peft's LoRA layer, its folded Linear)
        # Ordinary tensors even when made under inference mode (the held-out evaluation's), which refresh can write
        # outside it (a rollout's).
        with torch.inference_mode(False):
            self.adopt(folded, base, "", layers)
        meta = [name for name, t in [*folded.named_parameters(), *folded.named_buffers()] if t.is_meta]
        if meta:
            raise ValueError(f"cannot fold the adapter: {meta[0]} has no counterpart in the model")
        folded.generation_config = copy.deepcopy(base.generation_config)
        folded.eval()
        self.model = folded
        self.refresh()

    def adopt(self, folded: nn.Module, base: nn.Module, prefix: str, layers: dict[str, Any]) -> None:
        """Fill the meta-device ``folded`` from ``base`` (the module at ``prefix``): subtrees without an adapter are
        shared, each adapted projection gets a weight of its own, and what lies between recurses."""
        for name, own in [*base.named_parameters(recurse=False), *base.named_buffers(recurse=False)]:
            setattr(folded, name, own)
        for name, child in base.named_children():
            path = f"{prefix}{name}"
            if path in layers:
                linear: nn.Linear = layers[path].base_layer
                plain = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
                plain.weight = nn.Parameter(torch.empty_like(linear.weight), requires_grad=False)
                plain.bias = linear.bias
                setattr(folded, name, plain)
                self.pairs.append((layers[path], plain))
            elif not any(p == path or p.startswith(path + ".") for p in layers):
                setattr(folded, name, child)
            else:
                self.adopt(getattr(folded, name), child, path + ".", layers)

    @torch.no_grad()
    def refresh(self) -> None:
        """Each folded weight := the base weight + every active adapter's update, DoRA's rescaled by its magnitude
        (float32, rounded once)."""
        for layer, plain in self.pairs:
            base = layer.base_layer.weight.float()
            weight = base
            for name in layer.active_adapters:
                if name not in layer.lora_A:
                    continue
                delta = layer.get_delta_weight(name).float()
                weight = weight + delta
                if dora(layer, name):  # the only active adapter (unfoldable); peft's norm of W + dW, as its forward
                    magnitude = layer.lora_magnitude_vector[name]
                    norm = magnitude.get_weight_norm(base, delta, 1.0)
                    weight = weight * (magnitude.weight.float() / norm)[:, None]
            plain.weight.copy_(weight)


def fold_adapter(model) -> FoldedLora | None:
    """An inference copy of ``model`` with its LoRA adapter folded in, or None where there is nothing to fold or it
    cannot be folded (logged once, with the reason)."""
    layers = lora_layers(base_model(model))
    if not layers:
        return None
    reasons = {why for why in map(unfoldable, layers.values()) if why}
    if reasons:
        log.info("generation: the adapter is sampled unfolded (%s)", sorted(reasons)[0])
        return None
    return FoldedLora(model, layers)
