"""`lawtune predict`: every question of a file without answers, JSON Lines, resumable."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..config import PredictRun
from ..data import load_records
from ..errors import UsageError
from ..evaluate import answer_batch
from ..infer import answer_voted, done_ids, load_model
from ..preempt import Preempted, Sigterm
from ..progress import progress
from ..prompts import check_native


def predict(cfg: PredictRun, show_progress: bool = True) -> dict:
    """`lawtune predict`: answers for every record of ``predict.data`` not yet in ``predict.output`` (JSON Lines,
    appended; with ``predict.samples`` K > 1 each line's answer is the vote of K samples, with ``samples`` and
    ``agreement``). SIGTERM keeps every written batch and raises ``Preempted``."""
    pcfg = cfg.predict
    if not pcfg.data or not pcfg.output:
        raise UsageError(f"predict.{'data' if not pcfg.data else 'output'}: required (pass --data FILE --output FILE)")
    out_path = Path(pcfg.output)
    if out_path.is_dir():
        raise UsageError(f"predict.output: {out_path} is a directory; give a file (e.g. {out_path / 'preds.jsonl'})")
    records = load_records(pcfg.data, require_answer=False, max_samples=pcfg.max_samples).records
    check_native(cfg.adapter.prompt_format, records, pcfg.data)
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
    engine = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force,
                      cfg.adapter.fold)
    bar = progress(total=len(records), initial=len(records) - len(todo), desc=f"predict ({pcfg.mode})", unit="q",
                   disable=not show_progress)
    try:
        with open(out_path, "a", encoding="utf-8") as fh:
            for k in range(0, len(todo), pcfg.batch_size):
                batch = todo[k: k + pcfg.batch_size]
                lines = _lines(cfg, engine, batch)
                with sigterm.holding():
                    for line in lines:
                        fh.write(json.dumps(line, ensure_ascii=False) + "\n")
                        summary["unreadable"] += not line["answer"]
                    fh.flush()
                    os.fsync(fh.fileno())  # a crash loses at most the batch being generated
                    summary["generated"] += len(batch)
                bar.update(len(batch))
    finally:
        bar.close()  # also when stopped: the message that follows starts a line of its own
        engine.close()


def _lines(cfg: PredictRun, engine, batch: list) -> list[dict]:
    """The predictions lines of a batch: ``id``, ``answer`` (the letters; [] = unreadable), ``output``, ``forced``
    where the answer was; voted: the majority sample's answer and output, every sample's answer and the agreement."""
    pcfg = cfg.predict
    lines: list[dict[str, Any]] = []
    if pcfg.samples == 1:
        rows = answer_batch(pcfg.mode, engine.model, engine.tokenizer, batch, engine.prompt_format, cfg.generation,
                            slots=pcfg.batch_size, engines=engine.engines)
        for record, row in zip(batch, rows):
            lines.append({"id": record.id, "answer": row["pred"] or [], "output": row["output"]}
                         | ({"forced": True} if row.get("forced") else {}))
        return lines
    for record, voted in zip(batch, answer_voted(engine, batch, pcfg.mode, pcfg.samples, slots=pcfg.batch_size)):
        lines.append({"id": record.id, "answer": voted.answer or [], "output": voted.output}
                     | ({"forced": True} if voted.forced else {})
                     | {"samples": [a or [] for a in voted.samples], "agreement": voted.agreement})
    return lines


def run_predict(cfg: PredictRun) -> int:
    s = predict(cfg)
    print(f"{s['generated']} answered ({s['unreadable']} unreadable), {s['already_done']} already in {s['output']}, "
          f"{s['records']} records in {cfg.predict.data}"
          + (f"; each answer the vote of {cfg.predict.samples} samples" if cfg.predict.samples > 1 else ""))
    return 0
