"""What a job does when its scheduler ends it: SIGTERM (Slurm preemption or time limit, a Kubernetes eviction,
torchrun passing either on) is caught, the work in progress is saved, and the command exits 143 (128 + SIGTERM,
what a shell reports for a process SIGTERM ended) with a line saying how to go on.

Two ways to stop, by what a command's unit of work costs:

* training finishes the optimizer step it is in and saves a checkpoint: the handler only records the signal
  (``Sigterm``), and the training loop looks at it after each step (``train/callbacks.py``);
* ``distill`` and ``predict`` write each finished batch at once, so the batch being generated is dropped: the
  handler raises ``Preempted`` at once (``Sigterm(interrupt=True)``), except while a batch is being written
  (``holding``), which is completed first. A rerun skips what was written. ``distill`` is cut short only while it
  loads its model or samples (``cutting``); elsewhere (exchanging a round's samples between processes, writing
  them) a SIGTERM is only recorded, and every process, told at the round's exchange, stops at the end of the round.

The scheduler's kill follows after its grace period; README.md ("A job that survives preemption") says how to ask
for one long enough.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("lawtune")

EXIT_PREEMPTED = 143


class Preempted(Exception):
    """A command stopped on SIGTERM after saving what it had; the message says what it saved and how to go on."""


class Sigterm:
    """Catches SIGTERM while it is entered (a context manager; the previous handler comes back on leaving).

    ``received`` says whether one came. With ``interrupt`` the handler raises ``Preempted`` in the main thread,
    at once or, inside ``holding()``, when the block ends. Later SIGTERMs change nothing (a launcher passes the
    scheduler's on, so each process may get two). Outside the main thread nothing is installed: Python runs signal
    handlers there only."""

    def __init__(self, interrupt: bool = False, what: str = "stopping"):
        self.interrupt = interrupt
        self.what = what
        self.received = False
        self.depth = 0
        self.pending = False
        self.previous: Any = None
        self.installed = False

    def __enter__(self) -> Sigterm:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.handle)
            self.installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self.installed:
            # None: the previous handler was not set from Python; the default is what a process starts with
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
            self.installed = False

    def handle(self, signum, frame) -> None:
        if self.received:
            return
        self.received = True
        log.warning("SIGTERM: %s", self.what)
        if self.interrupt:
            if self.depth:
                self.pending = True
            else:
                raise Preempted()

    def disarm(self) -> None:
        """From here on SIGTERM is only recorded: what is left is short and must complete."""
        self.interrupt = False

    @contextmanager
    def cutting(self) -> Iterator[None]:
        """A block that SIGTERM ends at once with ``Preempted`` (raised on entry where one came before), for a
        handler made without ``interrupt``: outside such blocks a SIGTERM is only recorded (``received``)."""
        if self.received:
            raise Preempted()
        self.interrupt = True
        try:
            yield
        finally:
            self.interrupt = False

    @contextmanager
    def holding(self) -> Iterator[None]:
        """A block that SIGTERM does not cut short (writing a batch's lines): ``Preempted`` comes after it."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.pending and not self.depth:
            self.pending = False
            raise Preempted()
