"""The JEC-QA release format: JSON Lines (or one JSON array) of ``id``, ``statement``, ``option_list``,
``answer`` (and optional ``type``, ``subject``, ``reasoning``).

Every record is validated and every problem is reported as ``FILE:LINE: what is wrong``; nothing is dropped
silently (records with an empty answer list are skipped and counted, since training and scoring need a gold
answer). Reading the file and the loop over its records are in ``load.py``.
"""

from __future__ import annotations

import string
from typing import Any

from .records import TYPE_NAMES, Record

ANSWER_MISSING = "missing field 'answer' (needed for training and evaluation)"
KNOWN_FIELDS = {"id", "statement", "option_list", "answer", "type", "subject", "reasoning"}


def _normalize_type(value: Any, record_id: str) -> str:
    if value is not None:
        return TYPE_NAMES.get(str(value).strip(), "unknown")
    prefix = record_id.split("_", 1)[0]
    return TYPE_NAMES.get(prefix, "unknown") if "_" in record_id else "unknown"


def parse_record(obj: Any, where: str, require_answer: bool) -> tuple[Record | None, str | None, str | None]:
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
        return None, f"{where}: {ANSWER_MISSING}", None

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


def looks_like(obj: Any) -> bool:
    return isinstance(obj, dict) and "option_list" in obj


def parse(obj: Any, where: str, require_answer: bool, path, index: int):
    return parse_record(obj, where, require_answer) + (None,)
