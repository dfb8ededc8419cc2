#!/usr/bin/env python
"""Generation throughput (issue 16), side by side in one run on one model:

    python bench/generation.py [--requests 512,2048]   # full size, one GPU (see bench/README.md)
    python bench/generation.py --smoke                  # tiny model on the CPU, seconds (tests/test_bench.py)

1. Mixed lengths (with ``--sampled`` also sampled at temperature 0.6, top-p 0.95): N reasoning prompts (JEC-QA-shaped, bench/jecqa_synth.py) whose budgets are drawn like R1
   traces (lognormal, median 900, p95 2,048, clipped to 100-2,048); every request runs to its budget (random
   weights never end on their own; the end token is ignored). Useful tokens = the budgets' sum.
   - ``static``: today's static batches before the engine (``static_decoder.greedy_decode``, CUDA graphs, batches of
     ``--static-batch`` in the given order, each running to its longest budget);
   - ``engine``: the continuous-batching engine with ``--slots`` rows;
   - ``generate``: plain transformers ``generate`` batches (static cache), on ``--plain-n`` requests only.
   Reported: useful tokens/s, raw tokens/s (every row of every step), slot occupancy, ratios.
2. One stream through the code path of ``ask`` (``infer.generate_events``, reasoning mode), beside one row
   without streaming through the static decoder and the engine, and one row streamed from the engine's
   background loop (serve's threads without HTTP).
3. ``serve`` at its default rows and row length (``--serve-slots``) with each ``--clients`` count of concurrent
   streaming clients on loopback (a comma list), and one client alone: aggregate tokens/s, tokens/s a client,
   requests answered, first-token p50 and p99, and (Linux) the server's CPU microseconds a token by thread: the
   engine's loop, the stream pump, the event loop (HTTP), tokenizing, other. The clients run in processes of their
   own, one asyncio loop each (``CLIENTS_A_PROCESS``), and start together.
4. ``--distill Q``: what ``lawtune distill`` asks of the engine (issue 17): Q questions x ``--samples`` sampled
   completions (temperature 0.6, top-p 0.95, one prefill per question), budgets drawn as in 1, completions/s;
   beside it plain ``generate`` sampling ``--samples`` sequences per prompt on ``--distill-plain`` completions.

The model is DeepSeek-R1-Distill-Qwen-1.5B's architecture with random weights in bf16 and the real tokenizer
(as in eval_throughput.py); with ``--adapter`` it carries a LoRA adapter of rank 16 on the seven projections (random,
non-zero), saved and loaded back the way ``eval --adapter`` loads one (``PeftModel.from_pretrained``), folded into
the weights as ``adapter.fold`` does (``--adapter unfolded``: not). Prints one JSON line per measurement, then a summary line with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import jecqa_synth  # noqa: E402
from eval_throughput import build, emit, env_info, timed  # noqa: E402


def workload(tokenizer, n: int, seed: int, smoke: bool):
    """(prompt ids, budget) of n reasoning requests."""
    from lawtune.data import load_records
    from lawtune.prompts import render_prompt

    with tempfile.TemporaryDirectory() as tmp:
        rows = jecqa_synth.eval_rows(tokenizer, n, seed=seed, scale=0.25 if smoke else 1.0)
        records = load_records(jecqa_synth.write_jsonl(rows, Path(tmp) / "q.jsonl")).records
    prompts = [tokenizer(render_prompt(r, tokenizer, "chat", think=True), add_special_tokens=False)["input_ids"]
               for r in records]
    rng = random.Random(seed)
    if smoke:
        budgets = [rng.randint(4, 24) for _ in prompts]
    else:
        budgets = [jecqa_synth.lognormal(rng, 900, 2048, 100, 2048) for _ in prompts]
    return prompts, budgets


def with_adapter(model, fold: bool):
    """``model`` with a LoRA adapter of rank 16 on the seven projections, non-zero, saved and loaded back as
    ``eval --adapter`` loads one (``fold``: folded into the weights, ``adapter.fold``)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    torch.manual_seed(1)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_pretrained(tmp)
        loaded = PeftModel.from_pretrained(lora.unload(), tmp).eval()
    if fold:
        loaded.merge_adapter()
    return loaded


