"""AGIEval's copies of JEC-QA (``jec-qa-kd.jsonl``, ``jec-qa-ca.jsonl``): JSON Lines of
``{"passage": null, "question": …, "options": ["(A)…", …], "label": ["A", "C"], "answer": null, "other": null}``.

Ids come from the line number (``<file stem>-<line>``), the type from the file name (``kd`` / ``ca``) unless
``data.type`` says it. ``label`` is
a list of letters or a string; an empty one is skipped and counted. Real copies hold labels with a stray
punctuation mark (``["A", "C", "D", "。"]``): it is dropped, and the loader warns once, counting and naming the
lines; a letter that is not an option is an error.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from .records import Record

_OPTION = re.compile(r"^\s*[(（]?\s*([A-Z])\s*[)）.．、:：]?\s*(.*)$", re.S)
STRAY = "dropped a stray punctuation mark from the label"


def looks_like(obj: Any) -> bool:
    return isinstance(obj, dict) and "label" in obj and "options" in obj and "question" in obj


def type_of(path: Path) -> str:
    name = path.stem.lower()
    if re.search(r"(?<![a-z])kd(?![a-z])", name):
        return "KD"
    if re.search(r"(?<![a-z])ca(?![a-z])", name):
        return "CA"
    return "unknown"


def parse(obj: Any, where: str, require_answer: bool, path: Path, index: int):
    """(record, problem, skip reason, note) of one line."""
    line = where.rsplit(":", 1)[-1]
    question, raw_options, label = obj.get("question"), obj.get("options"), obj.get("label")
    if not isinstance(question, str) or not question.strip():
        return None, f"{where}: 'question' must be a non-empty string", None, None
    if not isinstance(raw_options, list) or len(raw_options) < 2:
        return None, f"{where}: 'options' must be a list of at least two '(A)…' strings", None, None
    options: dict[str, str] = {}
    for k, raw in enumerate(raw_options):
        m = _OPTION.match(unicodedata.normalize("NFKC", str(raw))) if isinstance(raw, str) else None
        if m is None or m.group(1) != chr(ord("A") + k):
            return None, f"{where}: option {k + 1} should start with ({chr(ord('A') + k)}), got {str(raw)[:20]!r}", None, None
        options[m.group(1)] = m.group(2).strip()
    note = None
    if label is None or label == [] or label == "":
        if require_answer:
            return None, None, "empty label", None
        answer = None
    else:
        items = list(label) if isinstance(label, str) else label
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            return None, f"{where}: 'label' must be a list of letters or a string, got {label!r}", None, None
        letters = []
        for item in items:
            item = unicodedata.normalize("NFKC", item).strip()
            if not item:
                continue
            if all(unicodedata.category(ch).startswith("P") for ch in item):
                note = STRAY
                continue
            letters.append(item.upper())
        bad = [x for x in letters if x not in options]
        if bad:
            return None, f"{where}: label {bad[0]!r} is not among the options {''.join(options)}", None, None
        answer = sorted(set(letters)) or None
        if answer is None and require_answer:
            return None, None, "empty label", note
    passage = obj.get("passage")
    statement = (passage.strip() + "\n" if isinstance(passage, str) and passage.strip() else "") + question.strip()
    record = Record(id=f"{path.stem}-{line}", statement=statement, options=options, answer=answer, type=type_of(path),
                    extra={}, where=where, format="agieval")
    return record, None, None, note
