"""LoRA SFT on JEC-QA: setup -> fit, on top of transformers' Trainer and peft.

The Trainer owns the loop, gradient accumulation, mixed precision, checkpointing, resume and the
optimizer (8-bit AdamW comes from bitsandbytes through ``optim``); lawtune adds what the task
needs: the data split, prompt rendering and masking, an in-process held-out evaluation, and
atomic, self-describing output directories (``rundir.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..card import refresh_cards, write_card
from ..config import MUTATING_INITS, ConfigError, TrainRun
from ..dist import is_main_process
from ..model import add_lora, base_fingerprint, count_parameters, load_base_model, load_tokenizer
from ..preempt import Sigterm
from ..prompts import CHAT_INSTRUCTION, PLAIN_TEMPLATE, encode_records, render_example
from ..rundir import FINAL_STEPS, resume_checkpoint, save_initial_adapter, save_model_dir
from .callbacks import GcPauses, HeldOutEvalCallback, MetricsCallback, StopOnSigterm
from .collate import CountingCollator, PlannedBatches, make_collator, plan_batches
from .common import prepare_data, shared_arguments, start_run, train_to_the_end, write_curves
from .kernels import apply_liger, compile_layers, install_packed_block_mask
from .loss import sparse_logits_loss
from .trainer import LawtuneTrainer, LawtuneTrainingArguments, LoraForTraining

log = logging.getLogger("lawtune")


# ----------------------------------------------------------------------------- main


@dataclass
class SFTRun:
    """Everything ``setup`` builds, for ``fit``."""

    cfg: TrainRun
    """The resolved config (CPU fallbacks applied, output directory filled in): what lawtune_config.yaml records."""
    trainer: LawtuneTrainer
    model: torch.nn.Module
    tokenizer: object
    manifest: dict
    out: Path
    held_out: HeldOutEvalCallback
    n_train: int
    """Encoded training examples."""
    stop: StopOnSigterm


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    train_loss: float
    final_model: str
    best_eval_accuracy: float | None
    eval_history: list[dict]
    output_dir: str


def training_arguments(cfg: TrainRun, out: Path, dtype: torch.dtype, device: torch.device) -> TrainingArguments:
    t = cfg.train
    return LawtuneTrainingArguments(
        **shared_arguments(t, out, dtype, device),
        # With a token budget every dataset item is already a whole micro-batch.
        per_device_train_batch_size=1 if t.batch_tokens else t.per_device_batch_size,
        dataloader_num_workers=t.dataloader_num_workers,
        # Padding-free batches have no padding to leave out; padded ones count attention-mask tokens.
        # (with a token budget lawtune counts on the CPU instead: transformers' count syncs with the GPU)
        include_num_input_tokens_seen=("no" if t.batch_tokens else "all" if t.packing else "non_padding"),
        # No GPU->CPU sync after every micro-step to test the loss for NaN (a NaN then shows in the log).
        logging_nan_inf_filter=False,
        save_only_model=False,
        ddp_find_unused_parameters=False,
        # A decoder LM's buffers (rotary tables) never change in training: no broadcast before every forward.
        ddp_broadcast_buffers=False,
        ddp_bucket_cap_mb=t.ddp_bucket_cap_mb,
        # Batches go to the GPU from pinned memory without waiting: a blocking copy makes the CPU wait for
        # the GPU at every step, and under DDP that turns every step into a barrier for the slowest rank
        # (profiled on 2 H100s: 4 stream synchronisations a step, bench/README.md).
        dataloader_pin_memory=device.type == "cuda",
        accelerator_config={"non_blocking": device.type == "cuda"},
    )


def setup(cfg: TrainRun, resume: bool = False, overwrite: bool = False, sigterm: Sigterm | None = None) -> SFTRun:
    """Everything before the loop: data, tokenizer, model with LoRA, Trainer.

    A folder that holds a run is continued only with ``resume`` (and only by the same run) and replaced only with
    ``overwrite`` (``rundir.prepare_run_dir``); ``resume`` of a finished run raises ``RunFinished``. ``sigterm``:
    the SIGTERM handler the run stops on (``train`` installs one)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, out, device, dtype = start_run(cfg, "train", resume, overwrite)
    if 2 * cfg.train.warmup_steps >= cfg.train.max_steps:
        log.warning("train.warmup_steps=%d is half or more of train.max_steps=%d: the learning rate stays low for "
                    "most of the run", cfg.train.warmup_steps, cfg.train.max_steps)

    train_records, eval_records, manifest = prepare_data(cfg, out)
    tokenizer = load_tokenizer(cfg.model.path)
    features, enc_stats = encode_records(train_records, tokenizer, cfg.data.prompt_format, cfg.data.max_length)
    if enc_stats["truncated"]:
        log.warning("%d training examples longer than data.max_length=%d were cut inside the question",
                    enc_stats["truncated"], cfg.data.max_length)
    if enc_stats["dropped_too_long"]:
        log.warning("%d examples dropped: options alone exceed data.max_length (first: %s)",
                    enc_stats["dropped_too_long"], ", ".join(enc_stats["dropped_where"][:3]))
    manifest["encoding"] = {k: v for k, v in enc_stats.items() if k != "dropped_where"}
    example_prompt, example_target = render_example(train_records[0], tokenizer, cfg.data.prompt_format)
    manifest["prompt"] = {
        "format": cfg.data.prompt_format,
        "instruction": CHAT_INSTRUCTION if cfg.data.prompt_format == "chat" else PLAIN_TEMPLATE,
        "example": {"id": train_records[0].id, "prompt": example_prompt, "target": example_target},
    }
    eval_subset = eval_records[: cfg.data.eval_max_samples] if cfg.data.eval_max_samples else eval_records

    # No KV cache while training: it costs memory, and with a cache transformers does not detect packed
    # sequences from their position ids (examples would attend across their boundaries).
    model = load_base_model(cfg.model, device=device, use_cache=False)
    manifest["base_model"] = base_fingerprint(model, tokenizer)  # what eval, serve and merge check an adapter by
    if cfg.train.liger:
        apply_liger(model, device, fused_cross_entropy=not cfg.train.sparse_logits)
    model = add_lora(model, cfg.lora, quantized=cfg.model.quantization == "4bit", peft_class=LoraForTraining)
    if cfg.lora.init in MUTATING_INITS and is_main_process():
        save_initial_adapter(model, out, resume)
    trainable, total = count_parameters(model)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.train.packing and cfg.train.batch_tokens and cfg.model.attn_implementation == "flex_attention":
        install_packed_block_mask(model)
    if cfg.train.compile:
        compile_layers(model)
    collator = make_collator(tokenizer, cfg.train, cfg.data.max_length)
    counter = None
    if cfg.train.batch_tokens:
        collator = counter = CountingCollator(collator)
    train_dataset: list[dict] | PlannedBatches = features
    if cfg.train.batch_tokens:
        plan = plan_batches([len(f["input_ids"]) for f in features], cfg.train.batch_tokens, cfg.train.packing,
                            seed=cfg.train.seed)
        train_dataset = PlannedBatches(features, plan)
        log.info("%d examples in %d micro-batches of at most %d tokens (%s)", len(features), len(plan),
                 cfg.train.batch_tokens, "packed" if cfg.train.packing else "grouped by length")
    metrics = MetricsCallback(out / "metrics.jsonl", append=resume, counter=counter)
    held_out = HeldOutEvalCallback(cfg, eval_subset, tokenizer, metrics, out, manifest)
    stop = StopOnSigterm(sigterm or Sigterm())
    args = training_arguments(cfg, out, dtype, device)
    if torch.cuda.device_count() > 1 and args.world_size == 1:
        log.info("%d GPUs visible: training on one; use accelerate launch or torchrun for all of them",
                 torch.cuda.device_count())
    trainer = LawtuneTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[stop, metrics, held_out, GcPauses()],
        compute_loss_func=sparse_logits_loss if cfg.train.sparse_logits else None,
        counter=counter,
    )
    held_out.trainer = trainer
    if cfg.lora.init in MUTATING_INITS and (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        # the conversion at save time reads the whole adapter in one process
        raise ConfigError(f"lora.init: {cfg.lora.init} adapters are converted to a plain LoRA when saved, which "
                          f"lawtune does under DDP or on one GPU, not FSDP or DeepSpeed; use init default or gaussian")
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    log.info("model %s on %s (%s): %s trainable LoRA parameters of %s (%.2f%%)", cfg.model.path, device,
             str(dtype).replace("torch.", ""), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    log.info("data: %d train / %d held-out questions (%d scored during training) -> %s", len(train_records),
             len(eval_records), len(eval_subset), out / "data")
    return SFTRun(cfg=cfg, trainer=trainer, model=model, tokenizer=tokenizer, manifest=manifest, out=out,
                  held_out=held_out, n_train=len(features), stop=stop)


def fit(run: SFTRun, resume: bool = False) -> SFTResult:
    trainer, out = run.trainer, run.out
    result = train_to_the_end(trainer, run.held_out, run.stop, resume_checkpoint(out, resume))
    final = out / "final_model"
    save_model_dir(trainer.model, run.tokenizer, run.cfg, {**run.manifest, FINAL_STEPS: trainer.state.global_step},
                   final, trainer=trainer, card=partial(write_card, run_dir=out))
    if is_main_process():
        write_curves(out / "metrics.jsonl", out / "curves.png")
        refresh_cards(out)
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    train_loss = float(result.training_loss) if result is not None else float("nan")  # nan: no step in this session
    return SFTResult(
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else train_loss,
        train_loss=train_loss,
        final_model=str(final),
        best_eval_accuracy=run.held_out.best if run.held_out.history else None,
        eval_history=run.held_out.history,
        output_dir=str(out),
    )


def train(cfg: TrainRun, resume: bool = False, overwrite: bool = False) -> SFTResult:
    """Run a whole training job from a config. SIGTERM ends it after the step in progress, with a checkpoint
    (``Preempted``); --resume of a run already at train.max_steps raises ``RunFinished``."""
    with Sigterm(what="stopping after this optimizer step") as sigterm:
        return fit(setup(cfg, resume=resume, overwrite=overwrite, sigterm=sigterm), resume=resume)