def left_padded(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of prompts padded on the left."""
    width = max(map(len, prompts))
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, p in enumerate(prompts):
        x[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return x.to(device), mask.to(device)


def run_static(model, tokenizer, prompts, budgets, batch: int, device) -> dict:
    from static_decoder import greedy_decode

    from lawtune.generation.attention import fast_attention

    def go():
        raw = 0
        for k in range(0, len(prompts), batch):
            x, mask = left_padded(prompts[k: k + batch], tokenizer.pad_token_id, device)
            with fast_attention(model):  # as generation.generate ran it before the engine
                out = greedy_decode(model, x, mask, max(budgets[k: k + batch]), eos_token_id=-1,
                                    pad_token_id=tokenizer.pad_token_id)
            raw += out.numel()
        return raw

    raw, seconds = timed(device, go)
    useful = sum(budgets)
    return {"seconds": round(seconds, 2), "useful_tokens_per_s": round(useful / seconds, 1),
            "raw_tokens_per_s": round(raw / seconds, 1), "occupancy": round(useful / raw, 3)}


def run_engine(model, tokenizer, prompts, budgets, slots: int, device, fifo: bool = False,
               sampled: bool = False) -> dict:
    """``GenerationEngine.generate`` (all known up front: largest budget first), or with ``fifo`` the requests
    submitted one by one in their order, as a server receives them; ``sampled``: temperature 0.6, top-p 0.95."""
    from lawtune.generation.engine import GenerationEngine, SamplingParams

    max_len = max(map(len, prompts)) + max(budgets)
    slots = slots or budget_slots(model, len(prompts), max_len)
    engine = GenerationEngine(model, tokenizer.eos_token_id, slots=slots, max_len=max_len)
    sampling = {"temperature": 0.6, "top_p": 0.95} if sampled else {}
    # compilation, then every step graph recorded before the clock starts (a long eval records them once)
    _, capture_s = timed(device, lambda: (engine.generate([(prompts[0], SamplingParams(
        max_new_tokens=8, ignore_eos=True, **sampling), None)]), engine.capture_graphs()))
    engine.steps = engine.busy_rows = engine.row_steps = 0
    requests = [(p, SamplingParams(max_new_tokens=b, ignore_eos=True, **sampling), str(i))
                for i, (p, b) in enumerate(zip(prompts, budgets))]

    def fifo_run():
        submitted = [engine.submit(*r) for r in requests]
        engine.run()
        return submitted

    done, seconds = timed(device, fifo_run if fifo else lambda: engine.generate(requests))
    useful = sum(len(r.samples[0].tokens) for r in done)
    assert useful == sum(budgets), (useful, sum(budgets))
    row = {"slots": slots, "kv_cache_gib": round(engine.cache_gib, 2), "capture_s": round(capture_s, 1),
           "graphs": len(engine.runner.graphs) if engine.runner else 0, "seconds": round(seconds, 2),
           "useful_tokens_per_s": round(useful / seconds, 1), "raw_tokens_per_s": round(engine.row_steps / seconds, 1),
           "occupancy": round(engine.busy_rows / max(engine.steps * slots, 1), 3), "steps": engine.steps,
           **peak_memory(device)}
    engine.close()
    return row


def budget_slots(model, wanted: int, max_len: int) -> int:
    """The rows ``eval`` and ``distill`` get at their defaults: as many as generation.kv_cache holds, at most
    ``wanted`` (rows of ``max_len`` rounded up as the engine holder rounds them)."""
    from lawtune.config import GenerationConfig
    from lawtune.generation.engine import budget_rows

    return min(wanted, budget_rows(model, -(-max_len // 256) * 256, GenerationConfig().kv_cache))


def peak_memory(device) -> dict:
    """The device's peak allocated memory since the last reset (then reset), in GiB."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_gib": round(peak, 2)}


def free_cache(device) -> None:
    """Give an engine's slot cache back before the next run allocates its own."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_plain(model, tokenizer, prompts, budgets, device) -> dict:
    from lawtune.generation.attention import fast_attention

    def go():
        x, mask = left_padded(prompts, tokenizer.pad_token_id, device)
        width = x.shape[1]
        with torch.inference_mode(), fast_attention(model):
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max(budgets),
                                 min_new_tokens=max(budgets), do_sample=False, temperature=None, top_p=None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id, cache_implementation="static", disable_compile=True)
        return (out.shape[1] - width) * out.shape[0]

    raw, seconds = timed(device, go)
    return {"seconds": round(seconds, 2), "useful_tokens_per_s": round(sum(budgets) / seconds, 1),
            "raw_tokens_per_s": round(raw / seconds, 1), "requests": len(prompts)}


def run_distill_engine(model, tokenizer, prompts, budgets, samples: int, slots: int, device) -> dict:
    from lawtune.generation.engine import GenerationEngine, SamplingParams

    max_len = max(map(len, prompts)) + max(budgets)
    slots = slots or budget_slots(model, len(prompts) * samples, max_len)
    engine = GenerationEngine(model, tokenizer.eos_token_id, slots=slots, max_len=max_len)
    warm = SamplingParams(max_new_tokens=8, temperature=0.6, top_p=0.95, n=samples, ignore_eos=True)
    engine.generate([(prompts[0], warm, None)])  # graph capture
    engine.steps = engine.busy_rows = engine.row_steps = 0
    requests = [(p, SamplingParams(max_new_tokens=b, temperature=0.6, top_p=0.95, n=samples, ignore_eos=True), str(i))
                for i, (p, b) in enumerate(zip(prompts, budgets))]
    done, seconds = timed(device, lambda: engine.generate(requests))
    completions = sum(len(r.samples) for r in done)
    tokens = sum(len(s.tokens) for r in done for s in r.samples)
    assert tokens == samples * sum(budgets)
    row = {"slots": slots, "kv_cache_gib": round(engine.cache_gib, 2), "completions": completions,
           "seconds": round(seconds, 2), "completions_per_s": round(completions / seconds, 2),
           "tokens_per_s": round(tokens / seconds, 1),
           "occupancy": round(engine.busy_rows / max(engine.steps * slots, 1), 3), **peak_memory(device)}
    engine.close()
    return row


def run_distill_plain(model, tokenizer, prompts, budgets, samples: int, device) -> dict:
    from lawtune.generation.attention import fast_attention

    def go():
        x, mask = left_padded(prompts, tokenizer.pad_token_id, device)
        with torch.inference_mode(), fast_attention(model):
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=max(budgets),
                                 min_new_tokens=max(budgets), do_sample=True, temperature=0.6, top_p=0.95,
                                 num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                 cache_implementation="static", disable_compile=True)
        return out.shape[0]

    completions, seconds = timed(device, go)
    return {"completions": completions, "seconds": round(seconds, 2), "completions_per_s": round(completions / seconds, 2),
            "useful_tokens_per_s": round(samples * sum(budgets) / seconds, 1)}


def run_one_row(model, tokenizer, tokens: int, device) -> dict:
    """One sequence of ``tokens`` without streaming: the static decoder and the engine (one slot), the device's
    speed for one row beside which the stream's host work shows."""
    from static_decoder import greedy_decode

    from lawtune.generation.attention import fast_attention
    from lawtune.generation.engine import GenerationEngine, SamplingParams

    prompt = tokenizer("甲与乙订立买卖合同，下列哪些说法正确？", add_special_tokens=False)["input_ids"]
    x, mask = left_padded([prompt], tokenizer.pad_token_id, device)
    engine = GenerationEngine(model, tokenizer.eos_token_id, slots=1, max_len=len(prompt) + tokens)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)

    def static():
        with fast_attention(model):
            return greedy_decode(model, x, mask, tokens, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)

    static(), engine.generate([(prompt, params, None)])  # warm-up, graph capture
    _, static_s = timed(device, static)
    _, engine_s = timed(device, lambda: engine.generate([(prompt, params, None)]))

    def streamed():  # with the loop in its own thread, as serve runs it, and this thread reading every token
        return sum(1 for _ in engine.stream(engine.submit(prompt, params, stream=True)))

    streamed()
    engine.start()
    try:
        streamed()
        _, background_s = timed(device, streamed)
    finally:
        engine.stop()
    return {"tokens": tokens, "static_tokens_per_s": round(tokens / static_s, 1),
            "engine_tokens_per_s": round(tokens / engine_s, 1),
            "engine_background_stream_tokens_per_s": round(tokens / background_s, 1)}


