"""`lawtune ask` (one question, streamed; interactive without --question) and `lawtune predict` (every question of
a file without answers, JSON Lines, resumable)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..config import AskRun, PredictRun
from ..data import DataError, load_records
from ..errors import UsageError
from ..evaluate import answer_batch
from ..infer import (
    ask,
    done_ids,
    load_model,
    parse_options_arg,
    record_from_fields,
    record_from_json,
    record_from_lines,
    record_from_text,
)
from ..preempt import Preempted, Sigterm
from ..progress import progress


def run_ask(cfg: AskRun, stdin=None, out=None) -> int:
    """`lawtune ask`: one question from the config (checked before the model loads, so a typo costs no loading
    time), or, without one, questions from stdin: a question, then its options one per line; an empty line
    asks it. Returns 0 once stdin ends."""
    a = cfg.ask
    if a.question and a.record:
        raise UsageError("ask: give --question (with --option) or --record, not both")
    if a.option and not a.question:
        raise UsageError("ask: --option needs --question")
    record = None
    if a.record:
        record = record_from_json(a.record)
    elif a.question and a.option:
        record = record_from_fields(a.question, parse_options_arg(a.option), where="--question")
    elif a.question:
        record = record_from_text(a.question, where="--question")
    engine = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force)
    if record is not None:
        ask(engine, record, a.mode, out=out)
        return 0
    stdin = stdin or sys.stdin
    interactive = stdin.isatty()
    while True:
        if interactive:
            print("题目和选项（每行一个，空行提问，Ctrl-D 退出）：", file=sys.stderr)
        lines = []
        for line in stdin:
            if not line.strip():
                break
            lines.append(line)
        if not lines:
            return 0
        try:
            record = record_from_lines(lines)
        except DataError as exc:
            if not interactive:
                raise
            print(f"error: {exc}", file=sys.stderr)
            continue
        ask(engine, record, a.mode, out=out)



def predict(cfg: PredictRun, show_progress: bool = True) -> dict:
    """`lawtune predict`: answers for every record of ``predict.data`` not yet in ``predict.output`` (JSON Lines,
    appended). SIGTERM keeps every written batch and raises ``Preempted``."""
    pcfg = cfg.predict
    if not pcfg.data or not pcfg.output:
        raise UsageError(f"predict.{'data' if not pcfg.data else 'output'}: required (pass --data FILE --output FILE)")
    out_path = Path(pcfg.output)
    if out_path.is_dir():
        raise UsageError(f"predict.output: {out_path} is a directory; give a file (e.g. {out_path / 'preds.jsonl'})")
    records = load_records(pcfg.data, require_answer=False, max_samples=pcfg.max_samples).records
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = done_ids(out_path)
    todo = [r for r in records if r.id not in done]
    summary: dict[str, Any] = {"records": len(records), "already_done": len(records) - len(todo), "generated": 0,
                               "unreadable": 0, "output": str(out_path)}
    if not todo:
        return summary
    with Sigterm(interrupt=True, what="stopping; every batch answered so far is saved") as sigterm:
        try:
            _answer_all(cfg, records, todo, out_path, summary, sigterm, show_progress)
        except Preempted:
            done = summary["already_done"] + summary["generated"]
            raise Preempted(f"preempted: {done} of {len(records)} questions answered in {out_path}; rerun the same "
                            f"command to go on") from None
    return summary


def _answer_all(cfg: PredictRun, records: list, todo: list, out_path: Path, summary: dict, sigterm: Sigterm,
                show_progress: bool) -> None:
    """Answer ``todo`` batch by batch, appending each batch's lines; SIGTERM drops the batch being generated, never
    one being written."""
    pcfg = cfg.predict
    engine = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force)
    bar = progress(total=len(records), initial=len(records) - len(todo), desc=f"predict ({pcfg.mode})", unit="q",
                   disable=not show_progress)
    try:
        with open(out_path, "a", encoding="utf-8") as fh:
            for k in range(0, len(todo), pcfg.batch_size):
                batch = todo[k: k + pcfg.batch_size]
                rows = answer_batch(pcfg.mode, engine.model, engine.tokenizer, batch, engine.prompt_format, cfg.generation,
                                    slots=pcfg.batch_size)
                with sigterm.holding():
                    for record, row in zip(batch, rows):
                        line = {"id": record.id, "answer": row["pred"] or [], "output": row["output"]}
                        if row.get("forced"):
                            line["forced"] = True
                        fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                        summary["unreadable"] += not row["pred"]
                    fh.flush()
                    os.fsync(fh.fileno())  # a crash loses at most the batch being generated
                    summary["generated"] += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()  # also when stopped: the message that follows starts a line of its own



def run_predict(cfg: PredictRun) -> int:
    s = predict(cfg)
    print(f"{s['generated']} answered ({s['unreadable']} unreadable), {s['already_done']} already in {s['output']}, "
          f"{s['records']} records in {cfg.predict.data}")
    return 0
