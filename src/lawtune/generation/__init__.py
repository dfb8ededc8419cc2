"""Generation: the one place that turns prompts into text (eval, ask, predict, serve and in-training eval).

``generate`` runs a batch of prompts through the engine of ``engine/`` (continuous batching on a static cache,
greedy or sampled, CUDA graphs on a GPU; its package docstring lists its parts); where the engine cannot run the
model (another attention kernel, sliding windows, a model sharded across the ranks of a distributed job) through
transformers' ``generate``, both with the evaluation attention of ``attention.py``. ``reason_then_answer`` is the
one forced-answer rule of reasoning mode. The static-batch CUDA-graph decoder the engine replaced lives on as the
baseline of ``bench/generation.py`` (``bench/static_decoder.py``). A trainer that samples from the model it trains
(GRPO) can have the engine run an inference copy with the LoRA adapter folded in (``folded.py``, ``engine_holder``'s
``fold``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..dist import world_size
from ..think import CLOSE, closing_text
from .attention import eager_stance, fast_attention
from .engine import EngineHolder, Request, Sample, SamplingParams, engine_supported

# Default budgets of the two generating modes: '答案：ABCD' and the end token are 5 tokens of R1-Distill's
# tokenizer; R1-style thinking often runs past 1,000 tokens.
DIRECT_BUDGET = 8
REASONING_BUDGET = 2048
# What a forced answer may add after a cut-off trace (the direct budget), within the overall budget.
ANSWER_RESERVE = DIRECT_BUDGET

# A preallocated cache pays off for long generations only. Measured on an H100 (bench/README.md): for direct
# mode's 8 tokens the growing cache was faster (1,000 questions: 4.51 s vs 4.83 s static); for 512-token
# reasoning the static one was (9,117 vs 6,938 generated tokens/s). Where between them the two cross was
# not measured; 32 is a chosen cut that puts direct mode and forced answers on the growing cache.
STATIC_CACHE_MIN_TOKENS = 32


@dataclass
class Generated:
    text: str
    """The decoded new tokens, special tokens left out (the end token is not part of the text)."""
    tokens: int
    """New tokens the model produced, the end token included."""
    stopped: bool
    """Ended by the end token (False: the budget ran out)."""
    token_ids: list[int] | None = None
    """The new tokens, the end token included (engine path)."""
    logprobs: list[float] | None = None
    """Their log-probabilities under the model (engine path)."""


def default_budget(mode: str, max_new_tokens: int | None) -> int:
    """The token budget of a mode: the one asked for, else the mode's default."""
    if max_new_tokens is not None:
        return max_new_tokens
    return REASONING_BUDGET if mode == "reasoning" else DIRECT_BUDGET


def split_budget(budget: int) -> tuple[int, int]:
    """(thinking budget, forced-answer budget) of reasoning mode: the two together never exceed ``budget``."""
    reserve = min(ANSWER_RESERVE, budget // 2)
    return budget - reserve, reserve


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def encode_batch(tokenizer, texts: list[str], device) -> dict:
    """Left-padded input ids and attention mask (generation appends on the right, so pad on the left).

    Padding is done here with torch, never through the tokenizer's padding side (the tokenizer may be
    shared with a training collator). Also measured faster: on the development CPU, 1,000 JEC-QA prompts
    with the real tokenizer took 0.40 s with the tokenizer's padding and 0.26 s tokenizing unpadded and
    padding here; the GPU idles during that time.
    """
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def sampling_params(gcfg, max_new_tokens: int, n: int = 1) -> SamplingParams:
    """The engine's settings for a GenerationConfig: greedy unless ``do_sample``."""
    if not gcfg.do_sample:
        return SamplingParams(max_new_tokens=max_new_tokens, n=n)
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=gcfg.temperature, top_p=gcfg.top_p,
                          top_k=gcfg.top_k, seed=gcfg.seed, n=n)


def uses_engine(model, gcfg) -> bool:
    """Whether ``generate`` runs ``model`` on the engine (else on transformers' generate)."""
    return gcfg.engine and world_size() == 1 and engine_supported(model)