def run_ask_stream(model, tokenizer, tokens: int, device) -> dict:
    from lawtune.config import GenerationConfig
    from lawtune.infer import LoadedModel, generate_events, record_from_fields

    engine = LoadedModel(model, tokenizer, "chat", GenerationConfig(max_new_tokens=tokens))
    record = record_from_fields("甲与乙订立买卖合同，下列哪些说法正确？", {"A": "合同成立", "B": "合同无效"})
    for _ in generate_events(engine, record, "reasoning", 16):  # warm-up, graph capture
        pass

    def go():
        first, pieces = None, 0
        start = time.perf_counter()
        for kind, value in generate_events(engine, record, "reasoning", tokens):
            if kind != "done" and first is None:
                first = time.perf_counter() - start
            pieces += kind != "done"
            answer = value
        return answer, first, pieces

    (answer, first, pieces), seconds = timed(device, go)
    return {"generated_tokens": answer.generated_tokens, "seconds": round(seconds, 2), "pieces": pieces,
            "tokens_per_s": round(answer.generated_tokens / seconds, 1), "first_piece_s": round(first or 0, 3)}


QUESTION = "甲与乙订立买卖合同，下列哪些说法正确？\nA. 合同成立\nB. 合同无效\nC. 可撤销"


# Clients a client process drives (one asyncio loop each). A thread a client in one process, as before the
# twenty-first session, cost that process more CPU than the server (3.75 s against ~3 s a 32-client wave on the
# development CPU) and capped what a wave could measure: with the same server, 32 clients made ~3,400 tokens/s with
# threads and ~5,300 with one asyncio client (bench/README.md).
CLIENTS_A_PROCESS = 64


