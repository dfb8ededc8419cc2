"""LoRA SFT on JEC-QA: setup -> main -> fit, on top of transformers' Trainer and peft.

The Trainer owns the loop, gradient accumulation, mixed precision, checkpointing, resume and the
optimizer (8-bit AdamW comes from bitsandbytes through ``optim``); lawtune adds what the task
needs: the data split, prompt rendering and masking, an in-process held-out evaluation, and
atomic, self-describing output directories.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from .config import Config, resolve_output_dir, save_config
from .data import drop_overlap, load_records, sha256_file, split_records, write_jsonl
from .fast import (CountingCollator, GcPauses, PlannedBatches, apply_liger, compile_layers, install_packed_block_mask,
                   make_collator, plan_batches, sparse_logits_loss, trim_step_overhead)
from .model import (add_lora, count_parameters, load_base_model, load_tokenizer, resolve_device, resolve_dtype,
                    world_size)
from .prompts import CHAT_INSTRUCTION, PLAIN_TEMPLATE, encode_records, render_example

log = logging.getLogger("lawtune")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ----------------------------------------------------------------------------- data


def prepare_data(cfg: Config, out: Path) -> tuple[list, list, dict]:
    """Load, split and write the split actually used; returns (train, eval, manifest)."""
    loaded = load_records(cfg.data.train, require_answer=True, max_samples=cfg.data.max_samples)
    manifest: dict = {
        "files": [{"role": "train", "path": str(Path(cfg.data.train).resolve()), "sha256": sha256_file(cfg.data.train),
                   "records": len(loaded.records), "skipped": loaded.skipped}],
        "max_samples": cfg.data.max_samples,
        "split_seed": cfg.data.seed,
    }
    for reason, count in loaded.skipped.items():
        log.warning("%s: skipped %d records (%s)", cfg.data.train, count, reason)
    if cfg.data.eval:
        held = load_records(cfg.data.eval, require_answer=True)
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
    manifest["split"] = {"train": len(train_records), "eval": len(eval_records)}
    if is_main_process():
        write_jsonl(train_records, out / "data" / "train.jsonl")
        write_jsonl(eval_records, out / "data" / "eval.jsonl")
    manifest["split_files"] = {"train": "data/train.jsonl", "eval": "data/eval.jsonl"}
    manifest["train_statements_sha256"] = sorted({_statement_hash(r) for r in train_records})
    return train_records, eval_records, manifest


def _statement_hash(record) -> str:
    import hashlib

    from .data import statement_key

    return hashlib.sha256(statement_key(record).encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------- saving


def save_model_dir(model, tokenizer, cfg: Config, manifest: dict, dest: Path, trainer: Trainer | None = None) -> Path:
    """Write adapter + tokenizer + config + manifest atomically: a crash never leaves half a model.

    With a trainer, every rank must call this: Trainer.save_model gathers sharded (FSDP) weights
    collectively and writes on the main process only.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if trainer is not None:
        if trainer.is_world_process_zero() and tmp.exists():
            shutil.rmtree(tmp)
        trainer.accelerator.wait_for_everyone()
        trainer.save_model(str(tmp))
        if not trainer.is_world_process_zero():
            trainer.accelerator.wait_for_everyone()
            return dest
        (tmp / "training_args.bin").unlink(missing_ok=True)
    else:
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_config(cfg, tmp / "lawtune_config.yaml")
    (tmp / "data_manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old)
    else:
        os.replace(tmp, dest)
    if trainer is not None:
        trainer.accelerator.wait_for_everyone()
    return dest


# ----------------------------------------------------------------------------- callbacks


def sum_over_ranks(value: int) -> int:
    """value summed over the processes of a distributed job (the value itself in a single process)."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


class MetricsCallback(TrainerCallback):
    """Progress bar with loss, lr and tokens/s, and one JSON line per log in metrics.jsonl."""

    def __init__(self, path: Path, append: bool, counter=None):
        self.path = path
        self.counter = counter  # a CountingCollator: tokens counted on the CPU, else the Trainer's count
        if not append and path.exists() and is_main_process():
            path.unlink()
        self.bar = None
        self.last = (0, time.time())

    def seen(self, state) -> int:
        """Real tokens trained so far, all ranks together. Every rank calls this at the same points (train
        begin and each loss log), so the sum across ranks is one small all-reduce per log, not per step."""
        if self.counter is None:
            return state.num_input_tokens_seen
        return sum_over_ranks(self.counter.tokens)

    def write(self, row: dict) -> None:
        if is_main_process():
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if is_main_process():
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True)
        self.last = (self.seen(state), time.time())

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.time()
        tokens, then = self.last
        if "loss" in logs and now > then:
            seen = self.seen(state)
            logs["tokens_per_s"] = round((seen - tokens) / (now - then), 1)
            self.last = (seen, now)
            # cumulative trained tokens (all ranks) and wall time, so any interval's rate can be checked
            logs["tokens_seen"] = seen
            logs["time"] = round(now, 3)
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        self.write(row)
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}",
                                 tok_s=f"{logs.get('tokens_per_s', 0):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class HeldOutEvalCallback(TrainerCallback):
    """Score the live model in-process on the held-out split; keep the best adapter."""

    def __init__(self, cfg: Config, records: list, tokenizer, metrics: MetricsCallback, out: Path, manifest: dict):
        self.cfg, self.records, self.tokenizer = cfg, records, tokenizer
        self.metrics, self.out, self.manifest = metrics, out, manifest
        self.best = -1.0
        self.history: list[dict] = []
        self.trainer: Trainer | None = None  # set once the Trainer exists; saving goes through it

    def _run(self, state, model) -> None:
        from .evaluate import evaluate_sharded

        was_training = model.training
        model.eval()
        # Reasoning runs thousands of tokens a question: during training the cheap modes are used.
        ecfg = dataclasses.replace(self.cfg.eval, mode=self.cfg.eval.mode if self.cfg.eval.mode != "reasoning" else "direct")
        _, summary = evaluate_sharded(model, self.tokenizer, self.records, ecfg, self.cfg.data.prompt_format)
        if was_training:
            model.train()
        row = {"step": state.global_step, "eval_accuracy": summary["accuracy"], "eval_invalid": summary["invalid"],
               "eval_n": summary["n"], "eval_mode": ecfg.mode}
        self.history.append(row)
        self.metrics.write(row)
        state.log_history.append(dict(row))
        if is_main_process():
            tqdm.write(f"[eval] step {state.global_step}: accuracy {summary['accuracy']:.3f} "
                       f"on {summary['n']} held-out questions ({ecfg.mode}), invalid {summary['invalid']}")
        # Every rank holds the same gathered summary, so every rank takes the same branch here.
        if summary["accuracy"] > self.best:
            self.best = summary["accuracy"]
            manifest = {**self.manifest, "best": {"step": state.global_step, "eval_accuracy": self.best}}
            save_model_dir(model, self.tokenizer, self.cfg, manifest, self.out / "best_model", trainer=self.trainer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        steps = self.cfg.train.eval_steps
        if self.records and steps and state.global_step % steps == 0 and state.global_step < state.max_steps:
            self._run(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.records and (not self.history or self.history[-1]["step"] != state.global_step):
            self._run(state, model)


# ----------------------------------------------------------------------------- main


def training_arguments(cfg: Config, out: Path, dtype: torch.dtype, device: torch.device) -> TrainingArguments:
    t = cfg.train
    return TrainingArguments(
        output_dir=str(out),
        # With a token budget every dataset item is already a whole micro-batch.
        per_device_train_batch_size=1 if t.batch_tokens else t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler_type,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="no",
        seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=device.type == "cpu",
        # passed only when on: transformers 5 warns about the old name whenever it is given
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),
        report_to=[r for r in t.report_to if r != "none"] or "none",
        dataloader_num_workers=t.dataloader_num_workers,
        remove_unused_columns=False,
        # Padding-free batches have no padding to leave out; padded ones count attention-mask tokens.
        # (with a token budget lawtune counts on the CPU instead: transformers' count syncs with the GPU)
        include_num_input_tokens_seen=("no" if t.batch_tokens and t.dataloader_num_workers == 0
                                       else "all" if t.packing and not t.batch_tokens else "non_padding"),
        # No GPU->CPU sync after every micro-step to test the loss for NaN (a NaN then shows in the log).
        logging_nan_inf_filter=False,
        disable_tqdm=True,
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


def setup(cfg: Config, resume: bool = False) -> dict:
    """Everything before the loop: data, tokenizer, model with LoRA, Trainer."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.model.gpu is not None and "LOCAL_RANK" not in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(cfg.model.gpu)
    out = resolve_output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.train.seed)
    device = resolve_device(cfg.model)
    dtype = resolve_dtype(cfg.model, device)
    if device.type == "cpu":
        # The GPU defaults must still run on a laptop: PyTorch's flex attention has no CPU backward, and
        # compiling every layer costs minutes there for no gain. The saved config records what ran.
        if cfg.model.attn_implementation == "flex_attention":
            log.warning("model.attn_implementation: flex_attention cannot train on the CPU; using sdpa "
                        "(packed examples stay apart through their position ids)")
            cfg.model.attn_implementation = "sdpa"
        if cfg.train.compile:
            log.warning("train.compile: skipped on the CPU")
            cfg.train.compile = False

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

    model = load_base_model(cfg.model, device=device)
    if cfg.train.liger:
        apply_liger(model, device, fused_cross_entropy=not cfg.train.sparse_logits)
    # No KV cache while training: it costs memory, and with a cache transformers does not detect packed
    # sequences from their position ids (examples would attend across their boundaries).
    model.config.use_cache = False
    model = add_lora(model, cfg.lora, quantized=cfg.model.quantization == "4bit")
    trainable, total = count_parameters(model)
    if cfg.train.gradient_checkpointing:
        model.enable_input_require_grads()
    if cfg.train.packing and cfg.train.batch_tokens and cfg.model.attn_implementation == "flex_attention":
        install_packed_block_mask(model)
    if cfg.train.compile:
        compile_layers(model)
    collator = make_collator(tokenizer, cfg.train, cfg.data.max_length)
    counter = None
    if cfg.train.batch_tokens and cfg.train.dataloader_num_workers == 0:
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
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, out, dtype, device),
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[metrics, held_out],
        compute_loss_func=sparse_logits_loss if cfg.train.sparse_logits else None,
    )
    held_out.trainer = trainer
    if trainer.args.n_gpu > 1:
        # Several visible GPUs in one process would make the Trainer wrap the model in nn.DataParallel, which
        # replicates the model every step and is not what compiled layers, flex attention and the token
        # budget are built for. Several GPUs are used through one process each (accelerate launch /
        # torchrun), as documented; transformers sets n_gpu to 1 the same way for models it spreads itself.
        log.info("%d GPUs visible: training on one; use accelerate launch or torchrun for all of them", trainer.args.n_gpu)
        trainer.args._n_gpu = 1
    trim_step_overhead(trainer)
    trainer.add_callback(GcPauses())
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    log.info("model %s on %s (%s): %s trainable LoRA parameters of %s (%.2f%%)", cfg.model.path, device,
             str(dtype).replace("torch.", ""), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    log.info("data: %d train / %d held-out questions (%d scored during training) -> %s", len(train_records),
             len(eval_records), len(eval_subset), out / "data")
    return {"trainer": trainer, "model": model, "tokenizer": tokenizer, "manifest": manifest, "out": out,
            "held_out": held_out, "n_train": len(features)}


def fit(cfg: Config, parts: dict, resume: bool = False) -> dict:
    trainer, out = parts["trainer"], parts["out"]
    checkpoint = None
    if resume:
        checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
        if checkpoint:
            log.info("resuming from %s", checkpoint)
        else:
            log.warning("--resume: no checkpoint in %s, starting from scratch", out)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = out / "final_model"
    save_model_dir(trainer.model, parts["tokenizer"], cfg, parts["manifest"], final, trainer=trainer)
    if trainer.is_world_process_zero():
        write_curves(out / "metrics.jsonl", out / "curves.png")
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "steps": trainer.state.global_step,
        "final_loss": losses[-1] if losses else float(result.training_loss),
        "train_loss": float(result.training_loss),
        "final_model": str(final),
        "best_eval_accuracy": parts["held_out"].best if parts["held_out"].history else None,
        "eval_history": parts["held_out"].history,
        "output_dir": str(out),
    }


def train(cfg: Config, resume: bool = False) -> dict:
    """Run a whole training job from a config; returns a summary dict."""
    parts = setup(cfg, resume=resume)
    return fit(cfg, parts, resume=resume)


def write_curves(metrics_path: Path, png_path: Path) -> None:
    """Loss and held-out accuracy against step, for a quick look at a run."""
    if not metrics_path.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    loss = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    acc = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss), color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if acc:
        ax2 = ax.twinx()
        ax2.plot(*zip(*acc), "o-", color="tab:orange", label="held-out accuracy")
        ax2.set_ylabel("held-out accuracy", color="tab:orange")
        ax2.set_ylim(0, 1)
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
