"""Reading answers out of model output and scoring them the JEC-QA way.

JEC-QA counts a question as right only when the predicted option set equals
the gold set exactly (no partial credit), so everything here works on sets of
option letters.
"""

from __future__ import annotations

import re
import unicodedata

from .think import answer_part

# Markers that introduce a final answer.  "选" alone is a marker (选B, 故选,
# 应选, 本题选) but "选项" is not: reasoning constantly says "选项A错误", and
# "不选A" / "未选" state the opposite of an answer.
_MARKER = re.compile(
    r"正确的?选项"
    r"|答案"
    r"|答(?=\s*:)"
    r"|(?<![不未没非])(?<!不应)(?<!不能)(?<!不该)(?<!不可)选(?!项)"
    r"|(?i:correct\s+options?)"
    r"|(?i:answer)"
    r"|\\boxed\{"
)

# What may sit between a marker and the letters: "答案是：", "答案应该为选项",
# "故选择", "answer is", markdown bold, an opening bracket.  Bounded so that a
# marker cannot reach letters far away in unrelated text.
_FILLER = re.compile(
    r"(?:\s|[:=*(\[\]【】「{]|是|为|应|该|当|选项|选|择|即|就|则|最终|"
    r"(?i:is|are|would\s+be|should\s+be|will\s+be))*"
)
_FILLER_MAX = 16

# Separators allowed between letters inside one answer: "A、C", "A,C",
# "A和C", "(A)(C)", "A项和C项", "A and C".  "选项" only continues an answer
# after a conjunction ("选项A和选项C"); after a comma it starts a new clause
# ("答案为B，选项A、C均错误").
_SEP = r"(?:[\s、,;/&+()\[\]【】]|以及|和|及|与|(?<=[和及与、\s])选项|项|(?<=\s)and(?=\s))"


def _run_regex(letters: str) -> re.Pattern[str]:
    # Any upper-case letter may be part of a run (and is dropped later if it is
    # not a valid option) so that "AE" on an A-D question still reads as A;
    # lower-case letters only count when they are valid options, which keeps
    # ordinary English words from turning into answers.
    lower = "".join(sorted(set(letters.lower())))
    cls = f"[A-Z{re.escape(lower)}]" if lower else "[A-Z]"
    return re.compile(rf"{cls}(?:{_SEP}*{cls})*(?![A-Za-z])")


def _normalize(text: str) -> str:
    # NFKC folds full-width letters and punctuation (Ａ，：（） → A,:()), which
    # is what most Chinese model output uses.
    return unicodedata.normalize("NFKC", text)


def _answer_region(text: str) -> str:
    # Reasoning models think first; the answer is what comes after the final
    # </think> (think.answer_part).  A trace cut off before any text after it
    # still may contain an answer, so then the whole text is searched.
    tail = answer_part(text)
    return tail if tail.strip() else text


def _tokens_ok(run: str) -> bool:
    # A token mixing cases ("Bad", "Cab") is a word, not an answer.
    for token in re.findall(r"[A-Za-z]+", run):
        if token != token.upper() and token != token.lower():
            return False
    return True


def _letters_of(run: str, valid: str) -> list[str]:
    found = {ch.upper() for ch in run if ch.isascii() and ch.isalpha()}
    return sorted(found & set(valid))


def _after_marker(region: str, m: re.Match[str], run_re: re.Pattern[str], valid: str) -> list[str] | None:
    start = m.end()
    filler = _FILLER.match(region, start, start + _FILLER_MAX)
    pos = filler.end() if filler else start
    run = run_re.match(region, pos)
    if run is None:
        return None
    # "and" is a separator; its letters must not be read as options.
    text = re.sub(r"(?<=\s)and(?=\s)", " ", run.group(0))
    english = m.group(0)[:1].isascii() and not m.group(0).startswith("\\")
    has_lower = any(ch.islower() for ch in text if ch.isascii())
    # "The answer is a combination of…" must not read as A: after an English
    # marker, lower-case letters need an explicit colon ("answer: ac").
    if english and has_lower and ":" not in region[start:pos]:
        return None
    if not _tokens_ok(text):
        return None
    got = _letters_of(text, valid)
    return got or None