def generated(tokenizer, tokens: list[int], logprobs: list[float] | None = None) -> Generated:
    """A Generated from new token ids (the end token, where it came, ends them)."""
    eos = tokenizer.eos_token_id
    stopped = eos in tokens
    ids = tokens[: tokens.index(eos)] if stopped else tokens
    return Generated(tokenizer.decode(ids, skip_special_tokens=True), len(ids) + int(stopped), stopped,
                     ids + [eos] * stopped, logprobs[: len(ids) + int(stopped)] if logprobs is not None else None)


@torch.inference_mode()
def engine_holder(tokenizer, gcfg, fold: bool = False) -> EngineHolder:
    """An engine holder for a command or trainer that generates with ``gcfg`` (its owner closes it); ``fold``: a
    LoRA adapter is sampled folded into an inference copy (``EngineHolder``)."""
    return EngineHolder(tokenizer.eos_token_id, use_graph=None if gcfg.cuda_graphs else False, kv_cache=gcfg.kv_cache,
                        fold=fold)


@contextlib.contextmanager
def holding(engines: EngineHolder | None, tokenizer, gcfg) -> Iterator[EngineHolder]:
    """``engines``, or for a caller that passed none one of its own for the block, closed after it."""
    if engines is not None:
        yield engines
        return
    with engine_holder(tokenizer, gcfg) as own:
        yield own


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, gcfg, slots: int | None = None,
             keys: list[str] | None = None, engines: EngineHolder | None = None, n: int = 1) -> list[Generated]:
    """Generate for a batch of prompts with the settings of a GenerationConfig ``gcfg``; with ``n`` > 1, ``n``
    samples of each prompt (one prefill on the engine), prompt by prompt: prompt i's are results i*n to i*n+n-1.

    ``slots``: sequences decoded at once (default: all of them); ``keys`` name the prompts for their sampling seeds
    (default: the prompt text): sample i of a prompt comes from (gcfg.seed, its key, i) alone, whatever else is asked
    beside it. ``engines``: the caller's engine holder (its engine is reused and stays open); without one an engine
    is made for the call and closed after it."""
    if not prompts:
        return []
    if uses_engine(model, gcfg):
        done = engine_requests(model, tokenizer, prompts, sampling_params(gcfg, max_new_tokens, n), gcfg, slots, keys,
                               engines)
        return [generated(tokenizer, s.tokens, s.logprobs) for r in done for s in r.samples]
    runs = [hf_generate(model, tokenizer, prompts, max_new_tokens, gcfg) for _ in range(n)]
    return [run[i] for i in range(len(prompts)) for run in runs]


def engine_requests(model, tokenizer, prompts: list[str], params: SamplingParams, gcfg, slots: int | None,
                    keys: list[str] | None, engines: EngineHolder | None) -> list[Request]:
    """The prompts through the engine (of ``engines``, else one for the call), each with ``params``: the finished
    requests, in order."""
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    rows = len(prompts) * params.n
    slots = max(min(slots or rows, rows), params.n)
    with holding(engines, tokenizer, gcfg) as holder:
        engine = holder.get(model, slots, max(map(len, ids)) + params.row_tokens, least=params.n)
        return engine.generate([(x, params, k) for x, k in zip(ids, keys or prompts)])


def hf_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, gcfg) -> list[Generated]:
    """transformers' generate, for the models the engine cannot run."""
    batch = encode_batch(tokenizer, prompts, device_of(model))
    distributed = world_size() > 1
    kwargs = {"do_sample": gcfg.do_sample}
    if gcfg.do_sample:
        kwargs.update(temperature=gcfg.temperature, top_p=gcfg.top_p, top_k=gcfg.top_k or None)
    else:  # a model's generation_config may ask for sampling; greedy must mean greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if gcfg.static_cache and max_new_tokens >= STATIC_CACHE_MIN_TOKENS:
        # A preallocated cache: no per-token copy of the whole cache. transformers would compile the model for it,
        # once per batch shape, which costs more than it saves here.
        kwargs.update(cache_implementation="static", disable_compile=True)
    # In a distributed job every rank keeps stepping until all are done (sharded models need it).
    kwargs["synced_gpus"] = distributed
    with fast_attention(model), eager_stance(model):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return decode_rows(tokenizer, out[:, batch["input_ids"].shape[1]:].tolist())


