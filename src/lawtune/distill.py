"""`lawtune distill`: sample reasoning for every training question, keep what reaches the gold answer.

Training on ``答案：X`` after an empty think block teaches an R1 model to stop thinking. JEC-QA has a checkable
answer for every training question, so the model can teach itself: sample K reasoning completions per question
(from the model, through the generation engine, or from any OpenAI-compatible endpoint), keep one that

* closed its think block itself and ended on its own (a completion cut off by its budget, or an answer a server
  forced after the cut, is never kept),
* has a non-empty think text, and
* whose answer set (read after the last ``</think>``) equals the gold set exactly (JEC-QA's rule),

and write it as the question's JEC-QA record plus ``reasoning`` (the think text), the field ``lawtune train``
trains inside the think block. Questions without a kept completion go to ``<output>.rejected.jsonl`` with what
was sampled. A rerun skips every id in either file (``retry_rejected`` samples the rejected ones again); each
sample's seed comes from (seed, id, sample index), so a resumed run writes what an uninterrupted one writes.
``<output>.report.json`` covers both files after every run, a stopped one too: the counts of every run that wrote
them, summed (``all_runs``, carried from the report the last run left), and this run's (``this_run``).
SIGTERM drops the batch being sampled, keeps every written one and ends the command with exit code 143
(``preempt.py``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DistillRun
from .data import Record, load_records
from .dist import broadcast_object, gather_objects, is_main_process, join_launched_job, local_rank, rank, world_size
from .errors import UsageError
from .infer import done_ids
from .preempt import Preempted, Sigterm
from .progress import progress
from .prompts import chat_user_text, check_native, render_prompt
from .rundir import append_jsonl
from .scoring import extract_answer
from .stats import percentile
from .think import split as split_reasoning

log = logging.getLogger("lawtune")

# Our default budget: the model card allows up to 32,768 new tokens; most JEC-QA traces are far shorter.
DEFAULT_BUDGET = 4096
REJECTED_SUFFIX = ".rejected.jsonl"
REPORT_SUFFIX = ".report.json"
REASONS = ("kept", "wrong", "unclosed", "empty_reasoning", "no_answer")
# Requests in flight at once to each teacher URL.
TEACHER_CONCURRENCY = 16


@dataclass
class Completion:
    """One sampled completion, as judged."""

    reasoning: str
    """The think text, trimmed ('' where the think block was never closed)."""
    answer_part: str
    """What came after the last </think>."""
    closed: bool
    """The model closed its think block and ended on its own (not cut off by the budget, not forced)."""
    tokens: int | None
    """Generated tokens, where known."""


def side_files(output: str | Path) -> tuple[Path, Path]:
    """The rejected-questions file and the report beside a traces file."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(stem + REJECTED_SUFFIX), out.with_name(stem + REPORT_SUFFIX)


def judge(completion: Completion, record: Record) -> tuple[str, list[str] | None]:
    """(reason, the answer read): reason is kept, wrong, unclosed, empty_reasoning or no_answer."""
    letters = "".join(record.options)
    answer = extract_answer(completion.answer_part, letters) if completion.closed else None
    if not completion.closed:
        return "unclosed", None
    if not completion.reasoning:
        return "empty_reasoning", answer
    if answer is None:
        return "no_answer", None
    return ("kept" if set(answer) == set(record.answer or []) else "wrong"), answer


def split_think(text: str) -> tuple[str | None, str]:
    """(think text, the rest) of a completion that may start with <think>; None where it never closed."""
    think, answer = split_reasoning(text)
    return (None, "") if think is None else (think.strip(), answer)


# ----------------------------------------------------------------------------- samplers


