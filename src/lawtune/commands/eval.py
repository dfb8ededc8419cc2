"""`lawtune eval`: score a model (and adapter) on one file, or on a suite of files and modes (one HTML page)."""

from __future__ import annotations

from ..config import EvalRun
from ..evaluate import eval_file
from ..suite import run_suite


def run_eval(cfg: EvalRun) -> int:
    if cfg.eval.suite:
        report = run_suite(cfg)
        for name, s in report["runs"].items():
            print(f"{name}: {s['mode']} accuracy {s['accuracy']:.4f} on {s['n']} questions ({s['data']})")
        print(f"page -> {report['page']}")
        return 0
    s = eval_file(cfg)["summary"]
    print(f"{s['mode']}: accuracy {s['accuracy']:.4f} on {s['n']} questions (single {s['single']['accuracy']:.4f}, "
          f"multi {s['multi']['accuracy']:.4f}), invalid {s['invalid']}, forced {s['forced']}, "
          f"{s['questions_per_s']} questions/s -> {cfg.eval.output}")
    return 0
