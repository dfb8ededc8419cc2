"""What SFT (``sft.py``) and GRPO (``grpo.py``) share: the data split, the Trainer arguments their sections name
alike, the CPU fallbacks of the model settings, the opening of a run (device, dtype, output folder, seed) and the
curves plot. Neither training module imports the other; both import this one."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path

import torch
from transformers import set_seed

from ..config import GrpoRun, TrainRun
from ..config import replace as replace_config
from ..data import drop_overlap, load_records, sha256_file, split_records, write_jsonl
from ..dist import is_main_process
from ..errors import UsageError
from ..model import resolve_device, resolve_dtype
from ..preempt import Preempted
from ..rundir import (
    STATEMENT_KEY_VERSION,
    TRAINER_STATE,
    RunFinished,
    checkpoint_step,
    finished_step,
    prepare_run_dir,
    resolve_output_dir,
    statement_hash,
)

log = logging.getLogger("lawtune")


# ----------------------------------------------------------------------------- data


def prepare_data(cfg: TrainRun | GrpoRun, out: Path) -> tuple[list, list, dict]:
    """Load, split and write the split actually used; returns (train, eval, manifest)."""
    loaded = load_records(cfg.data.train, require_answer=True, max_samples=cfg.data.max_samples, fmt=cfg.data.format,
                          question_type=cfg.data.type)
    manifest: dict = {
        "files": [{"role": "train", "path": str(Path(cfg.data.train).resolve()), "sha256": sha256_file(cfg.data.train),
                   "records": len(loaded.records), "skipped": loaded.skipped}],
        "max_samples": cfg.data.max_samples,
        "split_seed": cfg.data.seed,
    }
    for reason, count in loaded.skipped.items():
        log.warning("%s: skipped %d records (%s)", cfg.data.train, count, reason)
    if cfg.data.eval:
        held = load_records(cfg.data.eval, require_answer=True, fmt=cfg.data.format, question_type=cfg.data.type)
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
        raise UsageError(f"{cfg.data.train}: no training records left after the split")
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


def mix_answer_only(cfg: TrainRun | GrpoRun, n_train: int, eval_records: list, manifest: dict) -> list:
    """Answer-only copies of ``data.mix_ratio`` x n_train records of ``data.mix`` (seeded), none sharing a statement
    with the held-out split; their ids get ``#direct`` (the same question may also be a trace)."""
    import random

    mix = cfg.data.mix
    assert mix, "called only with a data.mix file"
    mixed = load_records(mix, require_answer=True, fmt=cfg.data.format, question_type=cfg.data.type)
    pool, overlap = drop_overlap(mixed.records, eval_records)
    want = round(cfg.data.mix_ratio * n_train)
    if want > len(pool):
        log.warning("data.mix: %d answer-only records asked for (data.mix_ratio=%s), %s holds %d; using all",
                    want, cfg.data.mix_ratio, mix, len(pool))
    chosen = random.Random(cfg.data.seed).sample(pool, min(want, len(pool)))
    manifest["files"].append({"role": "mix", "path": str(Path(mix).resolve()),
                              "sha256": sha256_file(mix), "records": len(mixed.records),
                              "skipped": mixed.skipped})
    manifest["mix"] = {"ratio": cfg.data.mix_ratio, "answer_only_records": len(chosen),
                       "dropped_overlapping_eval": overlap}
    return [dataclasses.replace(r, reasoning=None, id=f"{r.id}#direct") for r in chosen]


# ----------------------------------------------------------------------------- a run


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


def cpu_fallbacks(cfg, section: str, device: torch.device):
    """The GPU defaults of a training command (``section`` "train" or "grpo") replaced where they cannot run on a
    CPU, and said: PyTorch's flex attention has no CPU backward; half precision is many times slower than float32
    there; compiling every layer costs minutes for no gain. Returns the config that will run (saved with the
    model)."""
    if device.type != "cpu":
        return cfg
    model, own = cfg.model, getattr(cfg, section)
    if model.attn_implementation == "flex_attention":
        log.warning("model.attn_implementation: flex_attention cannot train on the CPU; using sdpa "
                    "(packed examples stay apart through their position ids)")
        model = replace_config(model, attn_implementation="sdpa")
    if model.dtype in ("float16", "bfloat16"):
        # issue 15 reports fp16 16x slower than fp32 on a CPU for a tiny model (56 vs 918 tokens/s); not re-measured
        log.warning("model.dtype: %s is many times slower than float32 on a CPU; training in float32", model.dtype)
        model = replace_config(model, dtype="float32")
    if own.compile:
        log.warning("%s.compile: skipped on the CPU", section)
        own = replace_config(own, compile=False)
    return replace_config(cfg, model=model, **{section: own})


