#!/usr/bin/env python
"""Training throughput: the original recipe, the best TRL setup, and lawtune's own `lawtune train` path.

    python bench/train_throughput.py                  # full size, one GPU (see bench/README.md)
    python bench/train_throughput.py --smoke          # tiny model on the CPU, seconds (tests/test_bench.py)
    python bench/train_throughput.py --recipes lawtune --variant nocompile=train.compile=false
    python bench/train_throughput.py --lora-variants  # LoRA, DoRA and rsLoRA side by side (lawtune's default)
    python bench/train_throughput.py --lora-variants lora,dora  # some of them (LoRA first: the others' reference)

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture (config.json of the model directory) with
random weights, saved once so that every recipe loads it the way it would load the real checkpoint.
The data are JEC-QA-shaped (bench/jecqa_synth.py: KD median 143 / p95 219 / max 434 tokens, CA 187 /
313 / 686). LoRA r16 on all seven projections everywhere. Recipes (each in its own process, so peak
memory is its own):

* ``baseline``: the original recipe: fp16 weights, batch 2 x accumulation 4, padded to the longest,
  8-bit AdamW, plain transformers Trainer;
* ``trl``: TRL SFTTrainer, packing to 8192 (padding-free), flex attention, Liger kernels, TRL's
  defaults otherwise (batch 8, gradient checkpointing): the best peer setup of issue 4;
  ``trl_nogc``: the same with batch 1 and no gradient checkpointing;
* ``lawtune``: the real ``lawtune.train.setup`` / ``fit`` with configs/deepseek-r1-distill-qwen-1.5b_lora.yaml;
  ``lawtune8``: the same at the original recipe's batch (~8 sequences per optimizer step);
* ``low_memory``: configs/low_memory.yaml on examples of exactly 2048 tokens (its peak memory is the point);
* ``--variant NAME=key=value,key=value``: lawtune's default config with overrides;
* ``--lora-variants``: lawtune's default config as ``lora`` (plain LoRA), ``dora`` (lora.use_dora) and
  ``rslora`` (lora.use_rslora), each with its ratio to ``lora`` (only these, unless --recipes names more).

Each runs warm-up optimizer steps (compilation, autotuning) and then a fixed number of timed steps.
Prints one JSON line per recipe: real (non-padding) tokens/s, peak reserved GiB, MFU (4 x 1.54e9 x
tokens/s / 790e12: LoRA on a frozen base), and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jecqa_synth  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "deepseek-r1-distill-qwen-1.5b_lora.yaml"
LOW_MEMORY_CONFIG = REPO / "configs" / "low_memory.yaml"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FLOPS_PER_TOKEN = 4 * 1.54e9  # forward + input gradients through the frozen 1.5B matrices
PEAK_FLOPS = 790e12  # bf16 dense matrix products measured on an H100
RECIPES = ["baseline", "trl", "trl_nogc", "lawtune", "lawtune8", "low_memory"]
# --lora-variants: lawtune's default config with each LoRA variant (name, overrides); the first is the reference.
LORA_VARIANTS = [("lora", []), ("dora", ["lora.use_dora=true"]), ("rslora", ["lora.use_rslora=true"])]
MARK = "@@BENCH "


def emit(row: dict) -> dict:
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


# ----------------------------------------------------------------------------- measuring


def _profile_summary(prof, seconds: float) -> dict:
    events = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels
    busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:20]
    return {"profiled_wall_s": round(seconds, 3), "gpu_busy_s": round(busy, 3),
            "top_kernels_ms": {e.key[:90]: round(getattr(e, "self_device_time_total", 0) / 1e3, 1) for e in top}}


class Meter:
    """Counts the real tokens of the micro-batches run between the end of warm-up and the last timed step.

    The collator records each micro-batch's real tokens (before padding) in a queue; a forward pre-hook on
    the model takes them off in order, so prefetched batches are attributed to the step that runs them.
    """

    def __init__(self, warmup: int, steps: int, device, profile: bool = False, cprofile: bool = False):
        from transformers import TrainerCallback

        self.warmup, self.steps, self.device, self.profile, self.cprofile = warmup, steps, device, profile, cprofile
        self.prof = self.cprof = None
        self.profile_info: dict = {}
        self.queue: collections.deque = collections.deque()
        self.counting = False
        self.tokens = self.sequences = self.micro_batches = 0
        self.t0 = self.t1 = None
        meter = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (meter.warmup, meter.warmup + meter.steps):
                    meter._sync()
                    if state.global_step == meter.warmup:
                        if meter.profile:
                            from torch.profiler import ProfilerActivity, profile

                            meter.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                            meter.prof.__enter__()
                        if meter.cprofile:
                            import cProfile

                            meter.cprof = cProfile.Profile()
                            meter.cprof.enable()
                        meter.t0, meter.counting = time.perf_counter(), True
                    else:
                        meter.t1, meter.counting = time.perf_counter(), False
                        if meter.prof is not None:
                            meter.prof.__exit__(None, None, None)
                            meter.profile_info = _profile_summary(meter.prof, meter.t1 - meter.t0)
                            meter.prof = None
                        if meter.cprof is not None:  # where the CPU time of the timed steps went
                            meter.cprof.disable()
                            meter.profile_info["top_self_cpu"] = jecqa_synth.cprofile_top(meter.cprof)
                            meter.cprof = None

        self.callback = Callback()

    def _sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap_collator(self, collate):
        from lawtune.train.collate import examples_of

        def counted(items):
            examples = examples_of(items)
            self.queue.append((sum(len(ex["input_ids"]) for ex in examples), len(examples)))
            return collate(items)

        return counted

    def pre_hook(self, module, args, kwargs):
        tokens, sequences = self.queue.popleft() if self.queue else (0, 0)
        if self.counting:
            self.tokens += tokens
            self.sequences += sequences
            self.micro_batches += 1

    def attach(self, trainer):
        trainer.data_collator = self.wrap_collator(trainer.data_collator)
        trainer.add_callback(self.callback)
        trainer.model.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def result(self) -> dict:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError("the timed window was not reached")
        seconds = self.t1 - self.t0
        tps = self.tokens / seconds
        return {"tokens_per_s": round(tps, 1), "mfu": round(FLOPS_PER_TOKEN * tps / PEAK_FLOPS, 4),
                "timed_steps": self.steps, "seconds": round(seconds, 2), "tokens": self.tokens,
                "tokens_per_step": round(self.tokens / self.steps), "sequences_per_step": round(self.sequences / self.steps, 1),
                "micro_batches_per_step": round(self.micro_batches / self.steps, 1), **self.profile_info}


# ----------------------------------------------------------------------------- recipes


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=PROJECTIONS, bias="none", task_type="CAUSAL_LM")


def _features(work: Path, tokenizer, name: str = "train.jsonl"):
    from lawtune.data import load_records
    from lawtune.prompts import encode_records

    records = load_records(work / name).records
    features, _ = encode_records(records, tokenizer, "chat", 2048)
    return records, features


def run_baseline(opts, work: Path, device, meter: Meter) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    _, features = _features(work, tokenizer)
    gpu = device.type == "cuda"
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float16 if gpu else torch.float32,
                                                 attn_implementation="sdpa").to(device)
    model = get_peft_model(model, _lora_config())
    args = TrainingArguments(output_dir=str(work / "out-baseline"), per_device_train_batch_size=2,
                             gradient_accumulation_steps=4, learning_rate=2e-4, max_steps=meter.warmup + meter.steps,
                             fp16=gpu, use_cpu=not gpu, optim="adamw_bnb_8bit", logging_steps=10, save_strategy="no",
                             report_to="none", remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=features, processing_class=tokenizer,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    meter.attach(trainer)
    trainer.train()
    return {"what": "original recipe: fp16, batch 2 x 4, padded, adamw_bnb_8bit, sdpa, plain Trainer"}


def run_trl(opts, work: Path, device, meter: Meter, tuned: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lawtune.prompts import render_example

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    records, _ = _features(work, tokenizer)
    rows = []
    for r in records:
        prompt, target = render_example(r, tokenizer, "chat")
        rows.append({"prompt": prompt, "completion": target})
    gpu = device.type == "cuda"
    liger = gpu and _has("liger_kernel")
    attn = "flex_attention" if gpu else "sdpa"  # flex attention has no backward pass on the CPU
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.bfloat16 if gpu else torch.float32,
                                                 attn_implementation=attn).to(device)
    extra = {"per_device_train_batch_size": 1, "gradient_checkpointing": False} if tuned else {}
    if not gpu:
        extra.setdefault("per_device_train_batch_size", 2)
    args = SFTConfig(output_dir=str(work / "out-trl"), packing=True, max_length=opts.trl_max_length,
                     use_liger_kernel=liger, bf16=gpu, use_cpu=not gpu, learning_rate=2e-4,
                     max_steps=meter.warmup + meter.steps, logging_steps=10, save_strategy="no", report_to="none",
                     disable_tqdm=True, seed=0, **extra)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=_lora_config())
    meter.attach(trainer)
    trainer.train()
    return {"what": f"TRL SFTTrainer, packing to {opts.trl_max_length} padding-free, {attn}"
                    f"{', Liger kernels' if liger else ''}, batch {args.per_device_train_batch_size}, "
                    f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"}


def run_lawtune(opts, work: Path, device, meter: Meter, config: Path, overrides: list[str], data: str = "train.jsonl") -> dict:
    from lawtune.config import load_config
    from lawtune.train import fit, setup

    name = opts.child_name
    base = [f"model.path={work / 'model'}", f"data.train={work / data}", "data.eval_fraction=0",
            f"train.output_dir={work / ('out-' + name)}", f"train.max_steps={meter.warmup + meter.steps}",
            "train.save_steps=1000000", "train.eval_steps=0", "train.report_to=[none]"]
    if opts.smoke:
        base += ["model.dtype=float32", "model.attn_implementation=sdpa", "train.compile=false", "data.max_length=512"]
        if not any(o.startswith("train.batch_tokens=") for o in overrides):
            base.append("train.batch_tokens=512")
    cfg = load_config(config, base + overrides)
    parts = setup(cfg)
    meter.attach(parts.trainer)
    fit(parts)
    cfg = parts.cfg  # what ran (CPU fallbacks applied)
    t = cfg.train
    return {"what": f"lawtune train {config.name}" + (f" + {' '.join(overrides)}" if overrides else ""),
            "config": {"attn": cfg.model.attn_implementation, "dtype": cfg.model.dtype, "quantization": cfg.model.quantization,
                       "packing": t.packing, "batch_tokens": t.batch_tokens, "per_device_batch_size": t.per_device_batch_size,
                       "gradient_accumulation_steps": t.gradient_accumulation_steps, "sparse_logits": t.sparse_logits,
                       "liger": t.liger, "compile": t.compile, "optim": t.optim,
                       "gradient_checkpointing": t.gradient_checkpointing,
                       "lora": {"r": cfg.lora.r, "use_dora": cfg.lora.use_dora, "use_rslora": cfg.lora.use_rslora,
                                "init": cfg.lora.init}}}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def recipe_plan(opts) -> list[tuple[str, dict]]:
    plan = []
    recipes = opts.recipes if opts.recipes is not None else "" if opts.lora_variants else ",".join(RECIPES)
    for name in [r for r in recipes.split(",") if r]:
        if name not in RECIPES:
            raise SystemExit(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
        plan.append((name, {}))
    for spec in opts.variant:
        name, _, overrides = spec.partition("=")
        items = [o for o in overrides.split(",") if o]
        env = dict(o[4:].split("=", 1) for o in items if o.startswith("env:"))
        profile = "profile" in items
        cprofile = "cprofile" in items
        items = [o for o in items if not o.startswith("env:") and o not in ("profile", "cprofile")]
        plan.append((name, {"overrides": items, "env": env, "profile": profile, "cprofile": cprofile}))
    if opts.lora_variants:
        wanted = [v for v in opts.lora_variants.split(",") if v]
        unknown = sorted(set(wanted) - set(dict(LORA_VARIANTS)))
        if unknown:
            raise SystemExit(f"unknown LoRA variant {', '.join(unknown)}; known: {', '.join(dict(LORA_VARIANTS))}")
        plan += [(name, {"overrides": overrides}) for name, overrides in LORA_VARIANTS if name in wanted]
    return plan


def run_child(opts) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not opts.smoke else "cpu")
    work = Path(opts.work)
    name = opts.child_name
    spec = json.loads(opts.child_spec or "{}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    w, n = (opts.warmup, opts.steps)
    if name == "baseline":
        w, n = opts.baseline_warmup, opts.baseline_steps
    elif name in ("low_memory",):
        w, n = opts.baseline_warmup, opts.low_memory_steps
    if spec.get("profile"):
        n = min(n, 3)
    for key, value in spec.get("env", {}).items():
        os.environ[key] = value
    meter = Meter(w, n, device, profile=bool(spec.get("profile")), cprofile=bool(spec.get("cprofile")))
    start = time.perf_counter()
    if name == "baseline":
        info = run_baseline(opts, work, device, meter)
    elif name in ("trl", "trl_nogc"):
        info = run_trl(opts, work, device, meter, tuned=name == "trl_nogc")
    elif name == "lawtune":
        info = run_lawtune(opts, work, device, meter, Path(opts.config), [])
    elif name == "lawtune8":
        # the original recipe's ~8 sequences per optimizer step: a token budget of 8 mean-length examples
        budget = max(opts.lawtune8_tokens if not opts.smoke else 0, 512 if opts.smoke else 0)
        info = run_lawtune(opts, work, device, meter, Path(opts.config),
                           [f"train.batch_tokens={budget}", "train.gradient_accumulation_steps=1",
                            f"data.max_length={min(budget, 1024)}"])
    elif name == "low_memory":
        overrides = ["train.batch_tokens=512", "data.max_length=512"] if opts.smoke else []
        info = run_lawtune(opts, work, device, meter, LOW_MEMORY_CONFIG, overrides, data="long.jsonl")
    else:
        info = run_lawtune(opts, work, device, meter, Path(opts.config), spec.get("overrides", []))
    row = {"recipe": name, **meter.result(), **info, "wall_s": round(time.perf_counter() - start, 1)}
    if device.type == "cuda":
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return row


# ----------------------------------------------------------------------------- preparing


def prepare(opts, work: Path) -> dict:
    """Random-weight model directory (bf16 safetensors) + tokenizer, and the data files."""
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = jecqa_synth.save_bench_model(opts.model_dir, opts.smoke, work / "model")
    scale = 0.5 if opts.smoke else 1.0
    rows = jecqa_synth.train_rows(tokenizer, opts.records, scale=scale)
    jecqa_synth.write_jsonl(rows, work / "train.jsonl")
    long = 512 if opts.smoke else 2048
    jecqa_synth.write_jsonl(jecqa_synth.long_rows(tokenizer, max(opts.records // 8, 64), long), work / "long.jsonl")
    from lawtune.data import load_records
    from lawtune.prompts import encode_records

    records = load_records(work / "train.jsonl").records
    features, _ = encode_records(records, tokenizer, "chat", 2048)
    lengths = [len(f["input_ids"]) for f in features]
    by_type = {t: jecqa_synth.percentiles([n for n, r in zip(lengths, records) if r.type == t]) for t in ("KD", "CA")}
    return {"bench": "data", "examples": len(lengths), "tokens": jecqa_synth.percentiles(lengths), "by_type": by_type,
            "long_examples_tokens": long}


# ----------------------------------------------------------------------------- main


def env_info() -> dict:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "bitsandbytes", "datasets"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"bench": "env", "device": device, "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU, in one process")
    p.add_argument("--model-dir", help="directory with config.json and the tokenizer (default .bench_assets/ or ../shared/)")
    p.add_argument("--recipes", default=None, help=f"comma list of {', '.join(RECIPES)} (default: all; none with "
                                                   f"--lora-variants)")
    p.add_argument("--lora-variants", nargs="?", const=",".join(n for n, _ in LORA_VARIANTS), default=None,
                   metavar="lora,dora,rslora",
                   help="also run lawtune's default config as plain LoRA, DoRA and rsLoRA (or the ones listed), each "
                        "with its ratio to LoRA")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=key=value,...",
                   help="lawtune's default config with overrides (repeatable); an item env:VAR=VALUE sets an "
                        "environment variable, the item profile prints where the GPU time goes, cprofile where the CPU time goes")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="lawtune config of the lawtune recipes")
    p.add_argument("--records", type=int, default=6000, help="synthetic training questions")
    p.add_argument("--warmup", type=int, default=4, help="optimizer steps before timing (compilation happens here)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--baseline-warmup", type=int, default=2)
    p.add_argument("--baseline-steps", type=int, default=6)
    p.add_argument("--low-memory-steps", type=int, default=6)
    p.add_argument("--trl-max-length", type=int, default=8192)
    p.add_argument("--lawtune8-tokens", type=int, default=1408, help="token budget standing for 8 sequences a step")
    p.add_argument("--timeout", type=int, default=420, help="seconds per recipe")
    p.add_argument("--work", help="working directory (default: a temporary one)")
    p.add_argument("--child-name", help=argparse.SUPPRESS)
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--subprocess", action="store_true", help="with --smoke: one process per recipe, as on the GPU")
    opts = p.parse_args(argv)
    if opts.smoke:
        opts.records, opts.warmup, opts.steps, opts.baseline_warmup, opts.baseline_steps = 96, 1, 2, 1, 2
        opts.low_memory_steps, opts.trl_max_length = 2, 512
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if opts.child_name:
        print(MARK + json.dumps(run_child(opts), ensure_ascii=False), flush=True)
        return 0
    if opts.prepare_only:
        info = env_info()
        info.pop("bench")
        print(MARK + json.dumps({**prepare(opts, Path(opts.work)), **info}, ensure_ascii=False), flush=True)
        return 0

    tmp = None if opts.work else tempfile.TemporaryDirectory(prefix="lawtune-bench-")
    work = Path(opts.work or tmp.name)
    opts.work = str(work)
    plan = recipe_plan(opts)
    results: dict[str, dict] = {}
    try:
        if opts.smoke and not opts.subprocess:  # one process: the CPU has no per-process memory to measure, and imports cost seconds
            emit(env_info())
            emit(prepare(opts, work))
            for name, spec in plan:
                opts.child_name, opts.child_spec = name, json.dumps(spec)
                results[name] = emit(_with_ratio(run_child(opts), results))
            return 0
        emit(_child(opts, work, ["--prepare-only"], "prepare"))
        for name, spec in plan:
            row = _child(opts, work, ["--child-name", name, "--child-spec", json.dumps(spec)], name)
            results[name] = emit(_with_ratio(row, results))
    finally:
        if tmp is not None:
            tmp.cleanup()
    _summary(results)
    return 0


def _child(opts, work: Path, extra: list[str], name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--work", str(work), *_forwarded(opts), *extra]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-1500:] if isinstance(exc.stderr, bytes) else (exc.stderr or "")[-1500:]
        return {"recipe": name, "error": f"timed out after {opts.timeout} s", "stderr_tail": str(tail)}
    rows = [json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not rows:
        return {"recipe": name, "error": f"exit {proc.returncode} after {time.perf_counter() - start:.0f} s",
                "stderr_tail": proc.stderr[-2500:]}
    return rows[-1]


def _forwarded(opts) -> list[str]:
    out = ["--config", opts.config, "--records", str(opts.records), "--warmup", str(opts.warmup), "--steps", str(opts.steps),
           "--baseline-warmup", str(opts.baseline_warmup), "--baseline-steps", str(opts.baseline_steps),
           "--low-memory-steps", str(opts.low_memory_steps), "--trl-max-length", str(opts.trl_max_length),
           "--lawtune8-tokens", str(opts.lawtune8_tokens)]
    if opts.model_dir:
        out += ["--model-dir", opts.model_dir]
    if opts.smoke:
        out.append("--smoke")
    return out


def _with_ratio(row: dict, results: dict) -> dict:
    base = results.get("baseline", {}).get("tokens_per_s")
    if base and row.get("tokens_per_s"):
        row["ratio_to_baseline"] = round(row["tokens_per_s"] / base, 2)
    lora = results.get(LORA_VARIANTS[0][0], {})
    if row.get("recipe") in dict(LORA_VARIANTS) and row["recipe"] != LORA_VARIANTS[0][0] and row.get("tokens_per_s") \
            and lora.get("tokens_per_s"):
        row["ratio_to_lora"] = round(row["tokens_per_s"] / lora["tokens_per_s"], 2)
        if row.get("peak_reserved_gib") and lora.get("peak_reserved_gib"):
            row["memory_ratio_to_lora"] = round(row["peak_reserved_gib"] / lora["peak_reserved_gib"], 2)
    return row


def _summary(results: dict) -> None:
    ok = {k: v for k, v in results.items() if "tokens_per_s" in v}
    peers = [v["tokens_per_s"] for k, v in ok.items() if k.startswith("trl")]
    summary = {"bench": "summary", "tokens_per_s": {k: v["tokens_per_s"] for k, v in ok.items()},
               "peak_reserved_gib": {k: v.get("peak_reserved_gib") for k, v in ok.items()}}
    if "lawtune" in ok:
        mine = ok["lawtune"]["tokens_per_s"]
        summary["lawtune_vs_60000"] = round(mine / 60000, 3)
        if peers:
            summary["lawtune_vs_best_trl"] = round(mine / max(peers), 2)
    if "lawtune8" in ok and "baseline" in ok:
        summary["lawtune8_vs_baseline"] = round(ok["lawtune8"]["tokens_per_s"] / ok["baseline"]["tokens_per_s"], 1)
    emit(summary)


if __name__ == "__main__":
    sys.exit(main())
