"""Progress bars of every long command: tqdm on a terminal, a readable line every few percent in a log.

tqdm redraws its bar with carriage returns; written to a file or a pipe (a job's log, CI) every redraw stays in
the file, and a run of thousands of steps leaves one line of megabytes. Where the output is not a terminal,
``progress`` gives a tqdm whose ``display`` (the method tqdm documents for subclasses to override) writes one
whole line each time the count passes another ``LOG_EVERY_PERCENT``, and at the end.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_EVERY_PERCENT = 5


class LogLines(tqdm):
    """tqdm for a log file: a full line (no carriage return) every ``LOG_EVERY_PERCENT`` percent."""

    def __init__(self, *args, **kwargs):
        self._next_percent, self._written = 0.0, None
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its line: nothing was drawn over
            return True
        percent = 100.0 * self.n / self.total if self.total else 0.0
        closing = self.disable  # tqdm's close() sets it before its last display
        if self.n == self._written or (not closing and percent < self._next_percent):
            return True
        self._next_percent = (percent // LOG_EVERY_PERCENT + 1) * LOG_EVERY_PERCENT
        # Each line ends when the next begins: close() writes the newline after the last one.
        self.fp.write(("" if self._written is None else "\n") + self.__str__())
        self.fp.flush()
        self._written = self.n
        return True


def progress(total: int, desc: str, unit: str, initial: int = 0, disable: bool = False, file=None) -> tqdm:
    """A progress bar on stderr (or ``file``): a live bar on a terminal, log lines elsewhere."""
    file = file or sys.stderr
    if hasattr(file, "isatty") and file.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=file)
    # mininterval 0: every update reaches display(), which decides by the percentage alone
    return LogLines(total=total, initial=initial, desc=desc, unit=unit, disable=disable, file=file, mininterval=0,
                    ncols=100, ascii=True)
