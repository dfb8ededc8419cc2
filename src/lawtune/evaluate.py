"""Evaluation on JEC-QA: the direct, reasoning and choice modes, and the report of `lawtune eval`.

Generation is ``generation``'s; scoring follows JEC-QA's official rule (a question counts only when the
predicted letter set equals the gold set); extraction and the summary live in ``scoring.py``.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .config import EvalConfig, EvalRun, GenerationConfig, ModelConfig
from .config import replace as replace_config
from .data import Record, load_records, sha256_file
from .dist import gather_objects, world_size
from .dist import rank as process_rank
from .errors import UsageError
from .generation import default_budget, device_of, encode_batch, generate, holding, reason_then_answer
from .generation.attention import FAST_ATTENTION, attention_implementation, eager_stance, fast_attention
from .generation.engine import EngineHolder
from .progress import progress
from .prompts import answer_text, check_native, render_prompt
from .rundir import STATEMENT_ONLY_VERSIONS, adapter_base, resolve_prompt_format, training_overlap
from .scoring import MAJORITY_RULE, extract_answer, lawbench_summary, summarize, vote
from .think import answer_part

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


# ----------------------------------------------------------------------------- modes


def _direct(model, tokenizer, records, prompt_format, gcfg, slots=None, engines=None, n=1) -> list[dict]:
    prompts = [render_prompt(r, tokenizer, prompt_format, think=False) for r in records]
    budget = default_budget("direct", gcfg.max_new_tokens)
    rows = []
    for out, r in zip(generate(model, tokenizer, prompts, budget, gcfg, slots=slots, keys=[r.id for r in records],
                               engines=engines, n=n), [r for r in records for _ in range(n)]):
        rows.append({"output": out.text, "pred": extract_answer(out.text, "".join(r.options)),
                     "generated_tokens": out.tokens, "forced": False})
    return rows


def _reasoning(model, tokenizer, records, prompt_format, gcfg, slots=None, engines=None, n=1) -> list[dict]:
    prompts = [render_prompt(r, tokenizer, prompt_format, think=True) for r in records]
    rows = reason_then_answer(model, tokenizer, prompts, default_budget("reasoning", gcfg.max_new_tokens), gcfg,
                              prompt_format, slots=slots, engines=engines, keys=[r.id for r in records], n=n)
    for row, r in zip(rows, [r for r in records for _ in range(n)]):
        row["pred"] = extract_answer(answer_part(row["output"]), "".join(r.options))
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
    device = device_of(model)
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
    logp_rows: list[list[float]] = logp.tolist()
    seg_c = seg[:, width_p:].tolist()
    out_rows = []
    for i, (cands, _toks, shared) in enumerate(layouts):
        trunk = sum(logp_rows[i][:shared])
        sums = [trunk] * len(cands)
        for c, s_ in enumerate(seg_c[i][shared:], start=shared):
            if s_ > 0:
                sums[s_ - 1] += logp_rows[i][c]
        out_rows.append(list(zip(cands, sums)))
    return out_rows


@torch.inference_mode()
def _score_candidates_with_cache(model, tokenizer, records, prompt_format) -> list[list[tuple[str, float]]]:
    """The same scores for attention kernels that take no 4D mask: a prompt pass, its cache repeated per candidate."""
    device = device_of(model)
    prompts = [render_prompt(r, tokenizer, prompt_format, think=False) for r in records]
    batch = encode_batch(tokenizer, prompts, device)
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


def _choice(model, tokenizer, records, prompt_format, gcfg, slots=None, engines=None, n=1) -> list[dict]:
    rows = []
    for scored in score_candidates(model, tokenizer, records, prompt_format):
        best, value = max(scored, key=lambda cs: cs[1])
        rows += [{"output": answer_text(best), "pred": list(best), "generated_tokens": 0, "forced": False,
                  "score": round(value, 4)}] * n  # scoring is deterministic: n samples are one
    return rows


# Each mode answers records (model, tokenizer, records, prompt_format, gcfg, slots, engines, n): a row per record, or
# with n > 1 n rows per record (record i's are rows i*n to i*n+n-1), sampled from one prefill.
MODES = {"direct": _direct, "reasoning": _reasoning, "choice": _choice}


# Generating modes hand the engine this many batches' worth of questions at once: a row that ends takes the next
# question instead of waiting for the longest row of its batch (the progress bar moves once a chunk).
GENERATE_CHUNK = 8


def answer_batch(mode: str, model, tokenizer, records: list[Record], prompt_format: str,
                 gcfg: GenerationConfig, slots: int | None = None, engines: EngineHolder | None = None,
                 n: int = 1) -> list[dict]:
    """Questions in a mode, ``slots`` generated at once: {output, pred, generated_tokens, forced} per record (``n``
    per record, record by record, with ``n`` > 1). ``engines``: the caller's engine holder (else the generating modes
    make an engine for the call)."""
    return MODES[mode](model, tokenizer, records, prompt_format, gcfg, slots, engines=engines, n=n)


def evaluate_records(model, tokenizer, records: list[Record], ecfg: EvalConfig, gcfg: GenerationConfig | None = None,
                     prompt_format: str = "chat", show_progress: bool = True,
                     engines: EngineHolder | None = None) -> tuple[list[dict], dict]:
    """Score records with a live model; returns (per-question samples, summary). ``engines``: the caller's engine
    holder (an in-training evaluation's, reused from one evaluation to the next); else one for this call."""
    gcfg = gcfg or GenerationConfig()
    with holding(engines, tokenizer, gcfg) as engines:
        return _evaluate_records(model, tokenizer, records, ecfg, gcfg, prompt_format, show_progress, engines)


def _evaluate_records(model, tokenizer, records: list[Record], ecfg: EvalConfig, gcfg: GenerationConfig,
                      prompt_format: str, show_progress: bool, engines: EngineHolder) -> tuple[list[dict], dict]:
    def answer(batch: list[Record], sampled: GenerationConfig, n: int) -> list[dict]:
        # generating modes decode the whole chunk at once where generation.kv_cache holds it (else as many as it holds)
        slots = ecfg.batch_size if ecfg.mode == "choice" else None
        return answer_batch(ecfg.mode, model, tokenizer, batch, prompt_format, sampled, slots=slots,
                            engines=engines, n=n)

    chunk = ecfg.batch_size * (1 if ecfg.mode == "choice" else GENERATE_CHUNK)
    return score_records(answer, records, ecfg, gcfg, chunk, show_progress)


# What answers questions for ``score_records``: (records, generation settings, n) -> rows as ``answer_batch`` returns
# them (a model in this process, or a served one: api_eval.py).
Answerer = Callable[[list[Record], GenerationConfig, int], list[dict]]


def score_records(answer: Answerer, records: list[Record], ecfg: EvalConfig, gcfg: GenerationConfig, chunk: int,
                  show_progress: bool = True, done: dict[str, dict] | None = None,
                  on_scored: Callable[[list[dict]], None] | None = None) -> tuple[list[dict], dict]:
    """Every record answered (``chunk`` at a time) and scored; returns (per-question samples, summary). ``done``: the
    samples of questions scored by an earlier run, by id (not asked again); ``on_scored`` gets each chunk's samples
    once they are scored."""
    done = done or {}
    shown = [shuffle_options(r, ecfg.seed) if ecfg.shuffle_options else (r, None) for r in records]
    # Sorting by length keeps padding (and wasted compute) low inside each batch.
    order = sorted((i for i, r in enumerate(records) if r.id not in done),
                   key=lambda i: len(records[i].statement) + sum(map(len, records[i].options.values())))
    samples: list[dict] = [done.get(r.id, {}) for r in records]  # the rest filled in below: order holds them
    bar = progress(total=len(records), initial=len(records) - len(order), desc=f"eval ({ecfg.mode})", unit="q",
                   disable=not show_progress)
    start = time.time()
    k_samples = getattr(ecfg, "samples", 1)
    # K samples of a question share one prefill; sample j comes from (seed, the question's id, j) alone
    sampled = replace_config(gcfg, do_sample=True) if k_samples > 1 else gcfg
    try:
        for k in range(0, len(order), chunk):
            idx = order[k: k + chunk]
            rows = answer([shown[i][0] for i in idx], sampled, k_samples)
            for n, i in enumerate(idx):
                samples[i] = _scored(records[i], shown[i][1], rows[n * k_samples: (n + 1) * k_samples])
            if on_scored is not None:
                on_scored([samples[i] for i in idx])
            bar.update(len(idx))
            bar.set_postfix(q_s=f"{(k + len(idx)) / max(time.time() - start, 1e-9):.1f}")
    finally:
        bar.close()  # also on an error: its message starts a line of its own
    elapsed = time.time() - start
    summary = summarize(samples)
    if k_samples > 1:
        n = len(samples) or 1
        summary.update({"samples": k_samples, f"avg@{k_samples}": sum(s["mean_correct"] for s in samples) / n,
                        f"maj@{k_samples}": sum(s["correct"] for s in samples) / n,
                        f"pass@{k_samples}": sum(s["any_correct"] for s in samples) / n,
                        "majority_rule": MAJORITY_RULE})
    if any(r.format == "lawbench" for r in records):
        # the output names the letters as shown (re-lettered with --shuffle-options)
        summary.update(lawbench_summary([{"output": s["output"], "gold": shown[i][0].answer}
                                         for i, (s, r) in enumerate(zip(samples, records)) if r.format == "lawbench"]))
    # the questions answered by this run (a resumed one skips those scored before)
    summary["questions_per_s"] = round(len(order) / max(elapsed, 1e-9), 2)
    summary["seconds"] = round(elapsed, 2)
    summary["mode"] = ecfg.mode
    summary["do_sample"] = sampled_decoding(ecfg, gcfg)
    return samples, summary


def _scored(record: Record, new_to_old: dict[str, str] | None, rows: list[dict]) -> dict:
    """A question's sample in the report: its row scored (its K rows voted into one), letters mapped back."""
    gold = record.answer or []
    drawn = []
    for row in rows:
        pred = row["pred"]
        if pred is not None and new_to_old:
            pred = sorted(new_to_old[p] for p in pred)
        drawn.append({"pred": pred or [], "valid": pred is not None,
                      "correct": pred is not None and set(pred) == set(gold), "forced": row["forced"],
                      "generated_tokens": row["generated_tokens"], "output": row["output"]})
    sample = {"id": record.id, "type": record.type, "gold": gold, **(drawn[0] if len(drawn) == 1 else vote(drawn))}
    if new_to_old:
        sample["shown_letters"] = new_to_old
    return sample


def sampled_decoding(ecfg: EvalConfig, gcfg: GenerationConfig) -> bool:
    """Whether answers were sampled (K samples, or generation.do_sample), not greedy; choice mode generates nothing."""
    return ecfg.mode != "choice" and (getattr(ecfg, "samples", 1) > 1 or gcfg.do_sample)


def evaluate_sharded(model, tokenizer, records: list[Record], ecfg: EvalConfig, gcfg: GenerationConfig,
                     prompt_format: str = "chat", engines: EngineHolder | None = None):
    """evaluate_records split across the ranks of a distributed job, gathered on every rank.

    Each rank scores a disjoint, equally long slice (the last one padded with repeats that are dropped
    after gathering), so all ranks run the same number of forward passes, which sharded (FSDP)
    models need.
    """
    if world_size() == 1:
        return evaluate_records(model, tokenizer, records, ecfg, gcfg, prompt_format, show_progress=False,
                                engines=engines)
    rank, world = process_rank(), world_size()
    per_rank = -(-len(records) // world)
    indices = list(range(rank * per_rank, min((rank + 1) * per_rank, len(records))))
    real = len(indices)
    indices += [indices[-1] if indices else 0] * (per_rank - real)
    samples, _ = evaluate_records(model, tokenizer, [records[i] for i in indices], ecfg, gcfg, prompt_format,
                                  show_progress=False)
    gathered = gather_objects(samples[:real])
    merged = [s for part in gathered for s in part]
    summary = summarize(merged)
    summary["mode"] = ecfg.mode
    summary["do_sample"] = sampled_decoding(ecfg, gcfg)
    return merged, summary


# ----------------------------------------------------------------------------- command


def with_adapter_base(mcfg: ModelConfig, adapter: str | None) -> ModelConfig:
    """The model settings, with the base model the adapter records where none is given (and a line saying so)."""
    if mcfg.path or not adapter:
        return mcfg
    base, where = adapter_base(adapter)
    log.info("no --model given: using %s, the base model recorded in %s", base, where)
    return replace_config(mcfg, path=base)


def load_eval_file(data: str, ecfg, adapter: str | None) -> tuple:
    """(records, skipped, training overlap) of a file to score; warns loudly about questions the adapter trained on."""
    loaded = load_records(data, require_answer=True, max_samples=ecfg.max_samples, fmt=ecfg.format,
                          question_type=ecfg.type)
    for reason, count in loaded.skipped.items():
        log.warning("%s: skipped %d records (%s)", data, count, reason)
    overlap, version = training_overlap(adapter, loaded.records)
    if overlap and version in STATEMENT_ONLY_VERSIONS:
        log.warning("!!! %d of %d questions in %s share a statement with this adapter's TRAINING split: the accuracy "
                    "below is not a held-out result (its manifest, key %s, holds statements only: a question with a "
                    "generic stem and other options counts too) !!!", overlap, len(loaded.records), data, version)
    elif overlap:
        log.warning("!!! %d of %d questions in %s are in this adapter's TRAINING split (statement and options "
                    "compared): the accuracy below is not a held-out result !!!", overlap, len(loaded.records), data)
    return loaded.records, loaded.skipped, overlap


def score_file(model, tokenizer, records, skipped, overlap, cfg: EvalRun, prompt_format: str) -> dict:
    """The report of one file: its summary and every question."""
    samples, summary = evaluate_records(model, tokenizer, records, cfg.eval, cfg.generation, prompt_format)
    describe_file(summary, records, skipped, overlap, cfg, prompt_format)
    return {"summary": summary, "samples": samples}


def describe_file(summary: dict, records: list[Record], skipped, overlap, cfg: EvalRun, prompt_format: str) -> None:
    """What a report's summary says of the file, the model and the settings, beside the numbers."""
    ecfg, data = cfg.eval, cfg.eval.data
    # the format the file was read as: a model card's model-index names it as the dataset's type
    summary.update({"format": records[0].format if records else ecfg.format})
    summary.update({"model": cfg.model.path, "adapter": cfg.adapter.path, "data": str(data),
                    "data_sha256": sha256_file(data), "prompt_format": prompt_format,
                    "shuffle_options": ecfg.shuffle_options, "skipped": skipped, "train_overlap": overlap})


def write_report(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")


def eval_file(cfg: EvalRun) -> dict:
    """Load the model once, score ``eval.data``, write the report (one JSON file) and return it (a served model,
    ``eval.api_url``: ``api_eval.eval_api_file``)."""
    from .model import load_for_inference, quiet_loading

    ecfg, data, adapter = cfg.eval, cfg.eval.data, cfg.adapter.path
    if not data:
        raise UsageError("eval.data: no file to score (pass --data FILE, or --suite SUITE.yaml)")
    output = Path(ecfg.output)
    if output.is_dir():
        raise UsageError(f"eval.output: {output} is a directory; give a report file (e.g. {output / 'report.json'})")
    cfg = replace_config(cfg, model=with_adapter_base(cfg.model, adapter))
    records, skipped, overlap = load_eval_file(data, ecfg, adapter)
    prompt_format = resolve_prompt_format(cfg.model.path, adapter, cfg.adapter.prompt_format)
    check_native(prompt_format, records, data)
    quiet_loading()
    model, tokenizer = load_for_inference(cfg.model, adapter, force=cfg.adapter.force,
                                          fold=cfg.adapter.fold)
    report = score_file(model, tokenizer, records, skipped, overlap, cfg, prompt_format)
    write_report(report, output)
    return report
