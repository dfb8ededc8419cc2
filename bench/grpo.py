"""GRPO step time: `lawtune grpo` (its trainer, rollouts on lawtune's engine) against TRL's GRPOTrainer with its
defaults (rollouts through transformers' generate), same model, LoRA, group and completion lengths, in one run.

    python bench/grpo.py --model-dir ../shared/deepseek-r1-distill-qwen-1.5b --json grpo.json   # one GPU
    python bench/grpo.py --smoke                                                                # CPU, seconds

The model is the config's architecture with random weights (bf16 on a GPU); prompts are JEC-QA-shaped
(bench/jecqa_synth.py) in lawtune's reasoning format; every completion is forced to its length (the end token
ignored), so both sides generate and train on the same number of tokens. A step samples all its completions in one
generation; lawtune then trains them 32 at a time (its grpo yaml), TRL 8 at a time (its default micro-batch), both
with gradient checkpointing (TRL's default); lawtune's side as its grpo yaml runs it (the training pass on packed
rows under flex attention with compiled layers, rollouts on the folded adapter), or with `--impls
lawtune_padded,...` TRL's padded pass (grpo.packed=false, sdpa). Per side and length:
seconds per step split into rollout (generation), reward and training (the rest), rollout tokens/s (completion tokens /
time in generation), training tokens/s (prompt + completion tokens / the training part), peak reserved GPU memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jecqa_synth  # noqa: E402


class StepClock:
    """Wall time of each optimizer step and the time spent generating in it."""

    def __init__(self):
        self.steps: list[tuple[float, float, float, int]] = []  # (seconds, rollout seconds, reward seconds, tokens)
        self.rollout = 0.0
        self.reward = 0.0
        self.started = 0.0
        self.tokens = 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _sync()
                clock.started, clock.rollout, clock.reward = time.perf_counter(), 0.0, 0.0
                clock.tokens = state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kwargs):
                _sync()
                clock.steps.append((time.perf_counter() - clock.started, clock.rollout, clock.reward,
                                    state.num_input_tokens_seen - clock.tokens))

        return Clock()


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(clock: StepClock, work, part: str = "rollout"):
    """``work`` with its time added to the clock's ``part`` (rollout or reward)."""

    def run(*args, **kwargs):
        _sync()
        t0 = time.perf_counter()
        out = work(*args, **kwargs)
        _sync()
        setattr(clock, part, getattr(clock, part) + time.perf_counter() - t0)
        return out

    return run


def summary(name: str, length: int, clock: StepClock, warmup: int, completions: int) -> dict:
    timed = clock.steps[warmup:] or clock.steps
    seconds, rollout, reward, tokens = (sum(step[i] for step in timed) / len(timed) for i in range(4))
    generated = completions * length
    training = seconds - rollout - reward
    return {"bench": "grpo", "impl": name, "completion_tokens": length, "completions_per_step": completions,
            "steps_timed": len(timed), "s_per_step": round(seconds, 3),
            # the untimed warm-up steps, each: the first compiles (flex attention's kernels: minutes on a fresh machine)
            "warmup_s": [round(step[0], 1) for step in clock.steps[:warmup]], "rollout_s": round(rollout, 3),
            "reward_s": round(reward, 5), "train_s": round(training, 3),
            "rollout_tokens_per_s": round(generated / rollout, 1) if rollout else None,
            "train_tokens_per_s": round(tokens / max(training, 1e-9), 1),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if torch.cuda.is_available() else None}


