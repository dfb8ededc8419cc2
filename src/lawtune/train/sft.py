"""LoRA SFT on JEC-QA: setup -> fit, on top of transformers' Trainer and peft.

The Trainer owns the loop, gradient accumulation, mixed precision, checkpointing, resume and the
optimizer (8-bit AdamW comes from bitsandbytes through ``optim``); lawtune adds what the task
needs: the data split, prompt rendering and masking, an in-process held-out evaluation, and
atomic, self-describing output directories (``rundir.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainingArguments, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from ..config import ModelConfig, TrainRun, resolve_output_dir
from ..data import drop_overlap, load_records, sha256_file, split_records, write_jsonl
from ..dist import is_main_process
from ..model import add_lora, base_fingerprint, count_parameters, load_base_model, load_tokenizer, resolve_device, resolve_dtype
from ..prompts import CHAT_INSTRUCTION, PLAIN_TEMPLATE, encode_records, render_example
from ..rundir import (STATEMENT_KEY_VERSION, prepare_run_dir, resume_checkpoint, run_fingerprint, save_model_dir,
                      statement_hash)
from .callbacks import GcPauses, HeldOutEvalCallback, MetricsCallback
from .collate import CountingCollator, PlannedBatches, make_collator, plan_batches
from .kernels import apply_liger, compile_layers, install_packed_block_mask
from .loss import sparse_logits_loss
from .trainer import LawtuneTrainer, LawtuneTrainingArguments, LoraForTraining

log = logging.getLogger("lawtune")


# ----------------------------------------------------------------------------- data


def prepare_data(cfg: TrainRun, out: Path) -> tuple[list, list, dict]:
    """Load, split and write the split actually used; returns (train, eval, manifest)."""
    loaded = load_records(cfg.data.train, require_answer=True, max_samples=cfg.data.max_samples, fmt=cfg.data.format)
    manifest: dict = {
        "files": [{"role": "train", "path": str(Path(cfg.data.train).resolve()), "sha256": sha256_file(cfg.data.train),
                   "records": len(loaded.records), "skipped": loaded.skipped}],
        "max_samples": cfg.data.max_samples,
        "split_seed": cfg.data.seed,
    }
    for reason, count in loaded.skipped.items():
        log.warning("%s: skipped %d records (%s)", cfg.data.train, count, reason)
    if cfg.data.eval:
        held = load_records(cfg.data.eval, require_answer=True, fmt=cfg.data.format)
        train_records, overlap = drop_overlap(loaded.records, held.records)
        eval_records = held.records
        manifest["files"].append({"role": "eval", "path": str(Path(cfg.data.eval).resolve()),
                                  "sha256": sha256_file(cfg.data.eval), "records": len(held.records),
                                  "skipped": held.skipped})
        manifest["dropped_train_overlapping_eval"] = overlap
        if overlap:
            log.warning("dropped %d training records whose statement is in the eval file", overlap)
    else:
        train_records, eval_records = split_records(loaded.records, cfg.data.eval_fraction, cfg.data.seed)
    if not train_records:
        raise ValueError(f"{cfg.data.train}: no training records left after the split")
    if cfg.data.mix:
        train_records = train_records + mix_answer_only(cfg, len(train_records), eval_records, manifest)
    manifest["split"] = {"train": len(train_records), "eval": len(eval_records)}
    if is_main_process():
        write_jsonl(train_records, out / "data" / "train.jsonl")
        write_jsonl(eval_records, out / "data" / "eval.jsonl")
    manifest["split_files"] = {"train": "data/train.jsonl", "eval": "data/eval.jsonl"}
    manifest["train_statements_sha256"] = sorted({statement_hash(r) for r in train_records})
    manifest["train_statements_key"] = STATEMENT_KEY_VERSION
    return train_records, eval_records, manifest


def mix_answer_only(cfg: TrainRun, n_train: int, eval_records: list, manifest: dict) -> list:
    """Answer-only copies of ``data.mix_ratio`` x n_train records of ``data.mix`` (seeded), none sharing a statement
    with the held-out split; their ids get ``#direct`` (the same question may also be a trace)."""
    import random

    mixed = load_records(cfg.data.mix, require_answer=True, fmt=cfg.data.format)
    pool, overlap = drop_overlap(mixed.records, eval_records)
    want = round(cfg.data.mix_ratio * n_train)
    if want > len(pool):
        log.warning("data.mix: %d answer-only records asked for (data.mix_ratio=%s), %s holds %d; using all",
                    want, cfg.data.mix_ratio, cfg.data.mix, len(pool))
    chosen = random.Random(cfg.data.seed).sample(pool, min(want, len(pool)))
    manifest["files"].append({"role": "mix", "path": str(Path(cfg.data.mix).resolve()),
                              "sha256": sha256_file(cfg.data.mix), "records": len(mixed.records),
                              "skipped": mixed.skipped})
    manifest["mix"] = {"ratio": cfg.data.mix_ratio, "answer_only_records": len(chosen),
                       "dropped_overlapping_eval": overlap}
    return [dataclasses.replace(r, reasoning=None, id=f"{r.id}#direct") for r in chosen]


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