def client_wave(url: str, n: int, tokens: int, sequential: bool = False, start_at: float | None = None,
                first: int = 0) -> dict:
    """``n`` streaming clients (numbered from ``first``) against ``url`` at once, or ``sequential``ly, from one asyncio
    loop, starting at the wall-clock time ``start_at`` (default now): each one's tokens and time to its first
    token, and when the last ended."""
    import asyncio

    import httpx

    async def one(client, i: int) -> dict:
        body = {"model": "lawtune", "stream": True, "mode": "reasoning", "max_tokens": tokens,
                "messages": [{"role": "user", "content": QUESTION + f"\n（第{i}题）"}]}
        start, ttft, usage = time.perf_counter(), None, None
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                return {"ttft": None, "tokens": 0, "status": resp.status_code}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                item = json.loads(line[6:])
                delta = item["choices"][0]["delta"] if item.get("choices") else {}
                if ttft is None and (delta.get("reasoning_content") or delta.get("content")):
                    ttft = time.perf_counter() - start
                usage = item.get("usage") or usage
        return {"ttft": ttft, "tokens": usage["completion_tokens"] if usage else 0}

    async def wave() -> list[dict]:
        limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            if start_at is not None:
                await asyncio.sleep(max(0.0, start_at - time.time()))
            if sequential:
                return [await one(client, first + i) for i in range(n)]
            return list(await asyncio.gather(*(one(client, first + i) for i in range(n))))

    begun = time.time() if start_at is None else start_at
    out = asyncio.run(wave())
    return {"clients": out, "start": begun, "end": time.time()}


