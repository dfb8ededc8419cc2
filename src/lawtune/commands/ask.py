"""`lawtune ask`: one question, streamed; interactive without --question."""

from __future__ import annotations

import sys

from ..config import AskRun
from ..data import DataError
from ..errors import UsageError
from ..infer import (
    ask,
    ask_voted,
    load_model,
    parse_options_arg,
    record_from_fields,
    record_from_json,
    record_from_lines,
    record_from_text,
)
from ..prompts import NATIVE_NEEDS


def run_ask(cfg: AskRun, stdin=None, out=None) -> int:
    """`lawtune ask`: one question from the config (checked before the model loads, so a typo costs no loading
    time), or, without one, questions from stdin: a question, then its options one per line; an empty line
    asks it. Returns 0 once stdin ends."""
    a = cfg.ask
    if cfg.adapter.prompt_format == "native":
        raise UsageError(f"adapter.prompt_format: {NATIVE_NEEDS}; ask takes a question, not a LawBench file (use chat "
                         f"or plain)")
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
    engine = load_model(cfg.model, cfg.generation, cfg.adapter.path, cfg.adapter.prompt_format, cfg.adapter.force,
                      cfg.adapter.fold)
    try:
        return _ask_all(engine, record, a.mode, a.samples, out, stdin)
    finally:
        engine.close()


def _ask_all(engine, record, mode: str, samples: int, out, stdin) -> int:
    """One question (``record``), or every question read from ``stdin``; ``samples`` > 1: each answered by a vote."""
    def answer(record) -> None:
        if samples > 1:
            ask_voted(engine, record, mode, samples, out=out)
        else:
            ask(engine, record, mode, out=out)

    if record is not None:
        answer(record)
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
        answer(record)