@dataclass
class SFTResult:
    steps: int
    final_loss: float
    train_loss: float
    final_model: str
    best_eval_accuracy: float | None
    eval_history: list[dict]
    output_dir: str


def shared_arguments(section, out: Path, dtype: torch.dtype, device: torch.device) -> dict:
    """The Trainer arguments `train` and `grpo` take alike from their section (``train`` or ``grpo``, whose
    optimizer, schedule, logging and checkpoint fields have the same names)."""
    s = section
    return dict(
        output_dir=str(out),
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        learning_rate=s.learning_rate,
        max_steps=s.max_steps,
        warmup_steps=s.warmup_steps,
        lr_scheduler_type=s.lr_scheduler_type,
        weight_decay=s.weight_decay,
        max_grad_norm=s.max_grad_norm,
        optim=s.optim,
        logging_steps=s.logging_steps,
        save_strategy="steps",
        save_steps=s.save_steps,
        save_total_limit=s.save_total_limit,
        eval_strategy="no",
        seed=s.seed,
        # Said explicitly: TRL's GRPOConfig turns bf16 on unless told (autocast to a slow dtype on a CPU).
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        # passed only when on: transformers 5 warns about the old name whenever it is given
        **({"gradient_checkpointing": True} if s.gradient_checkpointing else {}),
        report_to=[r for r in s.report_to if r != "none"] or "none",
        remove_unused_columns=False,
        disable_tqdm=True,
    )


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


def cpu_model_fallbacks(model: ModelConfig) -> ModelConfig:
    """The model settings a CPU cannot train with, replaced (and said): PyTorch's flex attention has no CPU
    backward; half precision is many times slower than float32 there."""
    if model.attn_implementation == "flex_attention":
        log.warning("model.attn_implementation: flex_attention cannot train on the CPU; using sdpa "
                    "(packed examples stay apart through their position ids)")
        model = dataclasses.replace(model, attn_implementation="sdpa")
    if model.dtype in ("float16", "bfloat16"):
        # issue 15 reports fp16 16x slower than fp32 on a CPU for a tiny model (56 vs 918 tokens/s); not re-measured
        log.warning("model.dtype: %s is many times slower than float32 on a CPU; training in float32", model.dtype)
        model = dataclasses.replace(model, dtype="float32")
    return model


def cpu_fallbacks(cfg: TrainRun, device: torch.device) -> TrainRun:
    """The GPU defaults must still run on a laptop: besides the model's fallbacks, compiling every layer costs
    minutes there for no gain. Returns the config that will run (saved with the model)."""
    if device.type != "cpu":
        return cfg
    train = cfg.train
    if train.compile:
        log.warning("train.compile: skipped on the CPU")
        train = dataclasses.replace(train, compile=False)
    return dataclasses.replace(cfg, model=cpu_model_fallbacks(cfg.model), train=train)


