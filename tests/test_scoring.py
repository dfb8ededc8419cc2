import re
import sys

import pytest

from lawtune import scoring
from lawtune.scoring import extract_answer, is_correct, summarize

ABCD = "ABCD"

CASES = [
    # explicit markers
    ("答案：ACD", ABCD, ["A", "C", "D"]),
    ("答案:AC", ABCD, ["A", "C"]),
    ("答案是A和C", ABCD, ["A", "C"]),
    ("正确答案为 B", ABCD, ["B"]),
    ("选B", ABCD, ["B"]),
    ("故选：A、D", ABCD, ["A", "D"]),
    ("应选BD", ABCD, ["B", "D"]),
    ("本题选C", ABCD, ["C"]),
    ("正确选项是B、C", ABCD, ["B", "C"]),
    ("故选择D。", ABCD, ["D"]),
    ("答：A", ABCD, ["A"]),
    ("答案应该是选项A和选项C", ABCD, ["A", "C"]),
    ("答案：A项、C项", ABCD, ["A", "C"]),
    ("答案：选项A、选项D", ABCD, ["A", "D"]),
    ("故本题答案为B，选项A、C、D均错误。", ABCD, ["B"]),
    ("应选C，不应选A", ABCD, ["C"]),
    ("答案：C\n\n解析：A项错误，不选。", ABCD, ["C"]),
    ("答案：A及D", ABCD, ["A", "D"]),
    ("答案：B与C", ABCD, ["B", "C"]),
    ("**答案：BC**", ABCD, ["B", "C"]),
    ("答案：**AD**", ABCD, ["A", "D"]),
    ("最终答案：\\boxed{AB}", ABCD, ["A", "B"]),
    # LawBench's answer form
    ("[正确答案]C<eoa>", ABCD, ["C"]),
    ("【正确答案】B<eoa>", ABCD, ["B"]),
    # brackets, separators, width, case, order
    ("答案：(A)(C)", ABCD, ["A", "C"]),
    ("答案：（A）（C）", ABCD, ["A", "C"]),
    ("(A)(C)", ABCD, ["A", "C"]),
    ("（B）（D）", ABCD, ["B", "D"]),
    ("A,C", ABCD, ["A", "C"]),
    ("A，C", ABCD, ["A", "C"]),
    ("A、B、D", ABCD, ["A", "B", "D"]),
    ("答案：ＡＣ", ABCD, ["A", "C"]),
    ("Ｂ", ABCD, ["B"]),
    ("答案：ac", ABCD, ["A", "C"]),
    ("答案：CAC", ABCD, ["A", "C"]),
    ("答案：DCBA", ABCD, ["A", "B", "C", "D"]),
    ("AC", ABCD, ["A", "C"]),
    ("B", ABCD, ["B"]),
    ("bd", ABCD, ["B", "D"]),
    ("  B。 ", ABCD, ["B"]),
    # English
    ("The answer is B.", ABCD, ["B"]),
    ("Final answer: A, C", ABCD, ["A", "C"]),
    ("answer: bd", ABCD, ["B", "D"]),
    ("The answer is A and C.", ABCD, ["A", "C"]),
    ("answer: B and C", "ABCDE", ["B", "C"]),
    ("A and C", ABCD, ["A", "C"]),
    # reasoning mentioning other letters before the final answer
    ("选项A错误，因为…；选项B正确…；选项C也正确。综上，答案：BC", ABCD, ["B", "C"]),
    ("A项说法错误，不选A。D项正确。故选D", ABCD, ["D"]),
    ("初步判断答案是A。但再看C也对，所以最终答案：AC", ABCD, ["A", "C"]),
    ("分析：A正确，B错误，C错误，D正确。\n所以本题应选AD。", ABCD, ["A", "D"]),
    ("逐项分析如下……\nBD", ABCD, ["B", "D"]),
    # </think>
    ("<think>我认为答案：A，但不确定</think>\n答案：BC", ABCD, ["B", "C"]),
    ("<think>答案：A</think>先想想</think>答案：D", ABCD, ["D"]),
    ("<think>分析各选项……综上答案：C</think>\n", ABCD, ["C"]),
    ("<think>选项A错误</think>\n\nBD", ABCD, ["B", "D"]),
    # 5-option questions and letter validity
    ("答案：ABE", "ABCDE", ["A", "B", "E"]),
    ("答案：E", "ABCDE", ["E"]),
    ("E", "ABCDE", ["E"]),
    ("答案：AE", ABCD, ["A"]),
    ("答案：E", ABCD, None),
    # invalid -> None
    ("我不确定", ABCD, None),
    ("", ABCD, None),
    ("   ", ABCD, None),
    ("答案：无法确定", ABCD, None),
    ("Based on the analysis, I cannot decide.", ABCD, None),
    ("CAD software is used for design.", ABCD, None),
    ("The answer is a combination of factors.", ABCD, None),
    ("answer: Based on law", ABCD, None),
    ("Bad", ABCD, None),
    ("选项A错误，选项B错误。", ABCD, None),
    ("不选A", ABCD, None),
    ("答案见上文分析", ABCD, None),
    ("<think>还在想", ABCD, None),
]