def decode_rows(tokenizer, new: list[list[int]]) -> list[Generated]:
    results = []
    for row in new:
        stopped = tokenizer.eos_token_id in row
        ids = row[: row.index(tokenizer.eos_token_id)] if stopped else row
        results.append(Generated(tokenizer.decode(ids, skip_special_tokens=True), len(ids) + int(stopped), stopped))
    return results


def closing_room(tokenizer, prompt_format: str) -> int:
    """The most tokens a forced answer's closing takes (either closing text, tokenized alone)."""
    return max(len(tokenizer(closing_text(trace, prompt_format), add_special_tokens=False)["input_ids"])
               for trace in ("", CLOSE))


def forced_answer(tokenizer, prompt_format: str, reserve: int) -> dict[str, Any]:
    """The ``SamplingParams`` fields of reasoning mode's forced answer (the one rule of ``eval``, ``predict``, ``ask``
    and ``serve``): a trace cut off by its thinking budget gets ``think.closing_text`` of its text, tokenized alone,
    appended on its own row, and ``reserve`` more tokens for the answer."""

    def closing(tokens: list[int]) -> list[int]:
        trace = tokenizer.decode(tokens, skip_special_tokens=True)
        return tokenizer(closing_text(trace, prompt_format), add_special_tokens=False)["input_ids"]

    return {"forced_answer": closing, "answer_reserve": reserve, "closing_tokens": closing_room(tokenizer, prompt_format)}


def reasoning_output(tokenizer, sample: Sample, prompt_format: str) -> tuple[str, int, bool]:
    """(output, generated tokens, forced) of a reasoning-mode sample: a forced one's output is its trace, the
    closing text and its answer; its closing tokens are not generated ones."""
    if sample.forced_at is None:
        whole = generated(tokenizer, sample.tokens)
        return whole.text, whole.tokens, not whole.stopped
    trace = generated(tokenizer, sample.tokens[: sample.forced_at])
    answer = generated(tokenizer, sample.tokens[sample.forced_at:])
    return trace.text + closing_text(trace.text, prompt_format) + answer.text, trace.tokens + answer.tokens, True


def reason_then_answer(model, tokenizer, prompts: list[str], budget: int, gcfg, prompt_format: str,
                       slots: int | None = None, engines: EngineHolder | None = None, keys: list[str] | None = None,
                       n: int = 1) -> list[dict]:
    """Reasoning mode for a batch: think within the budget; a trace cut off by it is closed and asked for its
    answer (``forced``), so a cut-off never silently counts as an ordinary answer. Generated tokens, the forced
    answer's included, never exceed ``budget``. Returns {output, generated_tokens, forced} per prompt (per sample
    with ``n`` > 1, as ``generate`` orders them).

    On the engine the forced answer continues the sample's own row (``forced_answer``); on transformers' generate the
    closed trace is prompted again."""
    think, reserve = split_budget(budget)
    if not uses_engine(model, gcfg):
        return _reason_then_answer_hf(model, tokenizer, prompts, think, reserve, gcfg, prompt_format, n)
    params = sampling_params(gcfg, think, n)
    if reserve:
        params = dataclasses.replace(params, **forced_answer(tokenizer, prompt_format, reserve))
    done = engine_requests(model, tokenizer, prompts, params, gcfg, slots, keys, engines)
    rows = []
    for request in done:
        for sample in request.samples:
            output, tokens, forced = reasoning_output(tokenizer, sample, prompt_format)
            rows.append({"output": output, "generated_tokens": tokens, "forced": forced})
    return rows


def _reason_then_answer_hf(model, tokenizer, prompts, think, reserve, gcfg, prompt_format, n) -> list[dict]:
    prompts = [p for p in prompts for _ in range(n)]
    results = hf_generate(model, tokenizer, prompts, think, gcfg)
    rows: list[dict[str, Any]] = [{"output": r.text, "generated_tokens": r.tokens, "forced": not r.stopped} for r in results]
    cut = [i for i, r in enumerate(results) if not r.stopped]
    if cut and reserve:
        closing = {i: closing_text(results[i].text, prompt_format) for i in cut}
        forced = hf_generate(model, tokenizer, [prompts[i] + results[i].text + closing[i] for i in cut], reserve, gcfg)
        for i, more in zip(cut, forced):
            rows[i]["output"] = results[i].text + closing[i] + more.text
            rows[i]["generated_tokens"] += more.tokens
    return rows
