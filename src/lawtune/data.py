"""JEC-QA loading, validation, statistics and the statement-grouped train/eval split.

JEC-QA release files are JSON Lines; converted copies are often one JSON array. Both load, the
shape detected from the first non-blank character. Every record is validated and every problem is
reported as ``FILE:LINE: what is wrong``; nothing is dropped silently (records with an empty answer
list are skipped and counted, since training and scoring need a gold answer).
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_REPORTED_PROBLEMS = 20
TYPE_NAMES = {"0": "KD", "1": "CA"}  # knowledge-driven / case analysis, as in the release


class DataError(ValueError):
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


KNOWN_FIELDS = {"id", "statement", "option_list", "answer", "type", "subject", "reasoning"}


def _iter_objects(path: Path, text: str):
    """Yield (line_number, object_or_error_message) for JSON Lines or a JSON array."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                yield text.count("\n") + 1, "unterminated JSON array (missing ']')"
                return
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                yield text.count("\n", 0, exc.pos) + 1, f"malformed JSON ({exc.msg})"
                return
            yield line, obj
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"malformed JSON ({exc.msg})"


def _normalize_type(value: Any, record_id: str) -> str:
    if value is not None:
        return TYPE_NAMES.get(str(value).strip(), "unknown")
    prefix = record_id.split("_", 1)[0]
    return TYPE_NAMES.get(prefix, "unknown") if "_" in record_id else "unknown"


def _parse_record(obj: Any, where: str, require_answer: bool) -> tuple[Record | None, str | None, str | None]:
    """Return (record, problem, skip_reason); exactly one of record/problem is set unless skipped."""
    if not isinstance(obj, dict):
        return None, f"{where}: expected a JSON object, got {type(obj).__name__}", None
    for key in ("id", "statement", "option_list"):
        if key not in obj:
            return None, f"{where}: missing field '{key}'", None
    record_id = str(obj["id"]).strip()
    if not record_id:
        return None, f"{where}: empty 'id'", None
    statement = obj["statement"]
    if not isinstance(statement, str) or not statement.strip():
        return None, f"{where}: 'statement' must be a non-empty string", None
    raw_options = obj["option_list"]
    if isinstance(raw_options, list):
        if len(raw_options) > 26:
            return None, f"{where}: 'option_list' has more than 26 options", None
        options = dict(zip(string.ascii_uppercase, raw_options))
    elif isinstance(raw_options, dict):
        options = {str(k).strip().upper(): v for k, v in raw_options.items()}
        bad = [k for k in options if len(k) != 1 or k not in string.ascii_uppercase]
        if bad:
            return None, f"{where}: option letter {bad[0]!r} is not a single letter A-Z", None
    else:
        return None, f"{where}: 'option_list' must be a dict or a list, got {type(raw_options).__name__}", None
    if len(options) < 2:
        return None, f"{where}: 'option_list' needs at least 2 options", None
    if not all(isinstance(v, str) for v in options.values()):
        return None, f"{where}: every option text must be a string", None

    answer: list[str] | None = None
    if "answer" in obj and obj["answer"] is not None:
        raw_answer = obj["answer"]
        if isinstance(raw_answer, str):
            letters = [c for c in raw_answer.upper() if not c.isspace() and c not in ",，、"]
        elif isinstance(raw_answer, list) and all(isinstance(a, str) for a in raw_answer):
            letters = [a.strip().upper() for a in raw_answer]
        else:
            return None, f"{where}: 'answer' must be a list of letters or a string, got {raw_answer!r}", None
        missing = [a for a in letters if a not in options]
        if missing:
            return None, f"{where}: answer letter {missing[0]!r} is not among the options {''.join(options)}", None
        answer = sorted(set(letters))
        if not answer:
            return None, None, "empty answer list"
    elif require_answer:
        return None, f"{where}: missing field 'answer' (needed for training and evaluation)", None

    reasoning = obj.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        return None, f"{where}: 'reasoning' must be a string", None
    record = Record(
        id=record_id,
        statement=statement.strip(),
        options=options,
        answer=answer,
        type=_normalize_type(obj.get("type"), record_id),
        subject=obj.get("subject"),
        reasoning=reasoning.strip() if reasoning else None,
        extra={k: v for k, v in obj.items() if k not in KNOWN_FIELDS},
        where=where,
    )
    return record, None, None


def load_records(path: str | Path, require_answer: bool = True, max_samples: int | None = None) -> LoadResult:
    """Load and validate a JEC-QA file; raise DataError listing every problem found."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: file not found"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    records: list[Record] = []
    problems: list[str] = []
    skipped: Counter = Counter()
    seen_ids: dict[str, str] = {}
    for line, obj in _iter_objects(path, text):
        where = f"{path}:{line}"
        if isinstance(obj, str):
            problems.append(f"{where}: {obj}")
            continue
        record, problem, skip = _parse_record(obj, where, require_answer)
        if problem:
            problems.append(problem)
        elif skip:
            skipped[skip] += 1
        elif record.id in seen_ids:
            problems.append(f"{where}: duplicate id {record.id!r} (first at {seen_ids[record.id]})")
        else:
            seen_ids[record.id] = where
            records.append(record)
            if max_samples is not None and len(records) >= max_samples:
                break
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{path}: no usable records"])
    return LoadResult(records=records, skipped=dict(skipped), path=str(path))


def statement_key(record: Record) -> str:
    """Repeated questions are detected on the whitespace-free statement."""
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


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def data_stats(result: LoadResult, token_lengths: list[int] | None = None) -> dict:
    """What `lawtune data check --json` prints."""
    records = result.records
    with_answer = [r for r in records if r.answer is not None]
    by_type = Counter({"KD": 0, "CA": 0, "unknown": 0})
    by_type.update(r.type for r in records)
    stats: dict[str, Any] = {
        "file": result.path,
        "records": len(records),
        "skipped": dict(result.skipped),
        "single": sum(1 for r in with_answer if len(r.answer) == 1),
        "multi": sum(1 for r in with_answer if len(r.answer) > 1),
        "by_type": dict(by_type),
        "repeated_statements": count_repeated(records),
    }
    if token_lengths is not None:
        stats["token_length"] = {
            "p50": percentile(token_lengths, 50),
            "p95": percentile(token_lengths, 95),
            "max": max(token_lengths) if token_lengths else 0,
        }
    return stats