def local_sampler(cfg: DistillRun):
    """Samples from the model itself through the generation engine: a question's K samples share one prefill."""
    from .generation import generated
    from .generation.engine import SamplingParams
    from .infer import load_model

    loaded = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force,
                      cfg.adapter.fold)
    tokenizer, g, d = loaded.tokenizer, cfg.generation, cfg.distill
    budget = g.max_new_tokens or DEFAULT_BUDGET

    def sample(records: list[Record]) -> list[list[Completion]]:
        prompts = [tokenizer(render_prompt(r, tokenizer, loaded.prompt_format, think=True),
                             add_special_tokens=False)["input_ids"] for r in records]
        # the same rows for every batch (the last one may be smaller): one engine, one graph capture
        assert loaded.engines is not None
        engine = loaded.engines.get(loaded.model, d.batch_size * d.samples, max(map(len, prompts)) + budget)
        params = SamplingParams(max_new_tokens=budget, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                seed=g.seed, n=d.samples)
        done = engine.generate([(p, params, r.id) for p, r in zip(prompts, records)])
        out = []
        for request in done:
            row = []
            for s in request.samples:
                result = generated(tokenizer, s.tokens)
                # the prompt opened the think block: the completion is think text, </think>, the answer
                think, rest = split_think(result.text)
                row.append(Completion(think or "", rest, think is not None and result.stopped, result.tokens))
            out.append(row)
        return out

    return sample, tokenizer, loaded.close


def teacher_sampler(cfg: DistillRun):
    """Samples from OpenAI-compatible endpoints (the client `eval --api-url` uses: concurrent requests, retries on
    429 and 5xx): ``n`` choices per question, reading ``reasoning_content`` (vLLM's reasoning parser, `lawtune
    serve`) or the ``<think>…</think>`` text of ``content``. A choice that did not finish on its own
    (``finish_reason`` other than ``stop``) counts as not closed. With several URLs the questions go to them in
    turn, ``TEACHER_CONCURRENCY`` in flight at each; each rank of a multi-process run starts at another URL."""
    from .generation.api_client import ApiClient, chat_reply

    d, g = cfg.distill, cfg.generation
    assert d.teacher_url and d.teacher_model, "called only with a distill.teacher_url"
    budget = g.max_new_tokens or DEFAULT_BUDGET
    clients = [ApiClient(url, d.teacher_model, "distill.teacher_url",
                         api_key=d.api_key.get_secret_value() if d.api_key else None, timeout_s=d.timeout_s,
                         concurrency=TEACHER_CONCURRENCY) for url in d.teacher_url]
    sent = [rank()]  # requests handed out so far (this rank's offset to start with): the next one's URL

    def one(job: tuple[ApiClient, Record]) -> list[Completion]:
        client, record = job
        body = {"messages": [{"role": "user", "content": chat_user_text(record)}], "n": d.samples,
                "temperature": g.temperature, "top_p": g.top_p, "max_tokens": budget, "seed": g.seed,
                "mode": "reasoning"}  # mode: lawtune serve's field; other servers ignore it
        out = []
        for choice in client.post("/chat/completions", body)["choices"]:
            think, rest, finished = chat_reply(choice)
            out.append(Completion(think or "", rest, finished and think is not None, None))
        return out

    def sample(records: list[Record]) -> list[list[Completion]]:
        # the URL of each request is chosen here, in the records' order, not by whichever thread is free first
        jobs = [(clients[(sent[0] + i) % len(clients)], r) for i, r in enumerate(records)]
        sent[0] += len(records)
        if len(jobs) <= 1:
            return [one(job) for job in jobs]
        with ThreadPoolExecutor(max_workers=min(TEACHER_CONCURRENCY * len(clients), len(jobs))) as pool:
            return list(pool.map(one, jobs))

    def close() -> None:
        for client in clients:
            client.close()

    return sample, None, close


# ----------------------------------------------------------------------------- the command


def _base_id(record_id: str) -> str:
    """The question's id of a traces record (with --pick all, later traces are named id#2, id#3 …)."""
    return record_id.split("#", 1)[0]