def start_run(cfg, section: str, fingerprint, fallbacks, resume: bool, overwrite: bool):
    """The opening of a training command (``section`` "train" or "grpo"): its GPU, device, CPU ``fallbacks``,
    dtype, the output folder prepared for this run (``fingerprint``), the seed. Returns (config as it will run,
    recording its output folder; output folder; device; dtype)."""
    if cfg.model.gpu is not None and "LOCAL_RANK" not in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(cfg.model.gpu)
    out = resolve_output_dir(cfg)
    device = resolve_device(cfg.model)
    cfg = fallbacks(cfg, device)
    dtype = resolve_dtype(cfg.model, device)
    prepare_run_dir(out, fingerprint(cfg), resume, overwrite, main=is_main_process())
    own = getattr(cfg, section)
    set_seed(own.seed)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(own, output_dir=str(out))}), out, device, dtype


def setup(cfg: TrainRun, resume: bool = False, overwrite: bool = False) -> SFTRun:
    """Everything before the loop: data, tokenizer, model with LoRA, Trainer.

    A folder that holds a run is continued only with ``resume`` (and only by the same run) and replaced only with
    ``overwrite`` (``rundir.prepare_run_dir``)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, out, device, dtype = start_run(cfg, "train", run_fingerprint, cpu_fallbacks, resume, overwrite)
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
    train_dataset = features
    if cfg.train.batch_tokens:
        plan = plan_batches([len(f["input_ids"]) for f in features], cfg.train.batch_tokens, cfg.train.packing,
                            seed=cfg.train.seed)
        train_dataset = PlannedBatches(features, plan)
        log.info("%d examples in %d micro-batches of at most %d tokens (%s)", len(features), len(plan),
                 cfg.train.batch_tokens, "packed" if cfg.train.packing else "grouped by length")
    metrics = MetricsCallback(out / "metrics.jsonl", append=resume, counter=counter)
    held_out = HeldOutEvalCallback(cfg, eval_subset, tokenizer, metrics, out, manifest)
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
        callbacks=[metrics, held_out, GcPauses()],
        compute_loss_func=sparse_logits_loss if cfg.train.sparse_logits else None,
        counter=counter,
    )
    held_out.trainer = trainer
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    log.info("model %s on %s (%s): %s trainable LoRA parameters of %s (%.2f%%)", cfg.model.path, device,
             str(dtype).replace("torch.", ""), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    log.info("data: %d train / %d held-out questions (%d scored during training) -> %s", len(train_records),
             len(eval_records), len(eval_subset), out / "data")
    return SFTRun(cfg=cfg, trainer=trainer, model=model, tokenizer=tokenizer, manifest=manifest, out=out,
                  held_out=held_out, n_train=len(features))


def fit(run: SFTRun, resume: bool = False) -> SFTResult:
    trainer, out = run.trainer, run.out
    checkpoint = resume_checkpoint(out, resume)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = out / "final_model"
    save_model_dir(trainer.model, run.tokenizer, run.cfg, run.manifest, final, trainer=trainer)
    if is_main_process():
        write_curves(out / "metrics.jsonl", out / "curves.png")
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return SFTResult(
        steps=trainer.state.global_step,
        final_loss=losses[-1] if losses else float(result.training_loss),
        train_loss=float(result.training_loss),
        final_model=str(final),
        best_eval_accuracy=run.held_out.best if run.held_out.history else None,
        eval_history=run.held_out.history,
        output_dir=str(out),
    )


def train(cfg: TrainRun, resume: bool = False, overwrite: bool = False) -> SFTResult:
    """Run a whole training job from a config."""
    return fit(setup(cfg, resume=resume, overwrite=overwrite), resume=resume)


def write_curves(metrics_path: Path, png_path: Path, key: str = "loss", label: str = "train loss") -> None:
    """A training series (``key``: the loss, or grpo's reward) and held-out accuracy against step, for a quick look
    at a run."""
    if not metrics_path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    loss = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
    acc = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(label, color="tab:blue")
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "o-", color="tab:orange", label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
