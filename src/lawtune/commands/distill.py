"""`lawtune distill`: sample reasoning per question and keep the traces that reach the gold answer."""

from __future__ import annotations

from ..config import DistillRun
from ..dist import is_main_process, leave, shutdown
from ..distill import distill
from ..errors import UsageError


def run_distill(cfg: DistillRun) -> int:
    try:
        r = distill(cfg)
    except UsageError:  # one line and exit code 2, on every rank that has it
        leave()
        raise
    if is_main_process():  # the other ranks of a multi-process run return no summary
        done = f"skipped {r['skipped_done']} already done; " if r["skipped_done"] else ""
        print(f"{done}kept traces for {r['questions_kept']} of {r['questions']} questions ({r['completions_kept']} of "
              f"{r['completions_sampled']} completions kept over all runs, pass@{r['samples']} {r['pass_at_k']:.3f}) "
              f"-> {cfg.distill.output}; report {r['report_file']}")
    shutdown()
    return 0
