"""think.py: the one set of think-block rules (answer after the LAST </think>, reasoning before the first)."""

import pytest

from lawtune import think

# (text, closed, reasoning (None: never closed), answer part)
CASES = [
    ("答案：A", False, None, "答案：A"),                                          # no think block: all answer
    ("", False, None, ""),
    ("分析</think>\n\n答案：B", True, "分析", "\n\n答案：B"),                       # one
    ("<think>\n分析</think>答案：B", True, "\n分析", "答案：B"),                     # the opening tag is not reasoning
    ("  \n<think>分析</think>答案：B", True, "分析", "答案：B"),                     # nor white space before it
    ("A</think>B</think>答案：C", True, "A", "答案：C"),                           # several: first / last
    ("<think>A</think>x</think>y</think>\n答案：D", True, "A", "\n答案：D"),
    ("分析选项A、B", False, None, "分析选项A、B"),                                 # unclosed (cut off)
    ("<think>分析", False, None, "<think>分析"),
    ("分析</think>", True, "分析", ""),                                           # closed, nothing after it
    ("分析</think>  \n\n ", True, "分析", "  \n\n "),                             # white space kept, not stripped
    ("</think>答案：A", True, "", "答案：A"),                                      # empty reasoning
    ("分析</think >答案：A", False, None, "分析</think >答案：A"),                  # not the tag
    ("分析<think>答案：A", False, None, "分析<think>答案：A"),                      # an opening tag does not close
]


@pytest.mark.parametrize("text,closed,reasoning,answer", CASES)
def test_rules(text, closed, reasoning, answer):
    assert think.closed(text) is closed
    assert think.answer_part(text) == answer
    assert think.split(text) == (reasoning, answer)


@pytest.mark.parametrize("trace,fmt,closing", [
    ("想了很久", "chat", "\n</think>\n\n答案："),
    ("想了很久", "plain", "\n</think>\n答案："),
    ("想了很久", "native", "\n</think>\n\n答案："),
    ("想完了</think>\n\n我认为", "chat", "\n答案："),   # already closed: only a new answer line
    ("a</think>b</think>c", "plain", "\n答案："),
])
def test_closing_text(trace, fmt, closing):
    assert think.closing_text(trace, fmt) == closing
    # a forced answer is read after the last </think>, so its closing puts 答案： into the answer part
    assert think.answer_part(trace + closing + "B").rstrip().endswith("答案：B")


def test_unknown_format():
    with pytest.raises(KeyError):
        think.closing_text("想", "markdown")


def test_tags():
    assert think.OPEN_LINE == "<think>\n" and think.CLOSE == "</think>"
    assert all(v.strip() == think.CLOSE for v in think.CLOSE_LINES.values())


def test_leaf_module():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(think))
    imported = ["." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.startswith(("lawtune", "."))], imported


def test_readers_agree():
    """Scoring, rewards and distill read the answer where think.answer_part says (the last </think>)."""
    from lawtune.distill import split_think
    from lawtune.scoring import extract_answer
    from lawtune.train.rewards import read_answer

    text = "<think>答案：A</think>再想想：答案：B</think>\n答案：C"
    assert extract_answer(text) == ["C"]
    assert read_answer(text, "ABCD") == ["C"]
    assert split_think(text) == ("答案：A", "\n答案：C")
    assert read_answer("答案：C", "ABCD") is None         # never closed: no answer for a reward
    assert split_think("答案：C") == (None, "")
