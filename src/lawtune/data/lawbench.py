"""LawBench's JEC-QA tasks (``data/{zero_shot,one_shot}/{1-2,3-6}.json``): one JSON array of
``{"instruction": …, "question": …, "answer": "正确答案：B。"}``.

The question holds the statement and then its four options inline, ``…?A:text;B:text;C:text;D:text`` (the last may
end with ``。``; colons ASCII or full-width, in the options and in the answer). The options are split off here, so
that the statement is the question alone (what the overlap check compares); the file's own instruction and
question are kept for ``--prompt-format native`` (LawBench's protocol). Ids are ``<file stem>-<position>``; the
type is KD for tasks 1-2 and CA for 3-6 (from the file name, unless ``data.type`` says it).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .records import Record

_COLON = "[:：]"
_SEMI = "[;；]"
_INLINE = re.compile(rf"^(?P<statement>.*)A{_COLON}(?P<A>.*?){_SEMI}\s*B{_COLON}(?P<B>.*?){_SEMI}\s*"
                     rf"C{_COLON}(?P<C>.*?){_SEMI}\s*D{_COLON}(?P<D>.*?)[。.]?\s*$", re.S)
_ANSWER = re.compile(rf"正确答案\s*{_COLON}\s*([A-D])")


def looks_like(obj: Any) -> bool:
    return isinstance(obj, dict) and "instruction" in obj and "question" in obj and "option_list" not in obj


def type_of(path: Path) -> str:
    name = path.stem
    return "KD" if name.startswith("1-2") else "CA" if name.startswith("3-6") else "unknown"


def parse(obj: Any, where: str, require_answer: bool, path: Path, index: int):
    """(record, problem, skip reason, note) of one array item."""
    instruction, question, raw_answer = obj.get("instruction"), obj.get("question"), obj.get("answer")
    if not isinstance(question, str) or not isinstance(instruction, str):
        return None, f"{where}: 'instruction' and 'question' must be strings", None, None
    m = _INLINE.match(question.strip())
    if m is None:
        return None, f"{where}: no inline options 'A:…;B:…;C:…;D:…' at the end of the question", None, None
    options = {letter: m.group(letter).strip() for letter in "ABCD"}
    answer = None
    if raw_answer not in (None, ""):
        found = _ANSWER.search(str(raw_answer))
        if found is None:
            return None, f"{where}: answer {str(raw_answer)[:30]!r} is not '正确答案：X'", None, None
        answer = [found.group(1)]
    elif require_answer:
        return None, None, "empty answer", None
    statement = m.group("statement").strip()
    record = Record(id=f"{path.stem}-{index}", statement=statement, options=options, answer=answer,
                    type=type_of(path), extra={"instruction": instruction, "question": question},
                    where=where, format="lawbench")
    return record, None, None, None
