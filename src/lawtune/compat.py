"""Every private (single-underscore) internal of torch, transformers, peft, trl and liger_kernel that lawtune uses.

Nothing else in src/lawtune names one (tests/test_compat.py checks the source tree, and that each internal below
still exists in the installed releases, naming the library and its version when one has moved). Each entry says why
the public API does not do, and the release it was written against.

Overridden private methods: lawtune's subclasses do not define ``_name`` methods themselves. ``trainer_with_hooks``
and ``grpo_trainer_with_hooks`` build (once) a thin subclass of the library trainer whose private method only calls
a public hook of the same meaning (``_clip_grad_norm`` -> ``clip_grad_norm_hook``, ...); the hook's default calls the
library's private method. lawtune's trainers derive from these and override the hooks, calling ``super()`` for the
library's behaviour, so the chain of calls is exactly that of a direct override. The classes are built on first use,
so importing this module imports none of the libraries but torch.

Process-wide switches: dynamo's recompilation limits and inductor's C++ wrapper have no per-compilation form that
training can use (see ``raise_recompile_limits`` and ``enable_inductor_cpp_wrapper``), so they stay global, here.
"""

from __future__ import annotations

import functools

import torch

# ----------------------------------------------------------------------------- transformers: configs


def attn_implementation(config, default=None):
    """The attention a model's config selects now (``config._attn_implementation``).

    Why: transformers (5.25) has no public reader; ``model.set_attn_implementation`` re-checks and loads kernels,
    too slow to switch around every evaluation batch."""
    return getattr(config, "_attn_implementation", default)


def set_attn_implementation(config, value: str) -> None:
    """Switch a config's attention (the setter also updates its sub-configs), transformers 5.25."""
    config._attn_implementation = value


# ----------------------------------------------------------------------------- torch: compilation


