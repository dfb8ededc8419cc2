"""The GRPO rewards on a table of completions (issue 18): (completion, gold, exact, f1, format)."""

import pytest

from lawtune.train.rewards import answer_format, exact_set, length_penalty, option_f1, soft_overlong_penalty

TABLE = [
    ("分析……</think>\n\n答案：AC", "AC", 1.0, 1.0, 1.0),
    ("分析……</think>\n\n答案：A", "AC", 0.0, 2 / 3, 1.0),             # one of two: partial credit only
    ("分析……</think>\n\n答案：ABC", "AC", 0.0, 0.8, 1.0),
    ("分析……</think>\n\n答案：B", "AC", 0.0, 0.0, 1.0),
    ("想了很久，A和C都对，但还没有想完", "AC", 0.0, 0.0, 0.0),         # unclosed think: no answer
    ("分析</think>\n\n答案：B\n答案：AC", "AC", 1.0, 1.0, 0.0),       # two answer lines: the last counts, format 0
    ("分析</think>\n\n答案：ＡＣ", "AC", 1.0, 1.0, 1.0),              # full-width letters
    ("分析</think>\n\n答案：A、C", "AC", 1.0, 1.0, 1.0),
    ("分析</think>\n\n$%&@!", "AC", 0.0, 0.0, 0.0),                   # garbage after the think block
    ("", "AC", 0.0, 0.0, 0.0),
    ("分析</think>\n\n故选C。", "C", 1.0, 1.0, 0.0),                  # right, but no 答案： line
    ("A</think>B</think>\n\n答案：B", "B", 1.0, 1.0, 0.0),            # closed twice
    ("分析</think>\n\n答案：ABCD", "ABCD", 1.0, 1.0, 1.0),
    ("分析</think>\n\n答案：D", "ABCD", 0.0, 0.4, 1.0),
    ("分析</think>\n\n**答案：BD**", "BD", 1.0, 1.0, 1.0),
    ("分析</think>\n\n答案：E", "AB", 0.0, 0.0, 1.0),                  # not an option: no answer
    ("分析</think>\n\n答案：b", "B", 1.0, 1.0, 1.0),
]


@pytest.mark.parametrize("completion,gold,exact,f1,fmt", TABLE)
def test_rewards_of_a_completion(completion, gold, exact, f1, fmt):
    columns = {"answer": [list(gold)], "letters": ["ABCD"]}
    assert exact_set([""], [completion], **columns) == [exact]
    assert option_f1([""], [completion], **columns) == [pytest.approx(f1)]
    assert answer_format([""], [completion], **columns) == [fmt]


def test_conversational_completions_are_read_too():
    completion = [{"role": "assistant", "content": "分析</think>\n\n答案：AC"}]
    assert exact_set([""], [completion], answer=[["A", "C"]], letters=["ABCD"]) == [1.0]


def test_length_penalty_past_the_budget():
    penalty = length_penalty(100, per_budget=0.5)
    assert penalty(["", "", ""], ["", "", ""], completion_ids=[[0] * 80, [0] * 100, [0] * 300]) == [0.0, 0.0, -1.0]
    assert penalty.__name__ == "length_penalty_100"  # TRL logs each reward under its function's name


def test_soft_overlong_penalty_is_zero_before_the_cache_and_falls_linearly_to_minus_one_at_the_maximum():
    penalty = soft_overlong_penalty(1000, 200)
    sizes = [0, 799, 800, 850, 900, 999, 1000, 1200]
    got = penalty([""] * len(sizes), [""] * len(sizes), completion_ids=[[0] * n for n in sizes])
    assert got == pytest.approx([0.0, 0.0, 0.0, -0.25, -0.5, -0.995, -1.0, -1.0])
    assert penalty.__name__ == "length_penalty_soft_overlong_200"
    half = soft_overlong_penalty(1000, 200, at_max=0.5)
    assert half([""], [""], completion_ids=[[0] * 900]) == [pytest.approx(-0.25)]