def remote_wave(url: str, n: int, tokens: int, sequential: bool = False) -> dict:
    """``n`` clients in processes of their own (``CLIENTS_A_PROCESS`` each), as real clients are: in the server's
    process they would take turns with its threads for the interpreter. All start at one wall-clock time; aggregate
    tokens/s from it to the last client's end, and time to first token over all."""
    procs = []
    start_at = time.time() + 3.0  # every process has imported httpx by then
    for first in range(0, n, n if sequential else CLIENTS_A_PROCESS):
        count = min(n - first, n if sequential else CLIENTS_A_PROCESS)
        procs.append(subprocess.Popen([sys.executable, __file__, "--client-of", url, "--clients", str(count),
                                       "--serve-tokens", str(tokens), "--client-start", repr(start_at),
                                       "--client-first", str(first), *(["--sequential"] if sequential else [])],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    waves = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"client process failed: {stderr[-2000:]}")
        waves.append(json.loads(stdout.strip().splitlines()[-1]))
    out = [c for w in waves for c in w["clients"]]
    seconds = max(w["end"] for w in waves) - start_at
    ttft = sorted(o["ttft"] for o in out if o["ttft"] is not None)
    tokens_total = sum(o["tokens"] for o in out)
    return {"clients": n, "client_processes": len(procs), "answered": sum(o["tokens"] > 0 for o in out),
            "seconds": round(seconds, 2), "tokens": tokens_total, "tokens_per_s": round(tokens_total / seconds, 1),
            "tokens_per_s_a_client": round(tokens_total / seconds / n, 1),
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))], 3) if ttft else None,
            "ttft_max_s": round(ttft[-1], 3) if ttft else None}


# The server's threads by name (serve's own); any other thread of the process (torch's intra-op pool, CUDA's and the
# bench's own) counts as "other".
SERVER_THREADS = {"lawtune-engine": "engine", "lawtune-streams": "streams", "lawtune-serve": "event_loop"}


def thread_cpu() -> dict[str, float]:
    """CPU seconds each thread of this process has used so far, summed by ``SERVER_THREADS``' names (Linux: read
    from /proc; elsewhere empty)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended meanwhile
            continue
        name = names.get(int(task.name), "")
        part = SERVER_THREADS.get(name, "tokenizing" if name.startswith("AnyIO worker") else "other")
        out[part] = out.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def cpu_a_token(before: dict[str, float], after: dict[str, float], tokens: int) -> dict[str, float]:
    """Microseconds of CPU a streamed token cost each part of the server between two ``thread_cpu`` readings: where
    the host's time goes, whatever else the machine runs (the clients, on a small one)."""
    return {part: round((after[part] - before.get(part, 0.0)) / max(tokens, 1) * 1e6, 1) for part in sorted(after)}


def measured_wave(url: str, n: int, tokens: int, sequential: bool = False) -> dict:
    """``remote_wave`` with the server's CPU a token by thread (``cpu_a_token``)."""
    before = thread_cpu()
    out = remote_wave(url, n, tokens, sequential)
    return {**out, "server_cpu_us_a_token": cpu_a_token(before, thread_cpu(), out["tokens"])}


