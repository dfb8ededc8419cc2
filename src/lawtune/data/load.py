"""Reading a question file in any of its formats: the one entry point, ``load_records``.

The format (``FORMATS``: JEC-QA's release, AGIEval's copies, LawBench's files; one module each) is detected from
the first record's fields, or forced (``data.format``); so is the question type (KD or CA: what the file says, or
``data.type``). Files are JSON Lines or one JSON array, the shape told
by the first non-blank character. Every problem is reported as ``FILE:LINE: what is wrong``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from . import agieval, jecqa, lawbench
from .records import DataError, LoadResult, Record

log = logging.getLogger("lawtune")

FORMATS = {"jecqa": jecqa, "agieval": agieval, "lawbench": lawbench}


def iter_objects(path: Path, text: str):
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
        for number, row in enumerate(text.splitlines(), start=1):
            if not row.strip():
                continue
            try:
                yield number, json.loads(row)
            except json.JSONDecodeError as exc:
                yield number, f"malformed JSON ({exc.msg})"
def detect_format(obj, path: Path) -> str:
    """The format whose fields the first record has; a record with some of JEC-QA's fields is JEC-QA (its
    problems are then reported field by field)."""
    for name, module in FORMATS.items():
        if module.looks_like(obj):
            return name
    if isinstance(obj, dict) and set(obj) & jecqa.KNOWN_FIELDS:
        return "jecqa"
    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
    raise DataError([f"{path}: not a JEC-QA, AGIEval or LawBench file (first record has: {keys}); "
                     f"see the README's data formats, or force one with data.format"])


def load_records(path: str | Path, require_answer: bool = True, max_samples: int | None = None,
                 fmt: str | None = None, question_type: str | None = None) -> LoadResult:
    """Load and validate a question file; raise DataError listing every problem found. ``fmt``: jecqa, agieval or
    lawbench (None or auto = detected). ``question_type``: KD or CA for every record (a renamed AGIEval or LawBench
    file, whose type is otherwise read from its name); None or auto = what the file says."""
    path = Path(path)
    if path.is_dir():
        raise DataError([f"{path}: is a directory; give a question file (JSON Lines or a JSON array)"])
    if not path.is_file():
        raise DataError([f"{path}: file not found"])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    records: list[Record] = []
    problems: list[str] = []
    notes: dict[str, list[int]] = {}
    skipped: Counter = Counter()
    seen_ids: dict[str, str] = {}
    module = FORMATS[fmt] if fmt is not None and fmt != "auto" else None
    for index, (line, obj) in enumerate(iter_objects(path, text), start=1):
        where = f"{path}:{line}"
        if isinstance(obj, str):
            problems.append(f"{where}: {obj}")
            continue
        if module is None:
            module = FORMATS[detect_format(obj, path)]
        elif index == 1 and not module.looks_like(obj):
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise DataError([f"{where}: data.format={fmt}, but the first record has the fields {keys}"])
        record, problem, skip, note = module.parse(obj, where, require_answer, path, index)
        if record is not None and question_type not in (None, "auto"):
            record.type = question_type
        if note:
            notes.setdefault(note, []).append(line)
        if problem:
            problems.append(problem)
        elif skip:
            skipped[skip] += 1
        elif record.id in seen_ids:
            problems.append(f"{where}: duplicate id {record.id!r} (first at {seen_ids[record.id]})")
        else:
            seen_ids[record.id] = where
            record.position = index
            records.append(record)
            if max_samples is not None and len(records) >= max_samples:
                break
    for note, lines in notes.items():
        shown = ", ".join(map(str, lines[:10])) + (", …" if len(lines) > 10 else "")
        log.warning("%s: %s in %d records (lines %s)", path, note, len(lines), shown)
    unanswered = [p for p in problems if p.endswith(jecqa.ANSWER_MISSING)]
    if unanswered and len(unanswered) == len(problems):
        raise DataError([f"{unanswered[0].rsplit(': ', 1)[0]}: {len(unanswered)} records have no 'answer' (scoring and "
                         f"training need one); to answer questions without gold answers use `lawtune predict`"])
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{path}: no usable records"])
    return LoadResult(records=records, skipped=dict(skipped), path=str(path))


def write_without(path: str | Path, dest: str | Path, positions: set[int]) -> int:
    """Copy a question file without its records at ``positions`` (``Record.position``), in the file's own format
    and shape: JSON Lines keep their other lines byte for byte, a JSON array keeps its other objects. Returns how
    many records were written."""
    path, dest = Path(path), Path(dest)
    text = path.read_text(encoding="utf-8")
    items = list(iter_objects(path, text))
    if text.lstrip("\ufeff \t\r\n").startswith("["):
        kept = [obj for index, (_, obj) in enumerate(items, start=1) if index not in positions]
        body = json.dumps(kept, ensure_ascii=False, indent=1) + "\n"
    else:
        lines = text.splitlines()
        kept = [lines[line - 1] for index, (line, _) in enumerate(items, start=1) if index not in positions]
        body = "".join(row + "\n" for row in kept)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(body, encoding="utf-8")
    return len(kept)