@pytest.mark.parametrize("text,letters,expected", CASES)
def test_extract_answer(text, letters, expected):
    assert extract_answer(text, letters) == expected


def test_extract_answer_default_letters_and_bad_input():
    assert extract_answer("答案：BD") == ["B", "D"]
    assert extract_answer(None) is None  # type: ignore[arg-type]
    assert extract_answer("答案：A", letters="") is None


class _CountingPattern:
    """A compiled pattern that adds to ``work`` the characters each call consumes (match) or scans (the rest)."""

    def __init__(self, pattern, work):
        self._pattern, self._work = pattern, work

    def __getattr__(self, name):
        return getattr(self._pattern, name)

    def match(self, string, pos=0, endpos=sys.maxsize):
        m = self._pattern.match(string, pos, endpos)
        self._work[0] += m.end() - pos if m else 1
        return m

    def fullmatch(self, string, pos=0, endpos=sys.maxsize):
        self._work[0] += max(min(endpos, len(string)) - pos, 1)
        return self._pattern.fullmatch(string, pos, endpos)

    def search(self, string, pos=0, endpos=sys.maxsize):
        m = self._pattern.search(string, pos, endpos)
        self._work[0] += (m.end() if m else min(endpos, len(string))) - pos + 1
        return m

    def finditer(self, string, *args):
        self._work[0] += len(string)
        return self._pattern.finditer(string, *args)

    def findall(self, string, *args):
        self._work[0] += len(string)
        return self._pattern.findall(string, *args)

    def sub(self, repl, string, *args):
        self._work[0] += len(string)
        return self._pattern.sub(repl, string, *args)


class _CountingRe:
    """The ``re`` module as lawtune.scoring sees it, with every pattern it compiles counting."""

    def __init__(self, work):
        self._work = work

    def __getattr__(self, name):
        return getattr(re, name)

    def compile(self, pattern, flags=0):
        return _CountingPattern(re.compile(pattern, flags), self._work)

    def match(self, pattern, string, flags=0):
        return self.compile(pattern, flags).match(string)

    def fullmatch(self, pattern, string, flags=0):
        return self.compile(pattern, flags).fullmatch(string)

    def search(self, pattern, string, flags=0):
        return self.compile(pattern, flags).search(string)

    def finditer(self, pattern, string, flags=0):
        return self.compile(pattern, flags).finditer(string)

    def findall(self, pattern, string, flags=0):
        return self.compile(pattern, flags).findall(string)

    def sub(self, pattern, repl, string, count=0, flags=0):
        return self.compile(pattern, flags).sub(repl, string, count)


def regex_work(text, monkeypatch, letters="ABCD"):
    """(extract_answer's result, the characters its regular expressions scanned or consumed): an operation count
    of the reader (its work is regex work), with no clock."""
    work = [0]
    with monkeypatch.context() as m:
        m.setattr(scoring, "re", _CountingRe(work))
        for name, value in list(vars(scoring).items()):
            if isinstance(value, re.Pattern):
                m.setattr(scoring, name, _CountingPattern(value, work))
        got = scoring.extract_answer(text, letters)
    return got, work[0]


# Long model outputs (n repeats of a piece), each of a shape that could make a reader rescan the text per marker.
LONG_OUTPUTS = {
    "reasoning, then the answer": (lambda n: "选项A分析。" * n + "故选：A、C", ["A", "C"]),
    "a cut-off trace of markers that give no answer": (lambda n: "<think>" + "答案不明，选项A错误，不选A，B项也不对。" * n,
                                                      None),
    "revised answers, the last wins": (lambda n: "初步判断答案是A。但再看，" * n + "所以最终答案：BC", ["B", "C"]),
    "a long think block": (lambda n: "<think>" + "选A，又选B。" * n + "</think>\n\n答案：AD", ["A", "D"]),
    "a long run of letters": (lambda n: "答案：" + "A、B、" * n, ["A", "B"]),
    "English": (lambda n: "The answer is not clear. " * n + "Final answer: A, C", ["A", "C"]),
}


