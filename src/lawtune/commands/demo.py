"""`lawtune demo`: the whole pipeline offline on a CPU, on a tiny random model and the bundled questions."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import TrainRun
from ..config import replace as replace_config
from ..demo import demo_data_path, write_base_model
from ..errors import UsageError
from ..rundir import holds_a_run
from ..train import train


def run_demo(cfg: TrainRun, overwrite: bool = False) -> int:
    """Build the tiny base model, train on the bundled questions, print where everything went.

    ``cfg`` is demo.yaml's TrainRun (with the user's overrides); model.path and data.train default to the tiny
    model built here and the bundled questions, the output directory to outputs/demo. A folder that holds a run
    is replaced only with ``overwrite``, as `train` does."""
    start = time.time()
    output_dir = Path(cfg.train.output_dir or "outputs/demo")
    if holds_a_run(output_dir) and not overwrite:  # checked before the base model is written there
        raise UsageError(f"{output_dir}: holds a run already (checkpoints or final_model); pass --overwrite to "
                         f"replace it, or --output-dir DIR for another folder")
    data = Path(cfg.data.train) if cfg.data.train else demo_data_path()
    base = write_base_model(output_dir / "base_model", [data])
    print(f"[demo] tiny Qwen2 base model (random weights) -> {base}")
    cfg = replace_config(
        cfg,
        model=replace_config(cfg.model, path=cfg.model.path or str(base)),
        data=replace_config(cfg.data, train=str(data)),
        train=replace_config(cfg.train, output_dir=str(output_dir)),
    )
    result = train(cfg, overwrite=overwrite)
    elapsed = time.time() - start
    print(f"[demo] done in {elapsed:.0f} s: {result.steps} steps, final loss {result.final_loss:.4f}")
    if result.eval_history:
        last = result.eval_history[-1]
        print(f"[demo] held-out accuracy {last['eval_accuracy']:.3f} on {last['eval_n']} questions "
              f"(a tiny random model on 61 questions: this shows the pipeline runs, not legal skill)")
    print(f"[demo] base model:   {base}")
    print(f"[demo] final model:  {result.final_model}")
    print(f"[demo] split used:   {output_dir / 'data'}")
    print(f"[demo] metrics:      {output_dir / 'metrics.jsonl'}")
    return 0

