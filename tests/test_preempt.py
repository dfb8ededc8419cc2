"""The SIGTERM handler every long command installs: it records or interrupts, holds off while a batch is written, and
gives the previous handler back."""

import os
import signal

import pytest

from lawtune.preempt import Preempted, Sigterm


def _term_self(sigterm: Sigterm) -> None:
    """SIGTERM to this (the test) process, only while ``sigterm`` is the handler: anything else would end pytest."""
    assert getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is sigterm, "the handler is not installed"
    os.kill(os.getpid(), signal.SIGTERM)


def test_recording_handler_notes_the_signal_and_gives_the_previous_handler_back():
    def previous(signum, frame):
        raise AssertionError("the previous handler ran")

    before = signal.signal(signal.SIGTERM, previous)
    try:
        with Sigterm() as sigterm:
            assert not sigterm.received
            _term_self(sigterm)
            _term_self(sigterm)  # a second one (a launcher passing the scheduler's on) changes nothing
            assert sigterm.received
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, before)


def test_interrupting_handler_raises_at_once_except_while_holding():
    written = []
    with Sigterm(interrupt=True) as sigterm:
        with pytest.raises(Preempted):
            _term_self(sigterm)
            written.append("after the signal")  # never reached
    assert written == []

    with Sigterm(interrupt=True) as sigterm:
        with pytest.raises(Preempted):
            with sigterm.holding():
                written.append("line 1")
                _term_self(sigterm)
                written.append("line 2")  # the block completes: no torn batch
            written.append("after the block")  # never reached
    assert written == ["line 1", "line 2"]

    with Sigterm(interrupt=True) as sigterm:
        sigterm.disarm()
        _term_self(sigterm)  # recorded only
        assert sigterm.received


def test_nothing_is_installed_outside_the_main_thread():
    import threading

    seen = []

    def body():
        with Sigterm():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before]