def run_lawtune(opts, work: Path, data: Path, length: int, micro: int, overrides: list[str]) -> dict:
    from lawtune.config import GrpoRun, load_config
    from lawtune.train.grpo import EngineRollout, setup

    completions = opts.group * opts.questions
    cfg = load_config(None, [
        f"model.path={work / 'model'}", f"data.train={data}", "data.eval_fraction=0", f"data.max_length={length + 1024}",
        f"grpo.output_dir={work / f'lawtune_{length}_{micro}'}", f"grpo.num_generations={opts.group}",
        f"grpo.per_device_batch_size={micro}", f"grpo.gradient_accumulation_steps={completions // micro}",
        f"grpo.max_completion_length={length}", f"grpo.max_steps={opts.warmup + opts.steps}", "grpo.save_steps=100000",
        "grpo.report_to=[none]", "grpo.rollout=engine", *(["model.dtype=float32"] if opts.smoke else []),
        *overrides,
    ], run_cls=GrpoRun)

    class Forced(EngineRollout):
        def sampling(self, n, end_ids=()):
            import dataclasses

            return dataclasses.replace(super().sampling(n, end_ids), ignore_eos=True)

    run = setup(cfg, overwrite=True)
    clock = StepClock()
    engine_rollout = run.trainer.rollout_func  # grpo.rollout=engine: the EngineRollout, whose engines it shares
    run.trainer.rollout_func = _timed(clock, Forced(run.cfg, run.tokenizer, engine_rollout.ids_by_prompt,
                                                    engine_rollout.engines))
    # The hook compat.py routes TRL's reward step through, timed on this one trainer.
    run.trainer.calculate_rewards_hook = _timed(clock, run.trainer.calculate_rewards_hook, "reward")
    run.trainer.add_callback(clock.callback())
    run.trainer.train()
    return summary("lawtune", length, clock, opts.warmup, completions)


