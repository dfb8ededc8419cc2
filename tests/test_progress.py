import io

from lawtune.progress import LogLines, progress


def test_a_log_gets_a_whole_line_every_few_percent_and_no_carriage_returns():
    log = io.StringIO()
    bar = progress(total=1000, desc="eval", unit="q", file=log)
    assert isinstance(bar, LogLines)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix(q_s="1.0")
    bar.close()
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 21  # 0%, 5%, ... 100%, each once
    assert lines[0].startswith("eval:   0%") and "1000/1000" in lines[-1]


def test_a_resumed_bar_starts_at_its_initial_count():
    log = io.StringIO()
    bar = progress(total=10, initial=4, desc="predict", unit="q", file=log)
    bar.update(6)
    bar.close()
    lines = log.getvalue().splitlines()
    assert "4/10" in lines[0] and "10/10" in lines[-1] and len(lines) == 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdms_live_bar():
    bar = progress(total=3, desc="train", unit="step", file=_Terminal())
    assert not isinstance(bar, LogLines)
    bar.close()
