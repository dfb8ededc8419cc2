"""`lawtune train`: LoRA SFT from a YAML config."""

from __future__ import annotations

from ..config import TrainRun
from ..dist import main_print, shutdown
from ..rundir import RunFinished
from ..train import train


def run_train(cfg: TrainRun, resume: bool = False, overwrite: bool = False) -> int:
    try:
        result = train(cfg, resume=resume, overwrite=overwrite)
    except RunFinished as finished:
        main_print(finished)
        shutdown()
        return 0
    main_print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, adapter in {result.final_model}")
    shutdown()
    return 0
