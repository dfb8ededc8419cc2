"""The record every file format is read into, the statement-grouped train/eval split, and statistics."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..stats import percentile

MAX_REPORTED_PROBLEMS = 20
TYPE_NAMES = {"0": "KD", "1": "CA"}  # knowledge-driven / case analysis, as in the release


class DataError(UsageError):
    """Invalid data; ``problems`` holds one ``FILE:LINE: what is wrong`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        super().__init__("\n".join(shown + ([f"... and {more} more problems"] if more else [])))


@dataclass
class Record:
    id: str
    statement: str
    options: dict[str, str]
    """Letter -> option text, in display order."""
    answer: list[str] | None
    """Sorted gold letters; None for prediction-only files (JEC-QA *_test.json)."""
    type: str = "unknown"
    """KD, CA or unknown."""
    subject: str | None = None
    reasoning: str | None = None
    """Optional worked analysis, trained inside the think block."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Unknown fields, kept and written back unchanged."""
    where: str = ""
    """FILE:LINE the record came from, for messages."""
    format: str = "jecqa"
    """The file format it was read from (jecqa, agieval, lawbench): LawBench's files are also scored by its rule."""
    position: int = 0
    """Its place among its file's records (1 = the first; 0 = not read from a file): which of the file's own
    records it is, whatever the format's ids are made of."""

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "statement": self.statement, "option_list": dict(self.options)}
        if self.answer is not None:
            out["answer"] = list(self.answer)
        if self.type != "unknown":
            out["type"] = {v: k for k, v in TYPE_NAMES.items()}[self.type]
        if self.subject is not None:
            out["subject"] = self.subject
        if self.reasoning is not None:
            out["reasoning"] = self.reasoning
        out.update(self.extra)
        return out


@dataclass
class LoadResult:
    records: list[Record]
    skipped: dict[str, int]
    """Reason -> number of records skipped for it."""
    path: str


def _fold(text: str) -> str:
    """Text folded to half width (NFKC), lower case, without whitespace, punctuation or symbols: copies of JEC-QA in
    AGIEval and LawBench differ from the release in exactly those."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith(("P", "S")))


def statement_key(record: Record) -> str:
    """The statement, folded (``_fold``); options are never part of it (a LawBench question's inline options are
    split off when it is read). What the train/eval split groups by: a repeated stem stays on one side."""
    return _fold(record.statement)


def question_key(record: Record) -> str:
    """What makes two questions the same one, in any format: the folded statement and the folded option texts as a
    set. Many questions share a generic stem (以下说法错误的是) and differ only in their options; a copy whose
    options were re-lettered (or reordered) is still the same question."""
    options = sorted({_fold(text) for text in record.options.values()})
    return "\n".join([statement_key(record), *options])


def legacy_statement_key(record: Record) -> str:
    """The key of manifests written before statement_key was normalised: the whitespace-free statement."""
    return "".join(record.statement.split())


def count_repeated(records: list[Record]) -> int:
    counts = Counter(statement_key(r) for r in records)
    return sum(n - 1 for n in counts.values() if n > 1)


def split_records(records: list[Record], eval_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded split by statement, so that a repeated question never sits on both sides."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(statement_key(record), []).append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_eval = round(len(keys) * eval_fraction)
    if eval_fraction > 0 and n_eval == 0 and len(keys) > 1:
        n_eval = 1
    eval_keys = set(keys[:n_eval])
    train = [r for r in records if statement_key(r) not in eval_keys]
    held_out = [r for r in records if statement_key(r) in eval_keys]
    return train, held_out


def drop_overlap(train: list[Record], held_out: list[Record]) -> tuple[list[Record], int]:
    """With a separate eval file, drop training records whose statement is also in it."""
    eval_keys = {statement_key(r) for r in held_out}
    kept = [r for r in train if statement_key(r) not in eval_keys]
    return kept, len(train) - len(kept)


def find_overlap(a: list[Record], b: list[Record], key=question_key) -> list[tuple[Record, Record]]:
    """(record of b, record of a) for every pair of the same question (``key``: ``question_key`` unless told), in
    b's order; a record of b that a holds twice is paired with both."""
    by_key: dict[str, list[Record]] = {}
    for record in a:
        by_key.setdefault(key(record), []).append(record)
    return [(r, match) for r in b for match in by_key.get(key(r), [])]


def write_jsonl(records: list[Record], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_stats(result: LoadResult, token_lengths: list[int] | None = None) -> dict:
    """What `lawtune data check --json` prints."""
    records = result.records
    answers = [r.answer for r in records if r.answer is not None]
    by_type = Counter({"KD": 0, "CA": 0, "unknown": 0})
    by_type.update(r.type for r in records)
    stats: dict[str, Any] = {
        "file": result.path,
        "records": len(records),
        "skipped": dict(result.skipped),
        "single": sum(1 for a in answers if len(a) == 1),
        "multi": sum(1 for a in answers if len(a) > 1),
        "by_type": dict(by_type),
        "repeated_statements": count_repeated(records),
    }
    if token_lengths is not None:
        stats["token_length"] = {
            "p50": round(percentile(token_lengths, 50)),
            "p95": round(percentile(token_lengths, 95)),
            "max": max(token_lengths) if token_lengths else 0,
        }
    return stats
