"""lawtune's Trainer: transformers' ``Trainer`` with its per-step overhead taken out, as ordinary overrides.

The default steps are CPU-bound (the GPU waits for kernel launches), and transformers' Trainer walks all
~2,300 modules of a 28-layer model with LoRA several times a step: it counts the parameters again for its
FLOP estimate, sets train mode on every module, clips and zeroes gradients by visiting every parameter.
Profiled on the H100 machine that was ~25% of the CPU time of a default step (bench/README.md). The count
cannot change during training, only the LoRA parameters ever hold a gradient, and the mode flags can be
checked from a list of the modules, so:

* ``LawtuneTrainer.floating_point_ops`` keeps transformers' formula (6 x tokens x non-embedding
  parameters) with the parameter count taken once;
* ``LawtuneTrainer.clip_grad_norm_hook`` (the Trainer's clipping step, see compat.py) clips a list of the
  trainable parameters made once (the same norm: only they have gradients). FSDP and DeepSpeed clip their
  own way and are left to the Trainer;
* ``LoraForTraining`` (the PEFT model lawtune trains) sets train mode only when a module is not in it
  already, and zeroes the gradients of its trainable parameters from a list. Under DDP the wrapper's own
  ``zero_grad`` still walks its modules once a step;
* ``LawtuneTrainer.training_step`` takes a ``CountingCollator``'s count off the batch and adds it up;
* ``LawtuneTrainingArguments.n_gpu`` is at most 1: several visible GPUs in one process would make the
  Trainer wrap the model in ``nn.DataParallel``, which replicates the model every step and is not what
  compiled layers, flex attention and the token budget are built for. Several GPUs are used through one
  process each (accelerate launch / torchrun).
"""

from __future__ import annotations

import logging

import torch
from peft import PeftModelForCausalLM
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..compat import trainer_with_hooks
from ..dist import is_main_process
from .collate import COUNT_KEY

log = logging.getLogger("lawtune")


class LoraForTraining(PeftModelForCausalLM):
    """A PEFT causal LM whose mode switch and gradient zeroing skip the walk over every module."""

    def cache_module_walks(self) -> None:
        """Remember the modules and trainable parameters. Call once the module tree is final (after compiling)
        and only where parameters are not replaced later (not under FSDP or DeepSpeed)."""
        self.__dict__["_walks"] = (list(self.modules()), [p for p in self.parameters() if p.requires_grad])

    def train(self, mode: bool = True):
        walks = self.__dict__.get("_walks")
        # Setting the flag on every module costs more CPU than checking that they all hold it already.
        if walks is not None and all(m.training == mode for m in walks[0]):
            return self
        return super().train(mode)

    def zero_grad(self, set_to_none: bool = True) -> None:
        walks = self.__dict__.get("_walks")
        if walks is None:
            return super().zero_grad(set_to_none)
        for p in walks[1]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()
        return None


class LawtuneTrainingArguments(TrainingArguments):
    @property
    def n_gpu(self) -> int:
        """GPUs this process trains on: never more than one (see the module docstring)."""
        return min(super().n_gpu, 1)


# The base is a class compat.py builds at run time; mypy cannot check a call as a base class (it becomes Any).
class LawtuneTrainer(trainer_with_hooks()):  # type: ignore[misc]
    def __init__(self, *args, counter=None, **kwargs):
        """``counter``: the ``CountingCollator`` of the data collator, if any."""
        super().__init__(*args, **kwargs)
        self.counter = counter
        model = self.model
        self._n_params = model.num_parameters(exclude_embeddings=True) if hasattr(model, "num_parameters") else 0
        self._trainable = None
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            self._trainable = [p for p in model.parameters() if p.requires_grad]
            if isinstance(model, LoraForTraining):
                model.cache_module_walks()
        self.add_callback(DdpReport(self))

    def training_step(self, model, inputs, num_items_in_batch=None):
        counted = inputs.pop(COUNT_KEY, None)
        if counted is not None and self.counter is not None:
            self.counter.add(counted)
        return super().training_step(model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        main_input = getattr(self.model, "main_input_name", "input_ids")
        return 6 * inputs[main_input].numel() * self._n_params if main_input in inputs else 0

    def clip_grad_norm_hook(self, model):
        if self._trainable is None:
            return super().clip_grad_norm_hook(model)
        return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)


class DdpReport(TrainerCallback):
    """When training starts (the Trainer has wrapped the model in DDP then), says on rank 0 how the gradients
    are all-reduced (``train.ddp_bucket_cap_mb``)."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer.model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel) and is_main_process():
            grads = sum(p.numel() * p.element_size() for p in wrapped.parameters() if p.requires_grad)
            log.info("DDP over %d processes: %.1f MiB of gradients a step, all-reduced in buckets of %.0f MiB "
                     "(train.ddp_bucket_cap_mb)", args.world_size, grads / 2**20, wrapped.bucket_bytes_cap / 2**20)