def is_module_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` was called on this module: torch (2.13) keeps the compiled callable in
    ``nn.Module._compiled_call_impl`` and offers no public flag."""
    return getattr(module, "_compiled_call_impl", None) is not None


def clear_cublas_workspaces() -> None:
    """Give back the cuBLAS workspaces torch keeps per (handle, stream) in its caching allocator
    (``torch._C._cuda_clearCublasWorkspaces``; absent from CPU builds): a closed generation engine's warm-up stream
    would otherwise keep its workspace allocated for the life of the process. torch (2.13) has no public call;
    the next matrix product on a stream allocates its workspace again."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def raise_recompile_limits(per_code: int, accumulated: int) -> None:
    """Raise dynamo's recompilation limits to at least these (never lowers them).

    Why: regional compilation compiles one code object for all decoder layers, which may recompile once per layer.
    torch (2.13) has no per-call option for these limits, so they stay process-wide settings of
    ``torch._dynamo.config`` (``cache_size_limit`` is the older name of ``recompile_limit``)."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), per_code))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, accumulated)


def enable_inductor_cpp_wrapper() -> None:
    """Have inductor wrap its compiled kernels in C++ instead of Python (``torch._inductor.config.cpp_wrapper``).

    Why process-wide: ``torch.compile(..., options={"cpp_wrapper": True})`` covers only the forward graph; the
    backward then fails to compile (torch 2.11, H200: "CudaKernelParamCache not populated for
    triton_..._backward_..."), so the setting stays global, as torch 2.11 to 2.13 need."""
    import torch._inductor.config

    torch._inductor.config.cpp_wrapper = True


def create_block_mask(mask_mod, batch, heads, q_len: int, kv_len: int, device, compile: bool):
    """flex attention's ``create_block_mask``, compiled where ``compile``: its private ``_compile`` flag (torch 2.13
    deprecates it in favour of ``torch.compile(create_block_mask)``, which compiles per call shape instead; kept
    until that is measured)."""
    from torch.nn.attention.flex_attention import create_block_mask as create

    return create(mask_mod, batch, heads, q_len, kv_len, device=device, _compile=compile)


# ----------------------------------------------------------------------------- liger_kernel


def liger_apply_to_instance():
    """liger_kernel's ``_apply_liger_kernel_to_instance(model=..., **switches)``: the only entry point that picks the
    patch for a model instance's architecture (the public ones are per architecture: ``apply_liger_kernel_to_qwen2``
    and so on). Written against liger-kernel 0.8.5. Raises ImportError where liger-kernel is absent."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    return _apply_liger_kernel_to_instance


# ----------------------------------------------------------------------------- transformers: Trainer


@functools.cache
def trainer_with_hooks():
    """transformers' ``Trainer`` whose private ``_clip_grad_norm(model)`` (transformers 5.25; no public hook for the
    clipping step) calls the public ``clip_grad_norm_hook(model)``."""
    from transformers import Trainer

    class TrainerWithHooks(Trainer):
        def _clip_grad_norm(self, model):
            return self.clip_grad_norm_hook(model)

        def clip_grad_norm_hook(self, model):
            """Clip the gradients and return their norm (the Trainer's own way)."""
            return super()._clip_grad_norm(model)

    return TrainerWithHooks


# ----------------------------------------------------------------------------- trl: GRPOTrainer


@functools.cache
def grpo_trainer_with_hooks():
    """TRL's ``GRPOTrainer`` (trl 1.16, pinned in pyproject.toml) whose private steps call public hooks:

    * ``_tokenize_prompts(prompts)`` -> ``tokenize_prompts_hook``: (prompt ids, images, multimodal fields);
    * ``_calculate_rewards(inputs, prompts, completions, completion_ids_list)`` -> ``calculate_rewards_hook``:
      the (completions, reward functions) tensor;
    * ``_generate_and_score_completions(inputs)`` -> ``generate_and_score_hook``: a generation batch's rows (dataset
      rows, each question repeated once per completion) sampled, scored and turned into the padded tensors of the
      loss (its dict: prompt/completion ids and masks, advantages, num_items_in_batch, ...);
    * ``_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size=None,
      compute_entropy=False, compute_aux_loss=False, **model_inputs)`` -> ``per_token_logps_hook``: the
      completions' per-token log-probabilities ([rows, logits_to_keep], 0 at padding), entropies (or None) and the
      MoE aux loss (or None), of the loss and of the old and reference passes alike;
    * ``_save(output_dir, state_dict)`` (transformers' Trainer) -> ``save_hook``: writes the weights of a save.
    TRL offers no public hooks for these steps."""
    from trl import GRPOTrainer

    class GRPOTrainerWithHooks(GRPOTrainer):
        def _tokenize_prompts(self, prompts: list):
            return self.tokenize_prompts_hook(prompts)

        def tokenize_prompts_hook(self, prompts: list):
            return super()._tokenize_prompts(prompts)

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            return self.calculate_rewards_hook(inputs, prompts, completions, completion_ids_list)

        def calculate_rewards_hook(self, inputs, prompts, completions, completion_ids_list):
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)

        def _generate_and_score_completions(self, inputs):
            return self.generate_and_score_hook(inputs)

        def generate_and_score_hook(self, inputs):
            return super()._generate_and_score_completions(inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **model_inputs):
            return self.per_token_logps_hook(model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                                             compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss,
                                             **model_inputs)

        def per_token_logps_hook(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                 compute_entropy=False, compute_aux_loss=False, **model_inputs):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **model_inputs)

        def _save(self, output_dir: str | None = None, state_dict=None):
            return self.save_hook(output_dir, state_dict)

        def save_hook(self, output_dir: str | None = None, state_dict=None):
            return super()._save(output_dir, state_dict)

    return GRPOTrainerWithHooks


def grpo_tokenizer(trainer):
    """The tokenizer GRPOTrainer tokenizes with (``_tokenizer``: the processing class, or a processor's tokenizer),
    trl 1.16; ``processing_class`` is the processor itself for vision models."""
    return trainer._tokenizer


def grpo_log_metric(trainer, mode: str, name: str, value: float) -> None:
    """Add a value to what GRPOTrainer averages and logs as ``name`` at the next log (its private ``_metrics[mode]``
    lists, trl 1.16; there is no public way to add to its logged metrics). ``mode``: "train" or "eval"."""
    trainer._metrics[mode][name].append(value)
