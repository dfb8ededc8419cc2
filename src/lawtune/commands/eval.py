"""`lawtune eval`: score a model (and adapter) on one file, or on a suite of files and modes (one HTML page)."""

from __future__ import annotations

from ..api_eval import eval_api_file
from ..config import EvalRun
from ..evaluate import eval_file
from ..suite import run_suite


def headline(s: dict) -> str:
    """The numbers a report leads with: accuracy (the majority answer's, with K samples) on n questions, avg@K,
    maj@K and pass@K where sampled, LawBench's score and abstention rate on a LawBench file."""
    k = s.get("samples")
    parts = [f"accuracy {s['accuracy']:.4f} on {s['n']} questions"]
    if k:
        parts.append(f"avg@{k} {s[f'avg@{k}']:.4f}, maj@{k} {s[f'maj@{k}']:.4f}, pass@{k} {s[f'pass@{k}']:.4f}")
    if "lawbench_score" in s:
        parts.append(f"lawbench_score {s['lawbench_score']:.4f}, abstention {s['abstention_rate']:.4f}")
    return ", ".join(parts)


def run_eval(cfg: EvalRun) -> int:
    if cfg.eval.suite:
        report = run_suite(cfg)
        for name, s in report["runs"].items():
            print(f"{name}: {s['mode']} {headline(s)} ({s['data']})")
        print(f"page -> {report['page']}")
        return 0
    s = (eval_api_file(cfg) if cfg.eval.api_url else eval_file(cfg))["summary"]
    print(f"{s['mode']}: {headline(s)} (single {s['single']['accuracy']:.4f}, multi {s['multi']['accuracy']:.4f}), "
          f"invalid {s['invalid']}, forced {s['forced']}, {s['questions_per_s']} questions/s -> {cfg.eval.output}")
    return 0