def start_run(cfg, section: str, resume: bool, overwrite: bool):
    """The opening of a training command (``section`` "train" or "grpo"): its GPU, device, CPU fallbacks,
    dtype, the output folder prepared for this run, the seed. Returns (config as it will run,
    recording its output folder; output folder; device; dtype). ``resume`` of a run that has reached its max_steps
    raises ``RunFinished`` before anything is loaded or written."""
    if cfg.model.gpu is not None and "LOCAL_RANK" not in os.environ and torch.cuda.is_available():
        torch.cuda.set_device(cfg.model.gpu)
    out = resolve_output_dir(cfg)
    device = resolve_device(cfg.model)
    cfg = cpu_fallbacks(cfg, section, device)
    dtype = resolve_dtype(cfg.model, device)
    prepare_run_dir(out, cfg, resume, overwrite, main=is_main_process())
    own = getattr(cfg, section)
    done = finished_step(out) if resume else None
    if done is not None and done >= own.max_steps:
        of = f"of {done}" if done == own.max_steps else f"(past {section}.max_steps={own.max_steps})"
        raise RunFinished(f"already at step {done} {of}: nothing to do; the adapter is in {out / 'final_model'}")
    set_seed(own.seed)
    compiled = [name for name, on in (("flex attention", cfg.model.attn_implementation == "flex_attention"),
                                      (f"{section}.compile", own.compile)) if on]
    if device.type == "cuda" and compiled:
        # The progress bar stays at step 0 meanwhile; say why, so a quiet first step is not taken for a hang.
        log.info("the first step compiles the training kernels (%s): minutes on a fresh machine (one H200, the 1.5B "
                 "model: 128 s for train's, 354-393 s for grpo's)", ", ".join(compiled))
    return replace_config(cfg, **{section: replace_config(own, output_dir=str(out))}), out, device, dtype


def train_to_the_end(trainer, held_out, stop, checkpoint: str | None):
    """``trainer.train`` from ``checkpoint`` (None: from the start) to max_steps, then the held-out evaluation at the
    end; returns the Trainer's output (None where no step was left). A checkpoint at max_steps is of a run that
    stopped before its final model was written: its adapter is loaded and only the end is done. ``stop`` (a
    ``StopOnSigterm`` among the Trainer's callbacks) raises ``Preempted`` where SIGTERM came first. The held-out
    evaluation's engine is closed at the end, however the run ends."""
    try:
        return _train_to_the_end(trainer, held_out, stop, checkpoint)
    finally:
        held_out.close()


def _train_to_the_end(trainer, held_out, stop, checkpoint: str | None):
    if stop.requested():  # during setup: every rank stops before the first step
        raise Preempted(_before_first_step(checkpoint))
    output = None
    step = checkpoint_step(checkpoint)
    if checkpoint and step >= trainer.args.max_steps:
        from transformers import TrainerState

        log.info("%s is at max_steps=%d: the held-out evaluation at the end and the final model are left",
                 checkpoint, trainer.args.max_steps)
        trainer.state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
        model = trainer.model
        model.load_adapter(checkpoint, adapter_name=model.active_adapter, is_trainable=True)
        held_out.restore(step)
    else:
        output = trainer.train(resume_from_checkpoint=checkpoint)
        if stop.stopped_at is not None:
            if not stop.saved:
                raise Preempted(_before_first_step(checkpoint))
            raise Preempted(f"preempted at step {stop.stopped_at}; rerun with --resume")
    held_out.final(trainer.state, trainer.model)
    return output


def _before_first_step(checkpoint: str | None) -> str:
    newest = f" (the newest is still {Path(checkpoint).name})" if checkpoint else ""
    return f"preempted before the first step ended: no checkpoint written{newest}; rerun with --resume"


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
