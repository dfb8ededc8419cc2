#!/usr/bin/env python
"""The engine's decoding step in parts (issue 30), side by side in one run on one GPU:

    python bench/decode_step.py [--model-dir DIR] [--rows 1,16,64,256]
    python bench/decode_step.py --smoke          # tiny model on the CPU (tests/bench)

1. ``attention``: attention alone on the rows and lengths of the 512-request workload half-way (256 rows: each its
   prompt plus a uniform draw within its budget, bench/generation.py's budgets): today's windowed sdpa (grouped
   heads, the visibility mask over the power-of-two window of the longest row) against ``decode_attention``'s
   kernel, which reads each row's own length; µs a layer, and the largest difference of their outputs.
2. ``step``: the engine generating ``--tokens`` tokens a row for ``--rows`` rows at once, with each of the step's
   variants (``compile_step`` and ``attention_kernel`` off and on): tokens/s, and the seconds the first request
   took (compilation and graph capture).
3. ``profile``: the kernels of one eager one-row step, each variant: count and GPU time, and the costliest by
   name (launches and GPU time).
4. ``sampler``: choosing the next token of ``--sampler-rows`` rows from random logits of the vocabulary's width
   (temperature 0.6, top-p 0.95; flat, as a random model's are, and peaked): the step's choice greedy and sampled
   (as the fused step runs it), the kept set alone, the bisection's threshold alone (compiled), and the one pass
   that settles most rows (``gumbel_first``) with the rows it leaves to the bisection; µs each.
5. ``host``: the engine's own work a step with ``--host-rows`` streaming rows (``bench_host``): scheduling, queueing
   the step, reading back, µs a step each.

Prints one JSON line per measurement (bench/eval_throughput.py's format).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jecqa_synth  # noqa: E402
from eval_throughput import build, emit, env_info, timed  # noqa: E402

VARIANTS = {"eager+sdpa": dict(compile_step=False, attention_kernel=False),
            "eager+kernel": dict(compile_step=False, attention_kernel=True),
            "compiled+sdpa": dict(compile_step=True, attention_kernel=False),
            "compiled+kernel": dict(compile_step=True, attention_kernel=True)}


def workload_lengths(rows: int, smoke: bool) -> list[int]:
    rng = random.Random(0)
    if smoke:
        return [rng.randint(1, 60) for _ in range(rows)]
    return [rng.randint(150, 400) + rng.randint(1, jecqa_synth.lognormal(rng, 900, 2048, 100, 2048)) for _ in range(rows)]


def bench_attention(model, device, rows: int, smoke: bool, repeats: int) -> dict:
    from lawtune.generation import decode_attention as da
    from lawtune.generation.attention import gqa_sdpa_attention
    from lawtune.generation.engine.runner import power_of_two

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = workload_lengths(rows, smoke)
    window = power_of_two(max(lengths))
    dtype = next(model.parameters()).dtype
    keys = torch.randn(rows, kv_heads, window, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    query = torch.randn(rows, heads, 1, dim, device=device, dtype=dtype)
    length_t = torch.tensor(lengths, device=device)
    mask = (torch.arange(window, device=device)[None, :] < length_t[:, None])[:, None, None, :]
    layer = model.model.layers[0].self_attn
    scale = dim ** -0.5

    def sdpa():
        return gqa_sdpa_attention(layer, query, keys, values, mask, scaling=scale)[0]

    def kernel():
        return da.decode_attention(query[:, :, 0], keys, values, length_t, scale)[:, None]

    row = {"bench": "attention", "rows": rows, "window": window, "mean_length": round(sum(lengths) / rows, 1),
           "max_length": max(lengths)}
    outs = {}
    for name, fn in (("sdpa_window", sdpa), ("kernel", kernel)):
        if name == "kernel" and not da.available():
            continue
        outs[name] = fn()
        _, seconds = timed(device, lambda fn=fn: [fn() for _ in range(repeats)])
        row[f"{name}_us"] = round(seconds / repeats * 1e6, 1)
    if len(outs) == 2:
        row["max_abs_diff"] = float((outs["sdpa_window"].float() - outs["kernel"].float()).abs().max())
        row["kernel_vs_sdpa"] = round(row["sdpa_window_us"] / row["kernel_us"], 2)
    return row


def sweep_attention(model, device, rows: int, length: int | None, repeats: int) -> dict:
    """The kernel's tuning (chunk, block, warps, stages) on ``rows`` rows of the workload's lengths (or all of
    ``length``): µs a layer of each setting, fastest first."""
    from lawtune.generation import decode_attention as da

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lengths = [length] * rows if length else workload_lengths(rows, False)
    columns = max(4096, max(lengths))
    dtype = next(model.parameters()).dtype
    keys = torch.randn(rows, kv_heads, columns, dim, device=device, dtype=dtype)
    values = torch.randn_like(keys)
    query = torch.randn(rows, heads, dim, device=device, dtype=dtype)
    length_t = torch.tensor(lengths, device=device)
    times = {}
    for chunk in (256, 512, 1024):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (1, 2, 3):
                    def go(setting=(chunk, block_n, warps, stages)):
                        return da.decode_attention(query, keys, values, length_t, dim ** -0.5, *setting)
                    try:
                        go()
                        _, seconds = timed(device, lambda: [go() for _ in range(repeats)])
                    except Exception as exc:  # noqa: BLE001 - a setting the GPU cannot run is reported, not fatal
                        times[f"{chunk}/{block_n}/{warps}/{stages}"] = str(exc)[:60]
                        continue
                    times[f"{chunk}/{block_n}/{warps}/{stages}"] = round(seconds / repeats * 1e6, 1)
    best = sorted((v, k) for k, v in times.items() if isinstance(v, float))[:8]
    return {"bench": "attention_sweep", "rows": rows, "mean_length": round(sum(lengths) / rows, 1),
            "default_us": times.get(f"{da.CHUNK}/{da.BLOCK_N}/4/2"), "fastest_us (chunk/block/warps/stages)": dict(
                (k, v) for v, k in best)}


def bench_steps(model, tokenizer, device, rows: int, tokens: int, options: dict) -> dict:
    from lawtune.generation.engine import GenerationEngine, SamplingParams

    prompt = tokenizer("甲与乙订立买卖合同，下列哪些说法正确？" * 8, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    with GenerationEngine(model, tokenizer.eos_token_id, slots=rows, max_len=len(prompt) + tokens + 1,
                          **options) as engine:
        requests = [([*prompt, i], params, str(i)) for i in range(rows)]
        _, first_s = timed(device, lambda: engine.generate(requests))
        _, seconds = timed(device, lambda: engine.generate(requests))
    return {"rows": rows, "tokens_per_s": round(rows * tokens / seconds, 1),
            "ms_per_step": round(seconds / tokens * 1e3, 3), "first_run_s": round(first_s, 1)}


def bench_host(model, tokenizer, device, rows: int, steps: int, slots: int) -> dict:
    """The engine's own work a step with ``rows`` streaming rows of ``slots`` (serve's rows), each request with a
    listener as serve's pump sets one: µs a step in scheduling (``scheduler.schedule``), queueing the step
    (``runner.run_step``) and reading back (``readback.after_step``), and the step's wall time. The parts are timed by
    wrapping those methods on this engine (the bench's instrumentation). On a GPU the step is queued, not run, and
    reading back includes the wait for the step ``LOOK_LAG`` behind: the CPU's figures are the host's own work."""
    from lawtune.generation.engine import GenerationEngine, SamplingParams

    prompt = tokenizer("甲与乙订立买卖合同", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=steps + 16, ignore_eos=True)
    spent = {"schedule": 0.0, "run_step": 0.0, "read_back": 0.0}

    def timing(name, method):
        def timed_method(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return timed_method

    told = [0]
    with GenerationEngine(model, tokenizer.eos_token_id, slots=slots, max_len=len(prompt) + steps + 32) as engine:
        for i in range(rows):
            request = engine.submit([*prompt, i], params, key=str(i), stream=True)
            request.listeners.append(lambda _request: told.__setitem__(0, told[0] + 1))
        for _ in range(4):  # the prefill, and the readings' pipeline filled
            engine.step()
        engine.scheduler.schedule = timing("schedule", engine.scheduler.schedule)
        engine.runner.run_step = timing("run_step", engine.runner.run_step)
        engine.readback.after_step = timing("read_back", engine.readback.after_step)
        told[0] = 0
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {"rows": rows, "slots": slots, "steps": steps, "us_a_step": round(wall / steps * 1e6, 1),
            **{f"{name}_us": round(value / steps * 1e6, 1) for name, value in spent.items()},
            "listener_calls_a_step": round(told[0] / steps, 1)}


def profile_step(model, tokenizer, device, options: dict) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from lawtune.generation.engine import GenerationEngine, SamplingParams

    prompt = tokenizer("甲与乙订立买卖合同", add_special_tokens=False)["input_ids"]
    with GenerationEngine(model, tokenizer.eos_token_id, slots=1, max_len=len(prompt) + 64, use_graph=False,
                          **options) as engine:
        engine.generate([(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), None)])
        request = engine.submit(prompt, SamplingParams(max_new_tokens=32, ignore_eos=True))
        for _ in range(4):
            engine.step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        engine.cancel(request)
    events = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    busy = sum(getattr(e, "device_time", 0) for e in events)
    # by kernel name: how many a step launches and their GPU time, the costliest first (what fusing would save)
    by_name: dict[str, list] = {}
    for e in events:
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += getattr(e, "device_time", 0)
    top = sorted(by_name.items(), key=lambda item: -item[1][1])[:16]
    return {"kernels": len(events), "gpu_us": round(busy, 1),
            "top_kernels": {name: [count, round(us, 1)] for name, (count, us) in top}}


def bench_sampler(device, rows: int, vocab: int, repeats: int) -> list[dict]:
    from lawtune.generation.engine import sampler
    from lawtune.generation.engine.compiled import compiled

    out = []
    generator = torch.Generator(device=device).manual_seed(0)
    temperature = torch.full((rows,), 0.6, device=device)
    top_p, top_k = torch.full((rows,), 0.95, device=device), torch.zeros(rows, dtype=torch.long, device=device)
    seed, step = torch.arange(rows, device=device), torch.zeros(rows, dtype=torch.long, device=device)
    ban = torch.zeros(rows, dtype=torch.bool, device=device)
    fused = device.type == "cuda"
    threshold = compiled("nucleus_threshold", sampler.nucleus_threshold) if fused else sampler.nucleus_threshold
    for shape, scale in (("flat", 0.02), ("peaked", 8.0)):
        logits = torch.randn(rows, vocab, device=device, generator=generator) * scale
        probs = (logits / 0.6).softmax(-1)
        row: dict = {"bench": "sampler", "rows": rows, "vocab": vocab, "logits": shape}
        for name, sampling in (("greedy", False), ("sampled", True)):  # the step's whole choice, as it runs
            def choose(sampling=sampling, logits=logits):
                return sampler.choose_tokens(logits, temperature, top_p, top_k, seed, step, ban, 0, sampling, fused)
            choose()
            _, seconds = timed(device, lambda choose=choose: [choose() for _ in range(repeats)])
            row[f"{name}_us"] = round(seconds / repeats * 1e6, 1)
        sampler.nucleus(probs, top_p, top_k, threshold)  # the kept set alone (the bisection's threshold, compiled)
        _, seconds = timed(device, lambda probs=probs: [sampler.nucleus(probs, top_p, top_k, threshold)
                                                        for _ in range(repeats)])
        row["nucleus_us"] = round(seconds / repeats * 1e6, 1)
        _, seconds = timed(device, lambda probs=probs: [threshold(probs, top_p, top_k) for _ in range(repeats)])
        row["threshold_us"] = round(seconds / repeats * 1e6, 1)
        if hasattr(sampler, "gumbel_first"):  # the pass that settles most rows (older trees: none)
            scaled = logits / 0.6
            _, kept, _, _ = sampler.gumbel_first(scaled, top_p, top_k, seed, step, fused)
            _, seconds = timed(device, lambda scaled=scaled: [
                sampler.gumbel_first(scaled, top_p, top_k, seed, step, fused) for _ in range(repeats)])
            row["gumbel_first_us"] = round(seconds / repeats * 1e6, 1)
            row["rows_to_bisect"] = int((~kept).sum())
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks that everything runs")
    p.add_argument("--model-dir", help="directory with config.json and the tokenizer (default .bench_assets/ or ../shared/)")
    p.add_argument("--rows", default="1,16,64,256", help="rows of the step measurement (comma list)")
    p.add_argument("--tokens", type=int, default=256, help="tokens a row in the step measurement")
    p.add_argument("--variants", default=",".join(VARIANTS), help="step variants (comma list of " + ", ".join(VARIANTS) + ")")
    p.add_argument("--skip", default="", help="parts to leave out: attention,step,profile,sampler,host")
    p.add_argument("--host-rows", default="1,32,128", help="streaming rows of the host measurement (comma list)")
    p.add_argument("--host-steps", type=int, default=300, help="steps of the host measurement")
    p.add_argument("--host-slots", type=int, default=256, help="the engine's rows in the host measurement (serve's "
                   "most by default)")
    p.add_argument("--sampler-rows", default="256,512", help="rows of the sampler measurement (comma list)")
    p.add_argument("--sweep", action="store_true", help="the kernel's tuning sweep (256 rows of the workload, one row "
                   "of 1,000 and of 4,000 columns)")
    args = p.parse_args(argv)
    if args.smoke:
        args.rows, args.tokens = "1,4", 8
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    emit(env_info(device))
    args.cpu = device.type == "cpu"
    model, tokenizer = build(args, device)
    if "attention" not in skip:
        emit(bench_attention(model, device, 8 if args.smoke else 256, args.smoke, 2 if args.smoke else 50))
    if args.sweep and device.type == "cuda":
        for rows, length in ((256, None), (64, None), (1, 1000), (1, 4000)):
            emit(sweep_attention(model, device, rows, length, 50))
    variants = [v for v in args.variants.split(",") if v]
    if device.type == "cpu":  # nothing is compiled or run by the kernel on a CPU: the eager step only
        variants = ["eager+sdpa"]
    if "step" not in skip:
        for rows in (int(r) for r in args.rows.split(",")):
            for name in variants:
                emit({"bench": "step", "variant": name, **bench_steps(model, tokenizer, device, rows, args.tokens,
                                                                      VARIANTS[name])})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if "sampler" not in skip:
        for rows in (int(r) for r in ("4" if args.smoke else args.sampler_rows).split(",")):
            for row in bench_sampler(device, rows, model.config.vocab_size, 2 if args.smoke else 20):
                emit(row)
    if "host" not in skip:
        for rows in (int(r) for r in ("1,4" if args.smoke else args.host_rows).split(",")):
            emit({"bench": "host", **bench_host(model, tokenizer, device, rows, 8 if args.smoke else args.host_steps,
                                                 8 if args.smoke else args.host_slots)})
    if "profile" not in skip:
        for name in variants:
            emit({"bench": "profile", "variant": name, **profile_step(model, tokenizer, device, VARIANTS[name])})
    return 0


if __name__ == "__main__":
    t0 = time.time()
    code = main()
    print(f"# {time.time() - t0:.0f} s", file=sys.stderr)
    sys.exit(code)
