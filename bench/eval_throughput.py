#!/usr/bin/env python
"""Evaluation throughput: lawtune's own ``evaluate_records`` against plain ``transformers`` generate.

    python bench/eval_throughput.py                 # full size, one GPU (see bench/README.md)
    python bench/eval_throughput.py --smoke         # tiny model on the CPU, seconds (tests/test_bench.py)

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture (config.json of the model directory) with
random weights in bf16 and sdpa attention, and the real tokenizer; 1,000 JEC-QA-shaped questions
(bench/jecqa_synth.py). With random weights no answer ever ends early: every reasoning row runs to its
token budget, so reasoning is measured on a subset with a smaller budget (256 questions x 512 tokens by
default) and reported as generated tokens/s. Baselines run in the same process on the same model:
plain ``model.generate`` one question at a time, and on left-padded, unsorted batches of 64 and 256.

Prints one JSON line per measurement, then a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jecqa_synth  # noqa: E402


def emit(row: dict) -> dict:
    print(json.dumps(row, ensure_ascii=False), flush=True)
    return row


def env_info(device: torch.device) -> dict:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "liger-kernel", "bitsandbytes"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"bench": "env", "device": gpu, "versions": versions, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device, fn):
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def build(args, device: torch.device):
    from transformers import AutoModelForCausalLM, GenerationConfig

    if (args.smoke or getattr(args, "cpu", False)) and not args.model_dir:  # generation.py --cpu: the demo's size
        from lawtune.demo import build_tiny_model, build_tokenizer, corpus_texts, demo_data_path

        tokenizer = build_tokenizer(corpus_texts([demo_data_path()]), vocab_size=1500)
        model = build_tiny_model(tokenizer, hidden_size=64, layers=2).to(device)
        model.config.initializer_range = 0.02
    else:
        tokenizer, config = jecqa_synth.model_config(args.model_dir, tiny=args.smoke)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                   pad_token_id=tokenizer.pad_token_id)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def profile_call(device, label: str, fn) -> None:
    """Run fn under torch.profiler; print wall time, GPU busy time and the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _, wall = timed(device, fn)
    events = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]  # kernels
    busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    top = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0), reverse=True)[:18]
    emit({"bench": "profile", "what": label, "wall_s": round(wall, 3), "gpu_busy_s": round(busy, 3),
          "top_kernels_ms": {e.key[:90]: round(getattr(e, "self_device_time_total", 0) / 1e3, 1) for e in top}})