def distill(cfg: DistillRun, show_progress: bool = True) -> dict:
    """`lawtune distill`: traces for every question of ``distill.data`` not yet in the output or rejected file.

    Launched as several processes (torchrun, accelerate launch), the questions left go in rounds of ``batch_size``
    per rank: each rank samples every world-size-th question of the round with its own model (on the GPU of its
    local rank) or its own teacher clients, and rank 0 writes the round in the questions' order. As a question's
    samples depend on (seed, id, sample index) alone, the files are those one process writes. Only rank 0 reads
    and writes the files; a rank stopped by SIGTERM drops the round, and every rank stops at its end."""
    d = cfg.distill
    if not d.data or not d.output:
        raise UsageError(f"distill.{'data' if not d.data else 'output'}: required (pass --data FILE --output FILE)")
    if not d.teacher_url and not cfg.model.path:
        raise UsageError("model.path: no model to sample from (pass --model DIR, or --teacher-url and --teacher-model)")
    join_launched_job()
    main, world, me = is_main_process(), world_size(), rank()
    if world > 1 and not d.teacher_url and cfg.model.gpu is None and torch.cuda.is_available():
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"gpu": local_rank()})})
    out = Path(d.output)
    rejected_path, report_path = side_files(out)
    loaded = load_records(d.data, require_answer=True)
    for reason, count in loaded.skipped.items():
        if main:
            log.warning("%s: skipped %d records (%s)", d.data, count, reason)
    records = loaded.records
    check_native(cfg.adapter.prompt_format, records, d.data)
    # What is left to sample: rank 0 reads the files (cutting off a torn last line), the others are told.
    kept_ids: set[str] = set()
    rejected_ids: set[str] = set()
    earlier = new_counts()
    problem: UsageError | None = None
    if main:
        try:
            if out.is_dir():
                raise UsageError(f"distill.output: {out} is a directory; give a file (e.g. {out / 'traces.jsonl'})")
            out.parent.mkdir(parents=True, exist_ok=True)
            kept_ids = {_base_id(i) for i in done_ids(out)}
            rejected_ids = done_ids(rejected_path)
            earlier = earlier_runs(report_path, kept_ids | rejected_ids)
            if d.retry_rejected and rejected_ids:
                _drop_lines(rejected_path, rejected_ids - kept_ids)
                rejected_ids = set()
        except UsageError as exc:
            problem = exc
    todo_at = broadcast_object(str(problem) if problem else
                               [i for i, r in enumerate(records) if r.id not in kept_ids and r.id not in rejected_ids])
    if problem:
        raise problem
    if isinstance(todo_at, str):  # rank 0's error, which it reports
        raise UsageError(todo_at)
    todo = [records[i] for i in todo_at]
    run = new_counts()
    skipped = len(records) - len(todo)
    preempted = False
    with Sigterm(what="stopping; every batch sampled so far is saved") as sigterm:
        try:
            if todo:
                sampler = None
                try:
                    with sigterm.cutting():  # loading a model takes a while: SIGTERM cuts it short
                        sampler = (teacher_sampler if d.teacher_url else local_sampler)(cfg)
                except Preempted:
                    pass  # this rank stops at the first round, and the others with it
                sample, tokenizer, close = sampler or (None, None, lambda: None)
                bar = progress(total=len(records), initial=skipped, desc="distill", unit="q",
                               disable=not show_progress or not main)
                try:
                    for k in range(0, len(todo), d.batch_size * world):
                        batch = todo[k: k + d.batch_size * world]
                        start = time.time()
                        mine = batch[me::world]
                        try:
                            with sigterm.cutting():  # SIGTERM drops this rank's share of the round at once
                                if sample is None:
                                    raise Preempted()
                                part = sample(mine) if mine else []
                        except Preempted:
                            part = None
                        # SIGTERM from here on is only recorded: the round is written whole, then every rank stops
                        try:
                            parts = gather_objects((part, sigterm.received))
                        except RuntimeError:  # gloo's "Connection closed by peer": a rank was killed or crashed
                            log.error("distill: another process of the job ended; the rounds written so far are "
                                      "saved in %s, rerun the same command to go on", out)
                            raise
                        if any(p is None for p, _ in parts):
                            raise Preempted()
                        sampled = [parts[i % world][0][i // world] for i in range(len(batch))]
                        if main:
                            counts = new_counts()  # added to the run's once the batch is in the files
                            counts["seconds"] = time.time() - start
                            traces, rejected = [], []
                            for record, completions in zip(batch, sampled):
                                verdicts = [judge(c, record) for c in completions]
                                _count(counts, record, completions, verdicts, tokenizer)
                                good = [c for c, (reason, _) in zip(completions, verdicts) if reason == "kept"]
                                if good:
                                    traces += [_trace(record, c, i) for i, c in
                                               enumerate(_pick(good, d.pick, cfg.generation.seed, record.id))]
                                else:
                                    rejected.append({"id": record.id, "type": record.type, "gold": record.answer,
                                                     "sampled": [a for _, a in verdicts],
                                                     "reasons": [r for r, _ in verdicts]})
                            append_jsonl(out, traces)
                            append_jsonl(rejected_path, rejected)
                            batch_kept = {_base_id(t["id"]) for t in traces}
                            kept_ids |= batch_kept
                            rejected_ids |= {r.id for r in batch} - batch_kept
                            counts["rejected"], counts["questions"] = len(rejected), len(batch)
                            run = _summed(run, counts)
                            bar.update(len(batch))
                            bar.set_postfix(kept=f"{run['questions'] - run['rejected']}/{run['questions']}",
                                            completions=f"{run['kept_completions']}/{run['completions']}")
                        if any(stop for _, stop in parts):
                            raise Preempted()
                finally:
                    bar.close()  # also when stopped: the message that follows starts a line of its own
                    close()  # the model's engine: its cache and graphs
        except Preempted:
            preempted = True
        finally:  # also when the run is stopped: the report counts what the two files hold
            sigterm.disarm()  # what is left is writing the report: it completes, whatever comes
            if main:
                report = build_report(records, kept_ids, rejected_ids, (out, rejected_path), run, earlier, d.samples,
                                      skipped)
                tmp = report_path.with_name(report_path.name + ".tmp")
                tmp.write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
                os.replace(tmp, report_path)
    if preempted:
        raise Preempted(f"preempted: {run['questions']} of the {len(todo)} questions left were sampled and saved in "
                        f"{out} and {rejected_path.name}; rerun the same command to go on" if main else "")
    if not main:
        return {}
    return {**report["summary"], "skipped_done": skipped, "report_file": str(report_path)}


def _drop_lines(path: Path, ids: set[str]) -> None:
    """Rewrite ``path`` without the lines of ``ids`` (atomically: a crash leaves the old file)."""
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and str(json.loads(line)["id"]) not in ids]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def _pick(good: list[Completion], pick: str, seed: int, record_id: str) -> list[Completion]:
    if pick == "all":
        return good
    if pick == "random":
        return [random.Random(f"{seed}:{record_id}").choice(good)]
    return [min(good, key=lambda c: (len(c.reasoning), good.index(c)))]


def _trace(record: Record, completion: Completion, index: int) -> dict:
    row = record.to_json()
    row["reasoning"] = completion.reasoning
    if index:
        row["id"] = f"{record.id}#{index + 1}"
    return row


def _count(run: dict, record: Record, completions: list[Completion], verdicts: list, tokenizer) -> None:
    run["completions"] += len(completions)
    reasons = [reason for reason, _ in verdicts]
    for reason in reasons:
        run["reasons"][reason] += 1
    run["kept_completions"] += reasons.count("kept")
    # pass@K: some sample's answer is the gold set (kept or not: an empty think text still answered right)
    run["pass"] += any(answer is not None and set(answer) == set(record.answer or []) for _, answer in verdicts)
    for c, reason in zip(completions, reasons):
        tokens = c.tokens
        if tokens is None and tokenizer is not None:
            tokens = len(tokenizer(c.reasoning, add_special_tokens=False)["input_ids"])
        if tokens is not None:
            run["generated_tokens"] += tokens
            if reason == "kept":
                run["trace_tokens"].append(tokens)


def new_counts() -> dict:
    """What a run counts as it samples (one run's, or every run's summed)."""
    return {"runs": 0, "questions": 0, "rejected": 0, "completions": 0, "kept_completions": 0, "pass": 0,
            "trace_tokens": [], "generated_tokens": 0, "seconds": 0.0, "reasons": dict.fromkeys(REASONS, 0),
            "uncounted": 0}


def earlier_runs(report_path: Path, done: set[str]) -> dict:
    """The counts of the runs before this one, summed, from the report they left beside the traces (``done``: the
    ids the traces and rejected files hold; none = a fresh start, whatever report lies there)."""
    counts = new_counts()
    if not done:
        return counts
    if not report_path.is_file():  # the files of a run killed before it wrote any report (SIGKILL, out of memory)
        return {**counts, "uncounted": len(done)}
    try:
        old = json.loads(report_path.read_text(encoding="utf-8"))
        block = old.get("all_runs") or old["this_run"]  # a report of a lawtune before all_runs: its one run
        questions = block.get("questions_sampled", 0)
        passed = block.get("questions_passed", round(old["summary"].get("pass_at_k", 0) * questions))
        counts.update({"runs": block.get("runs", 1), "questions": questions, "pass": passed,
                       "completions": block.get("completions", 0), "kept_completions": block["reasons"]["kept"],
                       "reasons": {**counts["reasons"], **block["reasons"]},
                       "trace_tokens": list(block.get("trace_token_lengths", [])),
                       "generated_tokens": block.get("generated_tokens", 0), "seconds": block.get("seconds", 0.0),
                       "uncounted": block.get("uncounted", 0)})
        # ids in the files that no report counted: a run killed before it could write its report
        counts["uncounted"] += max(0, len(done) - block.get("questions_done", len(done)))
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("%s: not a report lawtune can read; the counts of earlier runs start again from 0", report_path)
        counts = {**new_counts(), "uncounted": len(done)}
    return counts


def _summed(a: dict, b: dict) -> dict:
    """Two sets of counts added up (``runs``: those that sampled something)."""
    total = {k: a[k] + b[k] for k in ("questions", "rejected", "completions", "kept_completions", "pass",
                                      "trace_tokens", "generated_tokens", "seconds", "uncounted")}
    total["reasons"] = {k: a["reasons"].get(k, 0) + b["reasons"].get(k, 0) for k in REASONS}
    total["runs"] = a["runs"] + b["runs"]
    return total


def _counts_block(c: dict) -> dict:
    lengths = c["trace_tokens"]
    return {"questions_sampled": c["questions"], "questions_passed": c["pass"], "completions": c["completions"],
            "completions_kept": c["kept_completions"], "reasons": c["reasons"],
            "pass_at_k": round(c["pass"] / c["questions"], 4) if c["questions"] else 0.0,
            "trace_tokens": ({"p50": percentile(lengths, 50), "p95": percentile(lengths, 95), "max": max(lengths)}
                             if lengths else None),
            "generated_tokens": c["generated_tokens"], "seconds": round(c["seconds"], 2),
            "tokens_per_s": round(c["generated_tokens"] / c["seconds"], 1) if c["seconds"] else None}


def build_report(records: list[Record], kept: set[str], rejected: set[str], files: tuple[Path, Path], run: dict,
                 earlier: dict, samples: int, skipped: int) -> dict:
    """What the traces and rejected files hold together after this run (``all_runs``: every run that wrote them,
    summed), and what this run sampled (``this_run``)."""
    groups: dict[str, list[bool]] = {}
    for r in records:
        hit = r.id in kept
        for name in ("all", r.type, "single" if len(r.answer or []) == 1 else "multi"):
            groups.setdefault(name, []).append(hit)
    by = {name: {"kept": sum(v), "questions": len(v), "rate": round(sum(v) / len(v), 4)} for name, v in groups.items()}
    total = _summed(earlier, {**run, "runs": int(run["questions"] > 0)})
    every = _counts_block(total)
    summary = {"questions": len(records), "questions_kept": by["all"]["kept"], "samples": samples,
               "completions_sampled": every["completions"], "completions_kept": every["completions_kept"],
               "pass_at_k": every["pass_at_k"]}
    note = ("summary and all_runs count every run that wrote the traces and rejected files (a question sampled again "
            "with retry_rejected counts each time); this_run is the last run's")
    if total["uncounted"]:
        note += (f"; {total['uncounted']} questions in the files were sampled by a run that ended before writing its "
                 f"report: their completions are not counted")
    return {"summary": summary, "by_group": by,
            "this_run": {**_counts_block(run), "skipped_done": skipped},
            "all_runs": {"runs": total["runs"], **every, "questions_done": len(kept | rejected),
                         "uncounted": total["uncounted"], "trace_token_lengths": sorted(total["trace_tokens"])},
            "files": {"traces": str(files[0]), "rejected": str(files[1])}, "note": note}
