"""Evaluation on JEC-QA: direct, reasoning and choice modes, batched on the model's device.

Scoring follows JEC-QA's official rule (a question counts only when the predicted letter set equals
the gold set); extraction and the summary live in ``scoring.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import EvalConfig, ModelConfig
from .data import Record, load_records, sha256_file, statement_key
from .attention import FAST_ATTENTION, attention_implementation, eager_stance, fast_attention
from .decode import graph_decode_supported, greedy_decode
from .model import world_size
from .prompts import ANSWER_PREFIX, THINK_CLOSE, answer_text, render_prompt
from .scoring import extract_answer, summarize

log = logging.getLogger("lawtune")


# ----------------------------------------------------------------------------- option shuffling


def shuffle_options(record: Record, seed: int) -> tuple[Record, dict[str, str]]:
    """Re-letter the options with a per-question fixed seed; returns (record, new letter -> old letter)."""
    old = list(record.options)
    rng = random.Random(f"{seed}:{record.id}")
    order = old[:]
    rng.shuffle(order)
    new_to_old = dict(zip(old, order))  # position i now shows the option that had letter order[i]
    options = {new: record.options[src] for new, src in new_to_old.items()}
    old_to_new = {src: new for new, src in new_to_old.items()}
    answer = sorted(old_to_new[a] for a in record.answer) if record.answer is not None else None
    return Record(**{**record.__dict__, "options": options, "answer": answer}), new_to_old


# ----------------------------------------------------------------------------- generation


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _encode_batch(tokenizer, texts: list[str], device) -> dict:
    """Left-padded input ids and attention mask (generation appends on the right, so pad on the left).

    Padding is done here with torch: the tokenizer's own padding to tensors goes through Python lists.
    Measured on the development CPU for 1,000 JEC-QA prompts with the real tokenizer: 0.40 s with the
    tokenizer's padding, 0.26 s tokenizing unpadded and padding here. The GPU idles during that time.
    """
    tokenizer.padding_side = "left"
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[row, width - len(x):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


# A preallocated cache pays off for long generations only. Measured on an H100 (bench/README.md): for direct
# mode's 8 tokens the growing cache was faster (1,000 questions: 4.51 s vs 4.83 s static); for 512-token
# reasoning the static one was (9,117 vs 6,938 generated tokens/s). Where between them the two cross was
# not measured; 32 is a chosen cut that puts direct mode and forced answers on the growing cache.
STATIC_CACHE_MIN_TOKENS = 32


@torch.inference_mode()
def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int, ecfg: EvalConfig,
                   **generate_kwargs) -> list[tuple[str, int, bool]]:
    """Generate for a batch of prompts; returns (text, generated token count, stopped by the end token).

    Extra keyword arguments (a streamer, stopping criteria) are passed on to ``model.generate``.
    """
    batch = _encode_batch(tokenizer, prompts, _device_of(model))
    distributed = world_size() > 1
    if (ecfg.cuda_graphs and not ecfg.do_sample and not generate_kwargs and not distributed
            and batch["input_ids"].device.type == "cuda" and graph_decode_supported(model)):
        with fast_attention(model), eager_stance(model):
            new = greedy_decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens,
                                tokenizer.eos_token_id, tokenizer.pad_token_id).tolist()
        return _decode_rows(tokenizer, new)
    kwargs = {"do_sample": ecfg.do_sample}
    if ecfg.do_sample:
        kwargs.update(temperature=ecfg.temperature, top_p=ecfg.top_p)
    else:  # a model's generation_config may ask for sampling; greedy must mean greedy
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if ecfg.static_cache and max_new_tokens >= STATIC_CACHE_MIN_TOKENS and "past_key_values" not in generate_kwargs:
        # A preallocated cache: no per-token copy of the whole cache. transformers would compile the model for it,
        # once per batch shape, which costs more than it saves here.
        kwargs.update(cache_implementation="static", disable_compile=True)
    # In a distributed job every rank keeps stepping until all are done (sharded models need it).
    kwargs["synced_gpus"] = distributed
    with fast_attention(model), eager_stance(model):
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             use_cache=True, eos_token_id=tokenizer.eos_token_id, **kwargs, **generate_kwargs)
    return _decode_rows(tokenizer, out[:, batch["input_ids"].shape[1]:].tolist())


def _decode_rows(tokenizer, new: list[list[int]]) -> list[tuple[str, int, bool]]:
    results = []
    for row in new:
        stopped = tokenizer.eos_token_id in row
        ids = row[: row.index(tokenizer.eos_token_id)] if stopped else row
        results.append((tokenizer.decode(ids, skip_special_tokens=True), len(ids) + int(stopped), stopped))
    return results


def _answer_part(text: str) -> str:
    """The text after the last </think>: reasoning may mention letters it later rejects."""
    return text.rsplit("</think>", 1)[-1] if "</think>" in text else text


def _direct(model, tokenizer, records, prompt_format, ecfg) -> list[dict]:
    prompts = [render_prompt(r, tokenizer, prompt_format, think=False) for r in records]
    rows = []
    for (text, n_tokens, _), r in zip(generate_batch(model, tokenizer, prompts, ecfg.direct_max_new_tokens, ecfg), records):
        rows.append({"output": text, "pred": extract_answer(text, "".join(r.options)), "generated_tokens": n_tokens,
                     "forced": False})
    return rows


def _reasoning(model, tokenizer, records, prompt_format, ecfg) -> list[dict]:
    prompts = [render_prompt(r, tokenizer, prompt_format, think=True) for r in records]
    results = generate_batch(model, tokenizer, prompts, ecfg.max_new_tokens, ecfg)
    rows: list[dict] = [{} for _ in records]
    cut = [i for i, (_, _, stopped) in enumerate(results) if not stopped]
    for i, (text, n_tokens, stopped) in enumerate(results):
        rows[i] = {"output": text, "generated_tokens": n_tokens, "forced": not stopped}
    if cut:
        # A row that ran out of budget is closed and asked for its answer; it is flagged as forced so
        # a cut-off never silently counts as an ordinary right or wrong answer.
        closing = {i: ("\n" + ANSWER_PREFIX if "</think>" in results[i][0] else THINK_CLOSE[prompt_format] + ANSWER_PREFIX)
                   for i in cut}
        forced_prompts = [prompts[i] + results[i][0] + closing[i] for i in cut]
        for i, (text, n_tokens, _) in zip(cut, generate_batch(model, tokenizer, forced_prompts, ecfg.direct_max_new_tokens, ecfg)):
            rows[i]["output"] = results[i][0] + closing[i] + text
            rows[i]["generated_tokens"] += n_tokens
    for row, r in zip(rows, records):
        row["pred"] = extract_answer(_answer_part(row["output"]), "".join(r.options))
    return rows


def candidate_answers(letters: str) -> list[str]:
    """Every non-empty subset of the options, so multi-answer questions compete fairly."""
    return ["".join(c) for k in range(1, len(letters) + 1) for c in itertools.combinations(letters, k)]


@torch.inference_mode()
def score_candidates(model, tokenizer, records, prompt_format) -> list[list[tuple[str, float]]]:
    """Summed log-likelihood of '答案：X' + end token for every candidate X of every record.

    One forward pass per batch scores every candidate of every question. After each (left-padded) prompt
    come its candidates laid out as a tree: the tokens that all candidates share once, then each
    candidate's own tokens. A 4D attention mask lets a candidate token see the prompt, the shared tokens
    and its own earlier tokens only, and its position ids continue from there, so every score equals
    that of the candidate's full text alone (tests/test_evaluate.py). Nothing is copied per candidate
    (the prompt's keys and values are computed once), and logits are taken only after the prompt.
    """
    with fast_attention(model), eager_stance(model):
        if attention_implementation(model) not in ("sdpa", "eager", FAST_ATTENTION):
            return _score_candidates_with_cache(model, tokenizer, records, prompt_format)
        return _score_candidates_tree(model, tokenizer, records, prompt_format)


def _candidate_tokens(tokenizer, letters: str) -> tuple[list[str], list[list[int]], int]:
    """Candidates, their token ids (answer text + end token), and how many leading tokens all share."""
    cands = candidate_answers(letters)
    toks = [tokenizer(answer_text(c), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in cands]
    shared = 0
    while shared < min(len(t) for t in toks) - 1 and len({t[shared] for t in toks}) == 1:
        shared += 1
    return cands, toks, shared


def _score_candidates_tree(model, tokenizer, records, prompt_format) -> list[list[tuple[str, float]]]:
    device = _device_of(model)
    prompts = [tokenizer(render_prompt(r, tokenizer, prompt_format, think=False), add_special_tokens=False)["input_ids"]
               for r in records]
    by_letters: dict[str, tuple] = {}  # candidates depend only on the option letters: tokenize each set once
    for r in records:
        key = "".join(r.options)
        if key not in by_letters:
            by_letters[key] = _candidate_tokens(tokenizer, key)
    layouts = [by_letters["".join(r.options)] for r in records]
    regions = [toks[0][:shared] + [x for t in toks for x in t[shared:]] for _, toks, shared in layouts]
    width_p, width_c = max(map(len, prompts)), max(map(len, regions))
    total = width_p + width_c
    rows_ids, rows_pos, rows_seg, rows_pred = [], [], [], []
    for prompt, (_, toks, shared) in zip(prompts, layouts):
        n, pad = len(prompt), width_p - len(prompt)
        r_ids = [tokenizer.pad_token_id] * pad + prompt + toks[0][:shared]
        r_pos = [0] * pad + list(range(n + shared))
        r_seg = [-1] * pad + [0] * (n + shared)  # -1 padding, 0 prompt and shared tokens, j: candidate j's own
        r_pred = list(range(-1, width_p + shared - 1))  # the column whose logits predict this column's token
        trunk_end = width_p + shared - 1
        for j, tok in enumerate(toks, start=1):
            for t, x in enumerate(tok[shared:]):
                r_ids.append(x)
                r_pos.append(n + shared + t)
                r_seg.append(j)
                r_pred.append(trunk_end if t == 0 else len(r_pred) - 1)
        tail = total - len(r_ids)
        rows_ids.append(r_ids + [tokenizer.pad_token_id] * tail)
        rows_pos.append(r_pos + [0] * tail)
        rows_seg.append(r_seg + [-1] * tail)
        rows_pred.append(r_pred + [width_p - 1] * tail)
    ids, pos, seg, pred = (torch.tensor(x) for x in (rows_ids, rows_pos, rows_seg, rows_pred))
    ids, pos, seg = ids.to(device), pos.to(device), seg.to(device)
    q, k = seg.unsqueeze(2), seg.unsqueeze(1)
    causal = torch.ones(total, total, dtype=torch.bool, device=device).tril()
    mask = causal & (k >= 0) & (q >= 0) & ((k == 0) | (k == q))
    mask |= torch.eye(total, dtype=torch.bool, device=device)  # padding attends to itself: no empty softmax rows
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    logits = model(input_ids=ids, attention_mask=mask.unsqueeze(1), position_ids=pos, use_cache=False,
                   logits_to_keep=width_c + 1).logits  # columns width_p - 1 ... total - 1
    first = width_p - 1
    region_pred = (pred[:, width_p:] - first).to(device)  # (rows, width_c) into the kept logits
    targets = ids[:, width_p:]
    logp = torch.empty(targets.shape, dtype=torch.float32, device=device)
    for r in range(0, len(records), 16):  # float32 log-softmax a few rows at a time
        chunk = logits[r: r + 16].float()
        lse = torch.logsumexp(chunk, dim=-1)  # (rows, width_c + 1)
        at = region_pred[r: r + 16]
        rows = torch.arange(chunk.shape[0], device=device).unsqueeze(1)
        logp[r: r + 16] = chunk[rows, at, targets[r: r + 16]] - lse.gather(1, at)
    logp = logp.tolist()
    seg_c = seg[:, width_p:].tolist()
    out_rows = []
    for i, (cands, toks, shared) in enumerate(layouts):
        trunk = sum(logp[i][:shared])
        sums = [trunk] * len(cands)
        for c, s_ in enumerate(seg_c[i][shared:], start=shared):
            if s_ > 0:
                sums[s_ - 1] += logp[i][c]
        out_rows.append(list(zip(cands, sums)))
    return out_rows


@torch.inference_mode()
def _score_candidates_with_cache(model, tokenizer, records, prompt_format) -> list[list[tuple[str, float]]]:
    """The same scores for attention kernels that take no 4D mask: a prompt pass, its cache repeated per candidate."""
    device = _device_of(model)
    prompts = [render_prompt(r, tokenizer, prompt_format, think=False) for r in records]
    batch = _encode_batch(tokenizer, prompts, device)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
    cache = out.past_key_values

    cands = [candidate_answers("".join(r.options)) for r in records]
    owner = torch.tensor([i for i, c in enumerate(cands) for _ in c], device=device)
    cand_ids = [tokenizer(answer_text(c), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for cs in cands for c in cs]
    width = max(len(x) for x in cand_ids)
    ids = torch.full((len(cand_ids), width), tokenizer.pad_token_id, dtype=torch.long, device=device)
    cmask = torch.zeros_like(ids)
    for j, x in enumerate(cand_ids):
        ids[j, : len(x)] = torch.tensor(x, device=device)
        cmask[j, : len(x)] = 1
    cache.batch_select_indices(owner)
    full_mask = torch.cat([mask[owner], cmask], dim=1)
    cpos = mask.sum(-1)[owner].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=full_mask, position_ids=cpos, past_key_values=cache, use_cache=True).logits
    logp = torch.log_softmax(logits.float(), dim=-1)
    # Token t of a candidate is predicted by the prompt's last position (t = 0) or candidate token t-1.
    score = first_logp[owner].gather(1, ids[:, :1]).squeeze(1)
    rest = logp[:, :-1].gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * cmask[:, 1:]
    flat = (score + rest.sum(1)).tolist()
    out_rows, j = [], 0
    for cs in cands:
        out_rows.append(list(zip(cs, flat[j: j + len(cs)])))
        j += len(cs)
    return out_rows


def _choice(model, tokenizer, records, prompt_format, ecfg) -> list[dict]:
    rows = []
    for scored in score_candidates(model, tokenizer, records, prompt_format):
        best, value = max(scored, key=lambda cs: cs[1])
        rows.append({"output": answer_text(best), "pred": list(best), "generated_tokens": 0, "forced": False,
                     "score": round(value, 4)})
    return rows


MODES = {"direct": _direct, "reasoning": _reasoning, "choice": _choice}


def evaluate_records(model, tokenizer, records: list[Record], ecfg: EvalConfig, prompt_format: str = "chat",
                     show_progress: bool = True) -> tuple[list[dict], dict]:
    """Score records with a live model; returns (per-question samples, summary)."""
    run = MODES[ecfg.mode]
    shown = [shuffle_options(r, ecfg.seed) if ecfg.shuffle_options else (r, None) for r in records]
    # Sorting by length keeps padding (and wasted compute) low inside each batch.
    order = sorted(range(len(records)), key=lambda i: len(records[i].statement) + sum(map(len, records[i].options.values())))
    samples: list[dict | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc=f"eval ({ecfg.mode})", unit="q", disable=not show_progress, dynamic_ncols=True)
    start = time.time()
    for k in range(0, len(order), ecfg.batch_size):
        idx = order[k: k + ecfg.batch_size]
        for i, row in zip(idx, run(model, tokenizer, [shown[i][0] for i in idx], prompt_format, ecfg)):
            record, new_to_old = records[i], shown[i][1]
            pred = row["pred"]
            if pred is not None and new_to_old:
                pred = sorted(new_to_old[p] for p in pred)
            gold = record.answer or []
            samples[i] = {"id": record.id, "type": record.type, "gold": gold, "pred": pred or [],
                          "valid": pred is not None, "correct": pred is not None and set(pred) == set(gold),
                          "forced": row["forced"], "generated_tokens": row["generated_tokens"], "output": row["output"]}
            if new_to_old:
                samples[i]["shown_letters"] = new_to_old
        bar.update(len(idx))
        bar.set_postfix(q_s=f"{bar.n / max(time.time() - start, 1e-9):.1f}")
    bar.close()
    elapsed = time.time() - start
    summary = summarize(samples)
    summary["questions_per_s"] = round(len(records) / max(elapsed, 1e-9), 2)
    summary["seconds"] = round(elapsed, 2)
    summary["mode"] = ecfg.mode
    return samples, summary


def evaluate_sharded(model, tokenizer, records: list[Record], ecfg: EvalConfig, prompt_format: str = "chat"):
    """evaluate_records split across the ranks of a distributed job, gathered on every rank.

    Each rank scores a disjoint, equally long slice (the last one padded with repeats that are dropped
    after gathering), so all ranks run the same number of forward passes, which sharded (FSDP)
    models need.
    """
    import torch.distributed as dist

    if world_size() == 1:
        return evaluate_records(model, tokenizer, records, ecfg, prompt_format, show_progress=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = -(-len(records) // world)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, len(records))))
    real = len(indices)
    indices += [indices[-1] if indices else 0] * (per_rank - real)
    samples, _ = evaluate_records(model, tokenizer, [records[i] for i in indices], ecfg, prompt_format,
                                  show_progress=False)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, samples[:real])
    merged = [s for part in gathered for s in part]
    summary = summarize(merged)
    summary["mode"] = ecfg.mode
    return merged, summary


# ----------------------------------------------------------------------------- command


def training_overlap(adapter: str | None, records: list[Record]) -> int:
    """How many evaluated questions share a statement with the adapter's training split."""
    if not adapter:
        return 0
    manifest_path = Path(adapter) / "data_manifest.json"
    if not manifest_path.is_file():
        return 0
    import hashlib

    trained = set(json.loads(manifest_path.read_text(encoding="utf-8")).get("train_statements_sha256", []))
    return sum(hashlib.sha256(statement_key(r).encode("utf-8")).hexdigest()[:16] in trained for r in records)


def run_eval(mcfg: ModelConfig, ecfg: EvalConfig, data: str, output: str = "report.json", adapter: str | None = None,
             prompt_format: str | None = None, max_samples: int | None = None) -> dict:
    """`lawtune eval`: load the model once, score a file, write the report."""
    from .model import load_for_inference

    loaded = load_records(data, require_answer=True, max_samples=max_samples)
    for reason, count in loaded.skipped.items():
        log.warning("%s: skipped %d records (%s)", data, count, reason)
    if prompt_format is None:  # an adapter remembers the format it was trained with
        prompt_format = _adapter_prompt_format(adapter) or "chat"
    overlap = training_overlap(adapter, loaded.records)
    if overlap:
        log.warning("!!! %d of %d questions in %s share a statement with this adapter's TRAINING split: "
                    "the accuracy below is not a held-out result !!!", overlap, len(loaded.records), data)
    model, tokenizer = load_for_inference(mcfg, adapter)
    samples, summary = evaluate_records(model, tokenizer, loaded.records, ecfg, prompt_format)
    summary.update({"model": mcfg.path, "adapter": adapter, "data": str(data), "data_sha256": sha256_file(data),
                    "prompt_format": prompt_format, "shuffle_options": ecfg.shuffle_options,
                    "skipped": loaded.skipped, "train_overlap": overlap})
    report = {"summary": summary, "samples": samples}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    return report


def _adapter_prompt_format(adapter: str | None) -> str | None:
    if not adapter:
        return None
    path = Path(adapter) / "lawtune_config.yaml"
    if not path.is_file():
        return None
    import yaml

    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data", {}).get("prompt_format")