def plain_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, device) -> int:
    """The baseline: stock transformers generate, greedy, left padding, dynamic cache; returns new tokens."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, add_special_tokens=False, return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few questions, CPU: checks that everything runs")
    p.add_argument("--model-dir", help="directory with config.json and the tokenizer (default .bench_assets/ or ../shared/)")
    p.add_argument("--n", type=int, default=1000, help="questions for direct and choice (default 1000)")
    p.add_argument("--batch-sizes", default="256", help="eval.batch_size values for direct and choice (comma list)")
    p.add_argument("--reasoning-n", type=int, default=256)
    p.add_argument("--reasoning-tokens", type=int, default=512)
    p.add_argument("--reasoning-batch", type=int, default=256)
    p.add_argument("--single-n", type=int, default=16, help="questions for the one-at-a-time baseline")
    p.add_argument("--single-tokens", type=int, default=500)
    p.add_argument("--baseline-tokens", type=int, default=500, help="new tokens of the batch-64/256 baselines")
    p.add_argument("--cache-variants", action="store_true",
                   help="also time reasoning generation through the engine and through transformers generate (static, dynamic cache)")
    p.add_argument("--direct-dynamic", action="store_true", help="also time direct mode with a dynamic cache")
    p.add_argument("--graph-variant", action="store_true",
                   help="also time direct and reasoning through transformers generate (eval.cuda_graphs=false)")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--profile", action="store_true", help="print where GPU time goes in one direct and one choice batch")
    p.add_argument("--only-profile", action="store_true", help="profile, then stop")
    p.add_argument("--cprofile", action="store_true", help="print where CPU time goes in one direct batch of 256")
    p.add_argument("--cudnn-variant", action="store_true",
                   help="also time direct and choice with cuDNN attention allowed (lawtune leaves it out)")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.batch_sizes, args.reasoning_n, args.reasoning_tokens, args.reasoning_batch = 24, "8,16", 8, 12, 8
        args.single_n, args.single_tokens, args.baseline_tokens = 2, 6, 6

    from lawtune.config import EvalConfig, GenerationConfig
    from lawtune.data import load_records
    from lawtune.evaluate import evaluate_records
    from lawtune.generation import generate
    from lawtune.prompts import render_prompt

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    env = emit(env_info(device))
    (model, tokenizer), build_s = timed(device, lambda: build(args, device))
    scale = 0.25 if args.smoke else 1.0
    with tempfile.TemporaryDirectory() as tmp:
        path = jecqa_synth.write_jsonl(jecqa_synth.eval_rows(tokenizer, args.n, scale=scale), Path(tmp) / "eval.jsonl")
        records = load_records(path).records
    prompt_lengths = [len(tokenizer(render_prompt(r, tokenizer, "chat"), add_special_tokens=False)["input_ids"])
                      for r in records]
    emit({"bench": "setup", "model_build_s": round(build_s, 1), "questions": len(records),
          "parameters": sum(p.numel() for p in model.parameters()), "prompt_tokens": jecqa_synth.percentiles(prompt_lengths)})
    results: dict[str, dict] = {}
    # One engine holder for the whole run, as a command owns one: the warm-up's engine (cache, CUDA graphs) is the
    # timed run's. (Before issue 29 the engine was cached per model; an older lawtune has no holder to pass.)
    try:
        from lawtune.generation import engine_holder
    except ImportError:
        engine_holder = None
    holder = engine_holder(tokenizer, GenerationConfig()) if engine_holder is not None else None
    shared = {"engines": holder} if holder is not None else {}

    def lawtune_run(name: str, recs, ecfg: EvalConfig, gcfg: GenerationConfig | None = None) -> dict:
        gcfg = gcfg or GenerationConfig()
        own = {"engines": holder} if holder is not None and gcfg.cuda_graphs else {}
        # warm-up on a few batches' worth (kernels, allocator), then the timed run over all questions
        evaluate_records(model, tokenizer, recs[: min(len(recs), ecfg.batch_size)], ecfg, gcfg, "chat", show_progress=False,
                         **own)
        (samples, summary), seconds = timed(device, lambda: evaluate_records(model, tokenizer, recs, ecfg, gcfg, "chat",
                                                                               show_progress=False, **own))
        generated = sum(s["generated_tokens"] for s in samples)
        row = {"bench": name, "what": "lawtune evaluate_records", "mode": ecfg.mode, "questions": len(recs),
               "batch_size": ecfg.batch_size, "seconds": round(seconds, 3), "questions_per_s": round(len(recs) / seconds, 1),
               "generated_tokens": generated, "generated_tokens_per_s": round(generated / seconds, 1),
               "forced": summary["forced"]}
        if ecfg.mode == "reasoning":
            row["max_new_tokens"] = gcfg.max_new_tokens
        results[name] = emit(row)
        return row

    if args.profile or args.only_profile:
        for mode in ("direct", "choice"):
            ecfg = EvalConfig(mode=mode, batch_size=256)
            batch = sorted(records, key=lambda r: len(r.statement))[len(records) // 2:][:256]
            evaluate_records(model, tokenizer, batch, ecfg, None, "chat", show_progress=False, **shared)
            profile_call(device, f"eval {mode}, 256 questions",
                         lambda batch=batch, ecfg=ecfg: evaluate_records(model, tokenizer, batch, ecfg, None, "chat",
                                                                         show_progress=False, **shared))
        if args.only_profile:
            return 0

    if args.cprofile:
        import cProfile

        ecfg = EvalConfig(mode="direct", batch_size=256)
        batch = records[:256]
        evaluate_records(model, tokenizer, batch, ecfg, None, "chat", show_progress=False, **shared)
        prof = cProfile.Profile()
        prof.enable()
        _, wall = timed(device, lambda: evaluate_records(model, tokenizer, batch, ecfg, None, "chat", show_progress=False,
                                                         **shared))
        prof.disable()
        emit({"bench": "cprofile", "what": "eval direct, 256 questions", "wall_s": round(wall, 3),
              "top_self_cpu": jecqa_synth.cprofile_top(prof)})

    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        lawtune_run(f"direct_bs{bs}", records, EvalConfig(mode="direct", batch_size=bs))
        lawtune_run(f"choice_bs{bs}", records, EvalConfig(mode="choice", batch_size=bs))
    if args.direct_dynamic:  # direct generates 8 tokens: does the preallocated cache pay for itself there?
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            row = lawtune_run(f"dyncache_direct_bs{bs}", records, EvalConfig(mode="direct", batch_size=bs), GenerationConfig(static_cache=False))
            row["what"] += ", dynamic cache"
    if args.graph_variant:  # lawtune's generation without its CUDA-graph decoding loop (decode.py)
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            row = lawtune_run(f"nograph_direct_bs{bs}", records, EvalConfig(mode="direct", batch_size=bs), GenerationConfig(cuda_graphs=False))
            row["what"] += ", transformers generate"
        row = lawtune_run("nograph_reasoning", records[: args.reasoning_n],
                          EvalConfig(mode="reasoning", batch_size=args.reasoning_batch),
                          GenerationConfig(max_new_tokens=args.reasoning_tokens, cuda_graphs=False))
        row["what"] += ", transformers generate"
    if args.cudnn_variant:  # the same runs with every attention backend allowed, cuDNN's included
        import lawtune.generation.attention as eval_attention

        kept, eval_attention.EVAL_SDPA_BACKENDS = eval_attention.EVAL_SDPA_BACKENDS, None
        for bs in [int(x) for x in args.batch_sizes.split(",")]:
            for mode in ("direct", "choice"):
                row = lawtune_run(f"cudnn_{mode}_bs{bs}", records, EvalConfig(mode=mode, batch_size=bs))
                row["what"] += ", cuDNN attention allowed"
        eval_attention.EVAL_SDPA_BACKENDS = kept
    lawtune_run("reasoning", records[: args.reasoning_n],
                EvalConfig(mode="reasoning", batch_size=args.reasoning_batch),
                GenerationConfig(max_new_tokens=args.reasoning_tokens))

    prompts = [render_prompt(r, tokenizer, "chat", think=True) for r in records]
    if not args.skip_baselines:
        plain = [render_prompt(r, tokenizer, "chat", think=False) for r in records]
        think = prompts
        plain_generate(model, tokenizer, think[:4], 4, device)  # warm-up
        tokens, seconds = timed(device, lambda: sum(plain_generate(model, tokenizer, [x], args.single_tokens, device)
                                                    for x in think[: args.single_n]))
        results["base_single"] = emit({"bench": "base_single", "what": "plain generate, one question at a time",
                                       "questions": args.single_n, "max_new_tokens": args.single_tokens,
                                       "seconds": round(seconds, 2), "generated_tokens_per_s": round(tokens / seconds, 1)})
        for bs in (64, 256):
            tokens, seconds = timed(device, lambda bs=bs: plain_generate(model, tokenizer, think[:bs], args.baseline_tokens,
                                                                          device))
            results[f"base_batch{bs}"] = emit({"bench": f"base_batch{bs}", "what": f"plain generate, left-padded batch of {bs}",
                                               "questions": bs, "max_new_tokens": args.baseline_tokens,
                                               "seconds": round(seconds, 2), "generated_tokens_per_s": round(tokens / seconds, 1)})
        bs = 256 if not args.smoke else 8
        _, seconds = timed(device, lambda: [plain_generate(model, tokenizer, plain[k: k + bs], 8, device)
                                            for k in range(0, len(plain), bs)])
        results["base_direct"] = emit({"bench": "base_direct", "what": f"plain generate, 8 new tokens, batches of {bs}",
                                       "questions": len(plain), "seconds": round(seconds, 2)})

        def forward_all():
            tokenizer.padding_side = "left"
            with torch.inference_mode():
                for k in range(0, len(plain), bs):
                    batch = tokenizer(plain[k: k + bs], add_special_tokens=False, return_tensors="pt", padding=True).to(device)
                    model(**batch, logits_to_keep=1)

        _, seconds = timed(device, forward_all)
        results["base_forward"] = emit({"bench": "base_forward", "what": f"one forward pass over all prompts, batches of {bs}",
                                        "questions": len(plain), "seconds": round(seconds, 2)})

    summary = {"bench": "summary", "device": env["device"]}
    # lawtune's own runs only (the cuDNN variant is a comparison, not lawtune's behaviour)
    direct = min((r for k, r in results.items() if k.startswith("direct_")), key=lambda r: r["seconds"])
    choice = min((r for k, r in results.items() if k.startswith("choice_")), key=lambda r: r["seconds"])
    reasoning = results["reasoning"]
    summary.update({"direct_s": direct["seconds"], "direct_batch": direct["batch_size"], "choice_s": choice["seconds"],
                    "choice_batch": choice["batch_size"], "reasoning_tokens_per_s": reasoning["generated_tokens_per_s"],
                    "targets": {"direct_s<=4": direct["seconds"] <= 4, "choice_s<=6": choice["seconds"] <= 6,
                                "reasoning_tok_s>=10000": reasoning["generated_tokens_per_s"] >= 10000}})
    if "base_direct" in results:
        summary["direct_speedup_vs_plain_generate"] = round(results["base_direct"]["seconds"] / direct["seconds"], 2)
        for k in ("base_single", "base_batch64", "base_batch256"):
            summary[f"reasoning_vs_{k}"] = round(reasoning["generated_tokens_per_s"] / results[k]["generated_tokens_per_s"], 1)
    emit(summary)

    if args.cache_variants:  # generation alone, on the prompts of lawtune's reasoning batch (sorted by length)
        subset = sorted(prompts[: args.reasoning_n], key=len)[: args.reasoning_batch]
        base = GenerationConfig()
        for name, gcfg in (("engine", base), ("generate_static", base.model_copy(update={"engine": False})),
                           ("generate_dynamic", base.model_copy(update={"engine": False, "static_cache": False}))):
            own = shared if gcfg.engine else {}
            generate(model, tokenizer, subset[:8], 8, gcfg, **own)  # warm-up
            out, seconds = timed(device, lambda gcfg=gcfg, own=own: generate(model, tokenizer, subset,
                                                                             args.reasoning_tokens, gcfg, **own))
            tokens = sum(o.tokens for o in out)
            emit({"bench": f"cache_{name}", "what": "lawtune generation.generate", "rows": len(subset),
                  "max_new_tokens": args.reasoning_tokens, "seconds": round(seconds, 2),
                  "generated_tokens_per_s": round(tokens / seconds, 1)})
    if holder is not None:
        holder.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
