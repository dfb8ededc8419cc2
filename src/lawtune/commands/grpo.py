"""`lawtune grpo`: GRPO on the exact-set reward (TRL), continuing an SFT adapter or a fresh LoRA."""

from __future__ import annotations

from ..config import GrpoRun
from ..dist import main_print, shutdown
from ..rundir import RunFinished
from ..train.grpo import grpo


def run_grpo(cfg: GrpoRun, resume: bool = False, overwrite: bool = False) -> int:
    try:
        r = grpo(cfg, resume=resume, overwrite=overwrite)
    except RunFinished as finished:
        main_print(finished)
        shutdown()
        return 0
    held = (f"held-out accuracy (reasoning) {r.start_eval_accuracy:.3f} at the start, best {r.best_eval_accuracy:.3f}, "
            f"final {r.final_eval_accuracy:.3f}; " if r.start_eval_accuracy is not None else "")
    main_print(f"done: {r.steps} steps, {held}adapter in {r.final_model}")
    shutdown()
    return 0