@pytest.mark.parametrize("shape", LONG_OUTPUTS)
def test_extract_answer_does_linear_work_on_long_outputs(shape, monkeypatch):
    """Reading 4x the text takes at most 5x the regex work (quadratic rescanning would take 16x), counted in
    characters, not timed; and the answer read does not depend on the length."""
    make, expected = LONG_OUTPUTS[shape]
    short, long = make(200), make(800)
    got_short, work_short = regex_work(short, monkeypatch)
    got_long, work_long = regex_work(long, monkeypatch)
    assert got_short == got_long == expected
    assert work_short > 0
    assert work_long <= 5 * work_short, (work_short, work_long)
    assert work_long <= 8 * len(long), (work_long, len(long))


def test_is_correct():
    assert is_correct(["A", "C"], ["A", "C"])
    assert is_correct(["C", "A"], ["A", "C"])
    assert not is_correct(["A"], ["A", "C"])
    assert not is_correct(["A", "B", "C"], ["A", "C"])
    assert not is_correct([], ["A"])
    assert not is_correct(None, ["A"])


def _s(i, typ, gold, pred, forced=False, tokens=100):
    return {
        "id": i, "type": typ, "gold": gold, "pred": pred, "valid": bool(pred),
        "correct": set(pred) == set(gold) and bool(pred), "forced": forced,
        "generated_tokens": tokens,
    }


def test_summarize_hand_computed():
    samples = [
        _s("1", "KD", ["A"], ["A"], tokens=100),             # single, right
        _s("2", "KD", ["B"], ["C"], tokens=200),             # single, wrong
        _s("3", "CA", ["A", "C"], ["A", "C"], tokens=300),   # multi, right
        _s("4", "CA", ["A", "B"], ["A"], tokens=400),        # multi, wrong
        _s("5", "CA", ["D"], [], forced=True, tokens=1000),  # single, invalid
    ]
    r = summarize(samples)
    assert r["n"] == 5
    assert r["correct"] == 2
    assert r["accuracy"] == pytest.approx(0.4)
    assert r["invalid"] == 1
    assert r["invalid_rate"] == pytest.approx(0.2)
    assert r["forced"] == 1
    assert r["single"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    assert r["multi"] == {"n": 2, "accuracy": pytest.approx(0.5)}
    assert set(r["by_type"]) == {"KD", "CA"}
    assert r["by_type"]["KD"] == {"n": 2, "accuracy": pytest.approx(0.5)}
    assert r["by_type"]["CA"] == {"n": 3, "accuracy": pytest.approx(1 / 3)}
    assert r["avg_generated_tokens"] == pytest.approx(400.0)

    # Letter A: gold in 1,3,4 ; predicted in 1,3,4 -> tp=3, fp=0, fn=0
    a = r["option_f1"]["A"]
    assert (a["precision"], a["recall"], a["f1"], a["support"]) == (1.0, 1.0, 1.0, 3)
    # Letter C: gold in 3 ; predicted in 2,3 -> tp=1, fp=1, fn=0
    c = r["option_f1"]["C"]
    assert c["precision"] == pytest.approx(0.5)
    assert c["recall"] == pytest.approx(1.0)
    assert c["f1"] == pytest.approx(2 / 3)
    assert c["support"] == 1
    # Letter B: gold in 2,4 ; never predicted -> tp=0, fn=2
    b = r["option_f1"]["B"]
    assert (b["precision"], b["recall"], b["f1"], b["support"]) == (0.0, 0.0, 0.0, 2)
    # Letter D: gold in 5 ; never predicted
    assert r["option_f1"]["D"]["support"] == 1
    assert r["option_f1"]["macro_f1"] == pytest.approx((1.0 + 0.0 + 2 / 3 + 0.0) / 4)
    # micro: tp=4 (A x3, C x1), fp=1 (C in q2), fn=3 (B x2, D x1)
    micro_p, micro_r = 4 / 5, 4 / 7
    assert r["option_f1"]["micro_f1"] == pytest.approx(2 * micro_p * micro_r / (micro_p + micro_r))


def test_summarize_unknown_type_and_empty():
    r = summarize([_s("1", "unknown", ["A"], ["A"])])
    assert r["by_type"]["unknown"] == {"n": 1, "accuracy": 1.0}
    assert r["by_type"]["KD"] == {"n": 0, "accuracy": 0.0}
    assert "unknown" not in summarize([_s("1", "KD", ["A"], ["A"])])["by_type"]

    e = summarize([])
    assert e["n"] == 0 and e["accuracy"] == 0.0 and e["invalid_rate"] == 0.0
    assert e["single"] == {"n": 0, "accuracy": 0.0}
    assert set(e["by_type"]) == {"KD", "CA"}
    assert e["avg_generated_tokens"] == 0.0
    assert e["option_f1"]["macro_f1"] == 0.0
