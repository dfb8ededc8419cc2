#!/usr/bin/env python
"""Scaling of `lawtune train` from one GPU to several, through accelerate (DDP and FSDP2).

    python bench/multi_gpu.py --gpus 2                 # full-size 1.5B architecture, random weights
    python bench/multi_gpu.py --smoke                  # tiny model, 2 CPU processes (gloo), seconds

The same config and data run three ways: one process on one GPU, `accelerate launch` with
configs/accelerate/ddp.yaml and with configs/accelerate/fsdp2.yaml on N GPUs. Each run is the real
`lawtune train` command; its tokens/s is read from the run's own metrics.jsonl (trained tokens counted
on all ranks) over the optimizer steps after the warm-up. Prints one JSON line per run and the ratio
to one GPU. The per-device batch is the same in every run, so N GPUs do N times the work per step:
that is what "tokens/s on N GPUs vs one" measures (weak scaling, as data parallelism is used).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], env: dict, log: Path, timeout: float | None = None) -> None:
    """Run a command into a log file; a failure or a timeout raises RuntimeError with the log's tail."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
            proc.wait()
            code = f"timed out after {timeout:.0f} s"
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({code}): {' '.join(cmd)}\n{tail}")


def throughput(metrics: Path, warmup: int) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    logged = [r for r in rows if "loss" in r and "tokens_seen" in r]
    start = next(r for r in logged if r["step"] >= warmup)
    end = logged[-1]
    seconds = end["time"] - start["time"]
    tokens = end["tokens_seen"] - start["tokens_seen"]
    return {"steps_timed": end["step"] - start["step"], "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "final_loss": round(end["loss"], 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--config", default=str(ROOT / "configs" / "deepseek-r1-distill-qwen-1.5b_lora.yaml"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--records", type=int, default=20000)
    p.add_argument("--runs", default="single,ddp,fsdp2")
    p.add_argument("--work")
    p.add_argument("--timeout", type=float, default=420,
                   help="seconds per run, compilation on a fresh machine included (~100-200 s); a run that fails "
                        "or times out is reported")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    opts = p.parse_args(argv)
    work = Path(opts.work or tempfile.mkdtemp(prefix="lawtune-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    prep = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--prepare-only", "--work", str(work),
            "--records", str(opts.records)] + (["--smoke"] if opts.smoke else [])
    run(prep, env, work / "prepare.log")

    common = [opts.config, f"model.path={work / 'model'}", f"data.train={work / 'train.jsonl'}", "data.eval_fraction=0",
              f"train.max_steps={opts.steps}", f"train.logging_steps={1 if opts.smoke else 5}", "train.eval_steps=0", "train.save_steps=100000",
              "train.report_to=[none]", *opts.overrides]
    if opts.smoke:
        common += ["model.dtype=float32", "model.attn_implementation=sdpa", "train.optim=adamw_torch", "train.batch_tokens=1024", "data.max_length=1024",
                   "train.compile=false", "train.liger=false"]
    launch = {
        "single": [sys.executable, "-m", "lawtune", "train"],
        "ddp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
                "--num_processes", str(opts.gpus), "-m", "lawtune", "train"],
        "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"),
                  "--num_processes", str(opts.gpus), "-m", "lawtune", "train"],
    }
    if opts.smoke:  # CPU: torchrun with gloo stands in for the GPU launchers
        launch["ddp"] = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "lawtune", "train"]
        launch.pop("fsdp2")
    results = {}
    for name in opts.runs.split(","):
        if name not in launch:
            continue
        out = work / f"run-{name}"
        try:
            # The one-GPU run sees one GPU, as a user pins a single-GPU job; with two GPUs visible a
            # single-process run did not pass step 0 within 150-200 s on the 2-GPU machine (bench/README.md).
            run_env = {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]} \
                if name == "single" and not opts.smoke else env
            run(launch[name] + common + [f"train.output_dir={out}"], run_env, work / f"{name}.log", opts.timeout)
        except RuntimeError as exc:
            print(json.dumps({"bench": "multi_gpu", "run": name, "error": str(exc)[-2000:]}), flush=True)
            if opts.smoke:
                raise
            continue
        row = {"bench": "multi_gpu", "run": name, "processes": 1 if name == "single" else (2 if opts.smoke else opts.gpus),
               **throughput(out / "metrics.jsonl", opts.warmup)}
        if "single" in results:
            row["ratio_to_single"] = round(row["tokens_per_s"] / results["single"]["tokens_per_s"], 3)
        results[name] = row
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
