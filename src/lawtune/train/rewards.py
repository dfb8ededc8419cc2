"""Rewards for reinforcement learning on JEC-QA (issue 18), one function each, in TRL's reward-function form:
``f(prompts, completions, **columns) -> list[float]``, where the dataset's columns ``answer`` (gold letters) and
``letters`` (the question's option letters) arrive as keyword arguments, as TRL's ``GRPOTrainer`` passes them.

Completions are the text after a reasoning prompt (which ends with ``<think>\\n``): the think text, ``</think>``,
the answer. An answer is read only after the model closed its think block itself: a completion cut off inside
its reasoning has no answer (its reasoning names every option letter on the way).
"""

from __future__ import annotations

import re

from ..scoring import extract_answer
from ..think import CLOSE, answer_part, closed

_ANSWER_LINE = re.compile(r"^\s*(?:\*\*)?\s*答案\s*[:：]", re.M)


def _text(completion) -> str:
    """TRL hands conversational completions as [{"role": "assistant", "content": …}]."""
    if isinstance(completion, list):
        return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))
    return completion or ""


def read_answer(completion, letters: str) -> list[str] | None:
    """The letters answered after the last </think>, or None (never closed, nothing readable)."""
    text = _text(completion)
    if not closed(text):
        return None
    return extract_answer(answer_part(text), letters)


def exact_set(prompts, completions, answer, letters, **_) -> list[float]:
    """1 when the answer set equals the gold set exactly (JEC-QA's rule), else 0."""
    out = []
    for completion, gold, valid in zip(completions, answer, letters):
        got = read_answer(completion, valid)
        out.append(1.0 if got is not None and set(got) == set(gold) else 0.0)
    return out


def option_f1(prompts, completions, answer, letters, **_) -> list[float]:
    """Partial credit: F1 of the answered options against the gold ones (0 without an answer)."""
    out = []
    for completion, gold, valid in zip(completions, answer, letters):
        got = set(read_answer(completion, valid) or [])
        hit = len(got & set(gold))
        out.append(0.0 if not got or not hit else 2 * hit / (len(got) + len(set(gold))))
    return out


def answer_format(prompts, completions, **_) -> list[float]:
    """1 when the model closed its think block itself, once, and then wrote exactly one 答案： line, else 0."""
    out = []
    for completion in completions:
        text = _text(completion)
        if text.count(CLOSE) != 1:
            out.append(0.0)
            continue
        out.append(1.0 if len(_ANSWER_LINE.findall(answer_part(text))) == 1 else 0.0)
    return out


def _sizes(completions, completion_ids) -> list[int]:
    """Completion lengths: tokens of TRL's ``completion_ids`` (the end token included), else characters."""
    return [len(ids) for ids in completion_ids] if completion_ids is not None else [len(_text(c)) for c in completions]


def length_penalty(budget: int, per_budget: float = 1.0):
    """A reward that is 0 up to ``budget`` completion tokens and falls by ``per_budget`` for every further
    ``budget`` tokens (counted from TRL's ``completion_ids``, else characters)."""

    def penalty(prompts, completions, completion_ids=None, **_) -> list[float]:
        return [-per_budget * max(0, n - budget) / budget for n in _sizes(completions, completion_ids)]

    penalty.__name__ = f"length_penalty_{budget}"
    return penalty


def soft_overlong_penalty(max_length: int, cache: int, at_max: float = 1.0):
    """DAPO's soft overlong punishment, the other form of the length penalty: 0 up to ``max_length - cache``
    completion tokens, then linear down to ``-at_max`` at ``max_length`` (and no lower past it)."""

    def penalty(prompts, completions, completion_ids=None, **_) -> list[float]:
        start = max_length - cache
        return [-at_max * min(1.0, max(0, n - start) / cache) for n in _sizes(completions, completion_ids)]

    penalty.__name__ = f"length_penalty_soft_overlong_{cache}"
    return penalty