def run_trl(opts, work: Path, data: Path, length: int) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lawtune.config import PROJECTIONS
    from lawtune.data import load_records
    from lawtune.prompts import render_prompt
    from lawtune.train.rewards import exact_set

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    records = load_records(data).records
    dataset = Dataset.from_list([{"prompt": render_prompt(r, tokenizer, "chat", think=True), "answer": r.answer,
                                  "letters": "".join(r.options)} for r in records])
    device = "cpu" if opts.smoke or not torch.cuda.is_available() else "cuda"
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                                                 attn_implementation="sdpa").to(device)
    completions = opts.group * opts.questions
    clock = StepClock()

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *args, **kwargs):
            return _timed(clock, super()._generate_single_turn)(*args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            return _timed(clock, super()._calculate_rewards, "reward")(*args, **kwargs)

    args = GRPOConfig(output_dir=str(work / f"trl_{length}"), num_generations=opts.group,
                      # TRL's default micro-batch (8), accumulated to the step's completions: one generation a step
                      per_device_train_batch_size=opts.trl_micro,
                      gradient_accumulation_steps=completions // opts.trl_micro,
                      max_completion_length=length, max_steps=opts.warmup + opts.steps, save_strategy="no",
                      report_to="none", logging_steps=1, disable_tqdm=True,
                      generation_kwargs={"min_new_tokens": length},  # forced to its length, as on lawtune's side
                      **({"use_cpu": True, "bf16": False} if device == "cpu" else {}))
    trainer = Timed(model=model, reward_funcs=[exact_set], args=args, train_dataset=dataset, processing_class=tokenizer,
                    peft_config=LoraConfig(r=16, lora_alpha=16, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"),
                    callbacks=[clock.callback()])
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # its per-step dicts would bury the table
    trainer.train()
    return summary("trl", length, clock, opts.warmup, completions)


def prepare(opts, work: Path) -> Path:
    tokenizer = jecqa_synth.save_bench_model(opts.model_dir, opts.smoke, work / "model")
    rows = jecqa_synth.eval_rows(tokenizer, max(64, opts.questions * (opts.warmup + opts.steps)),
                                 scale=0.3 if opts.smoke else 1.0)
    for row in rows:
        row["answer"] = ["A"]
    return jecqa_synth.write_jsonl(rows, work / "questions.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="config.json + tokenizer of the architecture (random weights are built)")
    ap.add_argument("--lengths", default="512,1024", help="completion lengths, comma-separated")
    ap.add_argument("--group", type=int, default=8, help="completions per question")
    ap.add_argument("--questions", type=int, default=8, help="questions per step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (graph capture, allocator)")
    ap.add_argument("--micro", default="32",
                    help="lawtune's completions per forward/backward (the grpo yaml's 32); a comma list runs lawtune's "
                         "sides once each, in one process")
    ap.add_argument("--trl-micro", type=int, default=8, help="TRL's (its default per_device_train_batch_size)")
    ap.add_argument("--set", nargs="*", default=[], help="key=value overrides of lawtune's side (e.g. grpo.gradient_checkpointing=true)")
    ap.add_argument("--impls", default="lawtune,trl",
                    help="sides to run: lawtune, lawtune_padded (lawtune with grpo.packed=false: TRL's padded "
                         "training pass), trl")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, tiny sizes (tests/test_bench.py)")
    opts = ap.parse_args()
    if opts.smoke:
        opts.lengths, opts.group, opts.questions, opts.steps, opts.trl_micro = "8", 2, 2, 2, 2
        opts.micro = "2" if opts.micro == "32" else opts.micro
    try:
        micros = [int(m) for m in opts.micro.split(",")]
    except ValueError:
        ap.error(f"--micro {opts.micro!r}: whole numbers, comma-separated")
    for flag, micro in [*(("--micro", m) for m in micros), ("--trl-micro", opts.trl_micro)]:
        if (opts.group * opts.questions) % micro:
            ap.error(f"{flag} {micro} must divide the {opts.group * opts.questions} completions of a step")
    import logging
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(opts, work)
        sides = [(impl, micro) for impl in opts.impls.split(",")
                 for micro in ([opts.trl_micro] if impl == "trl" else micros)]
        for length in map(int, opts.lengths.split(",")):
            for impl, micro in sides:
                gc.collect()  # the previous side's trainer, engine and graphs: their memory must not count here
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                # lawtune's side as its grpo yaml runs it: one packed row a micro-batch under flex's document mask,
                # compiled layers (its first step compiles both: the warm-up step), rollouts on the folded adapter
                # (grpo.fold_adapter's default); the padded side as the tenth session
                # measured it (sdpa). --set comes last, so it decides (model.attn_implementation=sdpa: packed rows
                # as long as the longest sequence).
                side = (["grpo.packed=false"] if impl == "lawtune_padded"
                        else ["model.attn_implementation=flex_attention", "grpo.compile=true"])
                overrides = side + opts.set
                if impl == "trl":
                    row = run_trl(opts, work, data, length)
                else:
                    row = run_lawtune(opts, work, data, length, micro, overrides)
                    row["impl"] = impl
                row["micro_batch"] = micro
                row["overrides"] = [] if impl == "trl" else overrides
                row["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() and not opts.smoke else "cpu"
                rows.append(row)
                print(json.dumps(row), flush=True)
                if opts.json:  # row by row: a run cut short by a time limit keeps the sides it finished
                    Path(opts.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    by: dict = {}
    for r in rows:  # lawtune's first micro-batch where several ran
        by.setdefault((r["impl"], r["completion_tokens"]), r)
    print(f"\n{'impl':14} {'tokens':>6} {'micro':>5} {'s/step':>8} {'rollout':>8} {'reward':>7} {'train':>7} "
          f"{'rollout tok/s':>14} {'train tok/s':>12} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['impl']:14} {r['completion_tokens']:>6} {r['micro_batch']:>5} {r['s_per_step']:>8} "
              f"{r['rollout_s']:>8} {r['reward_s']:>7} {r['train_s']:>7} {r['rollout_tokens_per_s']!s:>14} "
              f"{r['train_tokens_per_s']:>12} {r['peak_reserved_gib']!s:>9}")
    for length in map(int, opts.lengths.split(",")):
        a, b = by.get(("lawtune", length)), by.get(("trl", length))
        if a and b:
            ratio = {"bench": "grpo_ratio", "completion_tokens": length,
                     "speedup_s_per_step": round(b["s_per_step"] / a["s_per_step"], 2),
                     "rollout_speedup": round(a["rollout_tokens_per_s"] / b["rollout_tokens_per_s"], 2)}
            rows.append(ratio)
            print(json.dumps(ratio))
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