def extract_answer(text: str, letters: str = "ABCD") -> list[str] | None:
    """Return the sorted unique option letters a model answered, or None.

    Any text reads as an answer or None; an exception here is a bug in this reader and propagates (it used to
    be turned into "no answer", which hid it as a wrong prediction)."""
    if not isinstance(text, str) or not text.strip():
        return None
    valid = "".join(ch for ch in str(letters).upper() if "A" <= ch <= "Z")
    if not valid:
        return None
    region = _answer_region(_normalize(text))
    run_re = _run_regex(valid)

    # The last marker wins: models restate or revise before concluding.
    for m in reversed(list(_MARKER.finditer(region))):
        got = _after_marker(region, m, run_re, valid)
        if got:
            return got

    # No marker: accept output that is nothing but an answer ("AC",
    # "(A)(C)", "b").
    stripped = region.strip().strip("*.。!！")
    bare = re.fullmatch(r"[\s(\[【]*(.*?)[\s)\]】]*", stripped, re.S)
    if bare and bare.group(1):
        core = bare.group(1)
        run = run_re.fullmatch(core)
        core = re.sub(r"(?<=\s)and(?=\s)", " ", core)
        if run and _tokens_ok(core):
            return _letters_of(core, valid) or None

    # Last resort: a final line made only of capital letters, as written
    # by models that end their reasoning with the bare answer.
    lines = [ln.strip().strip("*.。") for ln in region.splitlines() if ln.strip()]
    if len(lines) > 1:
        last = lines[-1]
        if re.fullmatch(rf"[(\[【]?[A-Z](?:{_SEP}*[A-Z])*[)\]】]?", last):
            return _letters_of(last, valid) or None
    return None


def is_correct(pred: list[str] | None, gold: list[str]) -> bool:
    """JEC-QA exact match: the predicted set equals the gold set."""
    if not pred:
        return False
    return set(pred) == set(gold)


def _acc(samples: list[dict]) -> dict:
    n = len(samples)
    right = sum(1 for s in samples if _sample_correct(s))
    return {"n": n, "accuracy": right / n if n else 0.0}


def _sample_correct(s: dict) -> bool:
    if "correct" in s:
        return bool(s["correct"])
    return is_correct(s.get("pred") or [], s.get("gold") or [])


def _option_f1(samples: list[dict]) -> dict:
    universe = sorted({ch for s in samples for ch in (s.get("gold") or [])}
                      | {ch for s in samples for ch in (s.get("pred") or [])})
    out: dict = {}
    tp_all = fp_all = fn_all = 0
    f1s = []
    for letter in universe:
        tp = fp = fn = 0
        for s in samples:
            in_gold = letter in (s.get("gold") or [])
            in_pred = letter in (s.get("pred") or [])
            tp += in_gold and in_pred
            fp += in_pred and not in_gold
            fn += in_gold and not in_pred
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        out[letter] = {"precision": p, "recall": r, "f1": f1, "support": tp + fn}
        f1s.append(f1)
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    out["macro_f1"] = sum(f1s) / len(f1s) if f1s else 0.0
    micro_p = tp_all / (tp_all + fp_all) if tp_all + fp_all else 0.0
    micro_r = tp_all / (tp_all + fn_all) if tp_all + fn_all else 0.0
    out["micro_f1"] = 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0
    return out