def run_serve(model, tokenizer, clients: list[int], tokens: int, slots: int | None, interval: int | None = None) -> dict:
    """One server (``serve``'s defaults, or ``slots`` rows), one client alone, then each count of clients at once."""
    from lawtune.config import GenerationConfig, ServeConfig
    from lawtune.infer import LoadedModel
    from lawtune.serve import make_server, serving

    engine = LoadedModel(model, tokenizer, "chat", GenerationConfig())
    # only what is set: a tree before serve.stream_interval runs this bench too (old and new side by side)
    cfg = ServeConfig(port=0, **({"slots": slots} if slots else {}),
                      **({"stream_interval": interval} if interval is not None else {}))
    server = make_server(engine, cfg)
    with serving(server) as base:
        url = f"{base}/v1/chat/completions"
        remote_wave(url, 2, tokens)  # warm-up
        alone = measured_wave(url, 1, tokens)
        waves = [measured_wave(url, n, tokens) for n in clients]
        sequential = None
        if clients[0] <= 8:  # the same requests one after another (the CPU target compares these)
            sequential = remote_wave(url, clients[0], tokens, sequential=True)["tokens_per_s"]
        generator = server.state.loaded.generator
        rows = {"stream_interval": interval, "slots": generator.slots, "max_len": generator.max_len,
                "kv_cache_gib": round(generator.cache_gib, 2)} if generator else {"slots": 1, "max_len": cfg.max_len}
    return {**rows, "one_client": alone, "concurrent": waves[0], "waves": waves,
            "sequential_tokens_per_s": sequential,
            "aggregate_vs_one": round(waves[0]["tokens_per_s"] / alone["tokens_per_s"], 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny model, few requests, CPU: checks that everything runs")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (with --model-dir or the demo-sized model)")
    p.add_argument("--model-dir", help="directory with config.json and the tokenizer (default .bench_assets/ or ../shared/)")
    p.add_argument("--requests", default="512", help="mixed-length workload sizes (comma list)")
    p.add_argument("--slots", type=int, default=0,
                   help="engine rows (default 0: as many as generation.kv_cache's default holds, as eval and distill get)")
    p.add_argument("--static-batch", type=int, default=256)
    p.add_argument("--plain-n", type=int, default=64, help="requests of the plain-generate baseline (0 = skip)")
    p.add_argument("--stream-tokens", type=int, default=1024)
    p.add_argument("--clients", default="32", help="concurrent serve clients (comma list, e.g. 32,128,256)")
    p.add_argument("--serve-slots", type=int, help="serve's rows (default: serve's own default)")
    p.add_argument("--stream-interval", type=int, help="serve.stream_interval: tokens a streamed chunk (default: serve's)")
    p.add_argument("--adapter", nargs="?", const="folded", choices=["folded", "unfolded"],
                   help="the model with a LoRA adapter (r 16, seven projections), loaded as eval --adapter loads it: "
                   "folded into the weights (adapter.fold, the default) or not")
    p.add_argument("--serve-tokens", type=int, default=512)
    p.add_argument("--distill", type=int, default=0, help="questions of the distill workload (0 = skip it)")
    p.add_argument("--samples", type=int, default=4, help="completions per question in the distill workload")
    p.add_argument("--distill-plain", type=int, default=256,
                   help="completions of its plain-generate baseline (fewer than --samples: none)")
    p.add_argument("--sampled", action="store_true",
                   help="the mixed workload sampled too (temperature 0.6, top-p 0.95), beside greedy")
    p.add_argument("--skip", default="", help="parts to leave out: mixed,lpt,fifo,static,stream,serve,plain (comma list; lpt = the largest-budget-first run)")
    p.add_argument("--client-of", help=argparse.SUPPRESS)  # the client process of the serve measurement
    p.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--client-start", type=float, help=argparse.SUPPRESS)
    p.add_argument("--client-first", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.client_of:
        print(json.dumps(client_wave(args.client_of, int(args.clients), args.serve_tokens, args.sequential,
                                     args.client_start, args.client_first)))
        return 0
    if args.smoke:
        args.requests, args.slots, args.static_batch, args.plain_n = "12", 4, 4, 4
        args.distill, args.samples, args.distill_plain = 6, 2, 4
        args.stream_tokens, args.clients, args.serve_tokens, args.serve_slots = 24, "4", 12, 4
    skip = set(filter(None, args.skip.split(",")))
    device = torch.device("cuda" if torch.cuda.is_available() and not (args.smoke or args.cpu) else "cpu")
    emit(env_info(device))
    (model, tokenizer), build_s = timed(device, lambda: build(args, device))
    if args.adapter:
        model = with_adapter(model, fold=args.adapter == "folded")
    emit({"bench": "setup", "model_build_s": round(build_s, 1), "parameters": sum(p.numel() for p in model.parameters())})
    summary: dict = {"bench": "summary", "device": env_info(device)["device"]}
    plain_work = None
    for n in (int(x) for x in args.requests.split(",")) if "mixed" not in skip else ():
        prompts, budgets = workload(tokenizer, n, seed=n, smoke=args.smoke)
        plain_work = plain_work or (n, prompts[: args.plain_n], budgets[: args.plain_n])
        base = {"requests": n, "useful_tokens": sum(budgets), "mean_budget": round(sum(budgets) / n, 1),
                "max_budget": max(budgets)}
        engine = fifo = None
        if "lpt" not in skip:
            engine = emit({"bench": f"mixed{n}_engine", **base,
                           **run_engine(model, tokenizer, prompts, budgets, args.slots, device)})
            free_cache(device)
            summary[f"mixed{n}_engine_useful_tokens_per_s"] = engine["useful_tokens_per_s"]
        if args.sampled:
            sampled = emit({"bench": f"mixed{n}_engine_sampled", **base, "temperature": 0.6,
                            "top_p": 0.95, **run_engine(model, tokenizer, prompts, budgets, args.slots, device,
                                                        sampled=True)})
            free_cache(device)
            summary[f"mixed{n}_engine_sampled_useful_tokens_per_s"] = sampled["useful_tokens_per_s"]
            if engine:
                summary[f"mixed{n}_sampled_vs_greedy"] = round(sampled["useful_tokens_per_s"]
                                                               / engine["useful_tokens_per_s"], 3)
        if "fifo" not in skip:
            fifo = emit({"bench": f"mixed{n}_engine_fifo", **base,
                         **run_engine(model, tokenizer, prompts, budgets, args.slots, device, fifo=True)})
            free_cache(device)
            summary[f"mixed{n}_engine_fifo_useful_tokens_per_s"] = fifo["useful_tokens_per_s"]
        if "static" not in skip:
            static = emit({"bench": f"mixed{n}_static", **base, "batch": args.static_batch,
                           **run_static(model, tokenizer, prompts, budgets, args.static_batch, device)})
            if engine:
                summary[f"mixed{n}_engine_vs_static"] = round(engine["useful_tokens_per_s"]
                                                              / static["useful_tokens_per_s"], 2)
            if fifo:
                summary[f"mixed{n}_engine_fifo_vs_static"] = round(fifo["useful_tokens_per_s"]
                                                                   / static["useful_tokens_per_s"], 2)
    if args.distill:
        prompts, budgets = workload(tokenizer, args.distill, seed=17, smoke=args.smoke)
        engine_row = emit({"bench": "distill_engine", "questions": args.distill, "samples": args.samples,
                           **run_distill_engine(model, tokenizer, prompts, budgets, args.samples,
                                                                     args.slots, device)})
        free_cache(device)
        summary["distill_engine_completions_per_s"] = engine_row["completions_per_s"]
        k = args.distill_plain // args.samples
        if k:
            plain_row = emit({"bench": "distill_generate", "questions": k, "samples": args.samples,
                              **run_distill_plain(model, tokenizer, prompts[:k], budgets[:k], args.samples, device)})
            summary["distill_engine_vs_generate_completions_per_s"] = round(engine_row["completions_per_s"]
                                                                            / plain_row["completions_per_s"], 2)
    if "stream" not in skip:
        one_row = emit({"bench": "one_row", **run_one_row(model, tokenizer, args.stream_tokens, device)})
        summary["one_row_engine_vs_static"] = round(one_row["engine_tokens_per_s"] / one_row["static_tokens_per_s"], 2)
        stream = emit({"bench": "ask_stream", **run_ask_stream(model, tokenizer, args.stream_tokens, device)})
        summary["ask_stream_tokens_per_s"] = stream["tokens_per_s"]
        summary["ask_stream_vs_one_row_static"] = round(stream["tokens_per_s"] / one_row["static_tokens_per_s"], 2)
    if "serve" not in skip:
        serve = emit({"bench": "serve", **run_serve(model, tokenizer, [int(n) for n in args.clients.split(",")],
                                                     args.serve_tokens, args.serve_slots, args.stream_interval)})
        summary["serve_aggregate_vs_one_client"] = serve["aggregate_vs_one"]
        summary["serve_one_client_tokens_per_s"] = serve["one_client"]["tokens_per_s"]
        if serve["sequential_tokens_per_s"]:
            summary["serve_concurrent_vs_sequential"] = round(serve["concurrent"]["tokens_per_s"]
                                                              / serve["sequential_tokens_per_s"], 2)
    if args.plain_n and plain_work and "plain" not in skip:  # last: the slowest, and only a baseline
        n, prompts, budgets = plain_work
        plain = emit({"bench": f"mixed{n}_generate", "what": f"first {len(prompts)} requests in one batch",
                      **run_plain(model, tokenizer, prompts, budgets, device)})
        best = summary.get(f"mixed{n}_engine_useful_tokens_per_s") or summary[f"mixed{n}_engine_fifo_useful_tokens_per_s"]
        summary[f"mixed{n}_engine_vs_generate"] = round(best / plain["useful_tokens_per_s"], 2)
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
