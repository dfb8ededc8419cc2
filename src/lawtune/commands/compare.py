"""`lawtune compare`: two eval reports side by side (flips, McNemar, bootstrap CIs) and an HTML page."""

from __future__ import annotations

from pathlib import Path

from ..compare import compare_reports, format_comparison, load_report, write_html
from ..config import CompareRun
from ..errors import UsageError


def run_compare(cfg: CompareRun) -> int:
    c = cfg.compare
    if Path(c.html).is_dir():  # checked before the work, which is then not lost
        raise UsageError(f"compare.html: {c.html} is a directory; give a file (e.g. {Path(c.html) / 'compare.html'})")
    result = compare_reports(load_report(c.report_a), load_report(c.report_b))
    print(format_comparison(result, c.report_a, c.report_b))
    write_html(result, c.report_a, c.report_b, c.html)
    print(f"HTML report -> {c.html}")
    return 0