def summarize(samples: list[dict]) -> dict:
    """Aggregate per-question results into the numbers reported for a run."""
    n = len(samples)
    correct = sum(1 for s in samples if _sample_correct(s))
    invalid = sum(1 for s in samples if not s.get("valid", bool(s.get("pred"))))
    forced = sum(1 for s in samples if s.get("forced", False))
    tokens = sum(int(s.get("generated_tokens", 0) or 0) for s in samples)

    by_type: dict[str, dict] = {}
    types = ["KD", "CA"] + sorted({str(s.get("type", "unknown")) for s in samples} - {"KD", "CA"})
    for t in types:
        by_type[t] = _acc([s for s in samples if str(s.get("type", "unknown")) == t])

    return {
        "n": n,
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "invalid": invalid,
        "invalid_rate": invalid / n if n else 0.0,
        "forced": forced,
        "single": _acc([s for s in samples if len(s.get("gold") or []) == 1]),
        "multi": _acc([s for s in samples if len(s.get("gold") or []) > 1]),
        "by_type": by_type,
        "option_f1": _option_f1(samples),
        "avg_generated_tokens": tokens / n if n else 0.0,
    }


LAWBENCH_RULE = ("LawBench's rule, applied to the text after the last </think> (R1 reasoning mentions every option "
                 "letter): correct when the gold letter appears and no other option letter does; abstained when no "
                 "option letter appears")


def lawbench_judgement(output: str, gold: list[str], letters: str = "ABCD") -> tuple[bool, bool]:
    """(correct, abstained) of one output by LawBench's rule for its single-answer questions (``LAWBENCH_RULE``)."""
    region = _normalize(answer_part(output))
    present = {ch for ch in region if ch in letters}
    return present == set(gold), not present


def lawbench_summary(samples: list[dict]) -> dict:
    """lawbench_score and abstention_rate over samples with ``output`` and ``gold``."""
    judged = [lawbench_judgement(s.get("output") or "", s.get("gold") or []) for s in samples]
    n = len(judged)
    return {"lawbench_score": sum(c for c, _ in judged) / n if n else 0.0,
            "abstention_rate": sum(a for _, a in judged) / n if n else 0.0, "lawbench_rule": LAWBENCH_RULE}


# ----------------------------------------------------------------------------- voting over K samples


MAJORITY_RULE = ("maj@K: the answer set most samples gave; unreadable samples do not vote; a tie goes to the set "
                 "that was sampled first. A question's pred/correct/output are its majority answer's")


def majority(preds: list[list[str] | None]) -> tuple[int | None, float]:
    """The vote of one question's K sampled answers (None = unreadable) by ``MAJORITY_RULE``: (the index of the first
    sample that gave the winning answer set, the share of all K samples that gave it); (None, 0.0) when none could be
    read. Every voted answer (eval's maj@K, predict, ask, serve) is this one."""
    votes: dict[tuple, int] = {}
    first: dict[tuple, int] = {}
    for i, pred in enumerate(preds):
        if pred is not None:
            key = tuple(sorted(pred))
            votes[key] = votes.get(key, 0) + 1  # dicts keep insertion order: the first sampled set wins a tie
            first.setdefault(key, i)
    if not votes:
        return None, 0.0
    winner = max(votes, key=lambda key: votes[key])
    return first[winner], votes[winner] / len(preds)


def vote(drawn: list[dict]) -> dict:
    """One question's K samples as one sample: the majority answer set (``majority``), with the per-question mean and
    any correct (avg@K, pass@K) and the agreement among the samples."""
    index, agreement = majority([d["pred"] if d["valid"] else None for d in drawn])
    best = drawn[index if index is not None else 0]
    return {**best, "correct": bool(index is not None and best["correct"]),
            "mean_correct": sum(d["correct"] for d in drawn) / len(drawn), "any_correct": any(d["correct"] for d in drawn),
            "agreement": agreement, "forced": sum(d["forced"] for d in drawn) > len(drawn) / 2,
            "generated_tokens": sum(d["generated_tokens"] for d in drawn),
            "sampled": [{"pred": d["pred"], "valid": d["valid"], "correct": d["correct"], "output": d["output"]}
                        for d in drawn]}
