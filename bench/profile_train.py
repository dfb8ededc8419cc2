#!/usr/bin/env python
"""`lawtune train` with torch.profiler over a few optimizer steps: where a step's time goes, per rank.

    python bench/profile_train.py --window 12:15 CONFIG key=value ...
    python bench/profile_train.py --window 12:14 --trace DIR CONFIG ...   # also DIR/trace-rank<R>.json.gz
    accelerate launch --config_file configs/accelerate/ddp.yaml bench/profile_train.py --window 12:15 CONFIG ...

Runs the real training command (lawtune.cli) with one extra Trainer callback. Each rank prints one JSON
line: wall time of the window, the time the GPU was busy (sum of kernel times on the compute stream's
device, communication kernels listed apart), and the costliest kernels and CPU operations.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _window_profiler(start: int, stop: int, trace_dir: str | None = None):
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class WindowProfiler(TrainerCallback):
        """Profiles optimizer steps start+1 ... stop (global_step counts finished steps)."""

        def __init__(self):
            self.prof = None
            self.began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == start and self.prof is None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.prof = profile(activities=activities)
                self.prof.__enter__()
                self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop and self.prof is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                wall = time.perf_counter() - self.began
                self.prof.__exit__(None, None, None)
                report(self.prof, wall, stop - start)
                if trace_dir:  # for chrome://tracing or Perfetto; .gz is written compressed
                    Path(trace_dir).mkdir(parents=True, exist_ok=True)
                    self.prof.export_chrome_trace(str(Path(trace_dir) / f"trace-rank{os.environ.get('RANK', '0')}.json.gz"))
                self.prof = None

    return WindowProfiler()


def report(prof, wall: float, steps: int) -> None:
    events = prof.key_averages()
    # device-side events, less the ranges that only mark a CPU region on the GPU timeline (module forwards)
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not getattr(e, "is_user_annotation", False)]
    comm = [e for e in kernels if "nccl" in e.key.lower()]
    busy = sum(e.self_device_time_total for e in kernels if e not in comm) / 1e6
    top = sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:12]
    cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    print("@@PROFILE " + json.dumps({
        "rank": int(os.environ.get("RANK", "0")), "steps": steps, "wall_s": round(wall, 3),
        "gpu_busy_s": round(busy, 3), "comm_kernels_s": round(sum(e.self_device_time_total for e in comm) / 1e6, 3),
        "top_kernels_ms": {e.key[:80]: round(e.self_device_time_total / 1e3, 1) for e in top},
        "top_cpu_self_ms": {e.key[:80]: [e.count, round(e.self_cpu_time_total / 1e3, 1)] for e in cpu},
    }), flush=True)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    window, trace_dir = "12:15", None
    while argv[:1] in (["--window"], ["--trace"]):
        if argv[0] == "--window":
            window = argv[1]
        else:
            trace_dir = argv[1]
        argv = argv[2:]
    start, stop = (int(x) for x in window.split(":"))
    from transformers import Trainer

    from lawtune.cli import main as lawtune_main

    original_init = Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(_window_profiler(start, stop, trace_dir))

    Trainer.__init__ = init
    return lawtune_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
