#!/usr/bin/env python
"""Scaling of `lawtune train` from one GPU to several, through accelerate (DDP and FSDP2).

    python bench/multi_gpu.py --gpus 2                 # full-size 1.5B architecture, random weights
    python bench/multi_gpu.py --smoke                  # tiny model, 2 CPU processes (gloo), seconds

The same config and data run three ways: one process on one GPU, `accelerate launch` with
configs/accelerate/ddp.yaml and with configs/accelerate/fsdp2.yaml on N GPUs. `--runs independent` adds
N separate one-GPU jobs at the same time (no communication; their tokens/s summed): the ceiling that
sharing the machine leaves to DDP. Each run is the real
`lawtune train` command; its tokens/s is read from the run's own metrics.jsonl (trained tokens counted
on all ranks) over the optimizer steps after the warm-up. Prints one JSON line per run and the ratio
to one GPU. The per-device batch is the same in every run, so N GPUs do N times the work per step:
that is what "tokens/s on N GPUs vs one" measures (weak scaling, as data parallelism is used).

    --variant NAME=BASE,ITEM,...   one more run: BASE (single, independent, ddp or fsdp2) with items,
                                   each a launcher flag (--enable_cpu_affinity), an override
                                   (train.batch_tokens=12288) or an environment variable (env:X=Y)
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


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen) -> None:
    """Stop a launcher and every rank it started. torchrun starts each rank in a session of its own, so
    killing the launcher's process group left ranks running (and compiling) into the next run of a
    benchmark; SIGTERM lets the launcher shut its ranks down, SIGKILL then takes whatever is left."""
    tree = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run(jobs: list[tuple[list[str], dict, Path]], timeout: float | None = None) -> None:
    """Run commands at the same time, each into its log file; a failure or a timeout raises RuntimeError
    with the failed log's tail."""
    procs = []
    for cmd, env, log in jobs:
        fh = open(log, "w")
        procs.append((subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True),
                      fh, cmd, log))
    failed = None
    for proc, fh, cmd, log in procs:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc)
            code = f"timed out after {timeout:.0f} s"
        fh.close()
        if code != 0 and failed is None:
            failed = f"command failed ({code}): {' '.join(cmd)}\n{log.read_text(errors='replace')[-3000:]}"
    if failed:
        raise RuntimeError(failed)


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
    p.add_argument("--variant", action="append", default=[], metavar="NAME=BASE,ITEM,...")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    opts = p.parse_args(argv)
    work = Path(opts.work or tempfile.mkdtemp(prefix="lawtune-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    prep = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--prepare-only", "--work", str(work),
            "--records", str(opts.records)] + (["--smoke"] if opts.smoke else [])
    run([(prep, env, work / "prepare.log")])

    common = [opts.config, f"model.path={work / 'model'}", f"data.train={work / 'train.jsonl'}", "data.eval_fraction=0",
              f"train.max_steps={opts.steps}", f"train.logging_steps={1 if opts.smoke else 5}", "train.eval_steps=0", "train.save_steps=100000",
              "train.report_to=[none]", *opts.overrides]
    if opts.smoke:
        common += ["model.dtype=float32", "model.attn_implementation=sdpa", "train.optim=adamw_torch", "train.batch_tokens=1024", "data.max_length=1024",
                   "train.compile=false", "train.liger=false"]
    launch = {
        "single": [sys.executable, "-m", "lawtune", "train"],
        # one independent single-GPU job per GPU at the same time, no communication between them: how
        # much of the gap to N x one GPU comes from the processes sharing the machine rather than from DDP
        "independent": [sys.executable, "-m", "lawtune", "train"],
        "ddp": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/ddp.yaml"),
                "--num_processes", str(opts.gpus), "-m", "lawtune", "train"],
        "fsdp2": [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp2.yaml"),
                  "--num_processes", str(opts.gpus), "-m", "lawtune", "train"],
    }
    if opts.smoke:  # CPU: torchrun with gloo stands in for the GPU launchers
        launch["ddp"] = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "lawtune", "train"]
        launch.pop("fsdp2")
    extra = {name: ([], {}) for name in launch}  # overrides and environment of each run
    bases = {name: name for name in launch}
    for spec in opts.variant:
        name, _, items = spec.partition("=")
        base, *items = items.split(",")
        if base not in launch or not name or name in launch:
            p.error(f"--variant {spec!r}: expected NAME=BASE,... with BASE one of {sorted(launch)} and a new NAME")
        flags = [i for i in items if i.startswith("--")]
        # launcher flags go before "-m lawtune train"
        cut = launch[base].index("-m", 2) if base in ("ddp", "fsdp2") else len(launch[base])
        launch[name] = launch[base][:cut] + flags + launch[base][cut:]
        extra[name] = ([i for i in items if not i.startswith(("--", "env:"))],
                       dict(i[4:].split("=", 1) for i in items if i.startswith("env:")))
        bases[name] = base
    singles = {name for name, base in bases.items() if base == "single"}  # the baselines of the ratios
    results = {}
    for name in opts.runs.split(",") + [spec.partition("=")[0] for spec in opts.variant]:
        if name not in launch:
            continue
        out = work / f"run-{name}"
        overrides, env_items = extra[name]
        single = name in singles
        gpus = [g for g in env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(opts.gpus)))).split(",") if g]
        copies = (2 if opts.smoke else opts.gpus) if bases[name] == "independent" else 1
        outs = [out] if copies == 1 else [work / f"run-{name}{i}" for i in range(copies)]
        try:
            jobs = []
            for i, o in enumerate(outs):
                run_env = {**env, **env_items}
                # The one-GPU runs see one GPU each, as a user pins a single-GPU job; with two GPUs visible a
                # single-process run did not pass step 0 within 150-200 s on the 2-GPU machine (bench/README.md).
                if (single or copies > 1) and not opts.smoke:
                    run_env["CUDA_VISIBLE_DEVICES"] = gpus[i]
                jobs.append((launch[name] + common + overrides + [f"train.output_dir={o}"], run_env,
                             work / f"{o.name.removeprefix('run-')}.log"))
            run(jobs, opts.timeout)
        except RuntimeError as exc:
            print(json.dumps({"bench": "multi_gpu", "run": name, "error": str(exc)[-2000:]}), flush=True)
            if opts.smoke:
                raise
            continue
        if copies > 1:
            each = [throughput(o / "metrics.jsonl", opts.warmup) for o in outs]
            row = {"bench": "multi_gpu", "run": name, "processes": copies,
                   "tokens_per_s": round(sum(r["tokens_per_s"] for r in each), 1),
                   "each_tokens_per_s": [r["tokens_per_s"] for r in each], "each_tokens": [r["tokens"] for r in each]}
        else:
            row = {"bench": "multi_gpu", "run": name, "processes": 1 if single else (2 if opts.smoke else opts.gpus),
                   **throughput(out / "metrics.jsonl", opts.warmup)}
        # what each rank's full garbage collections cost during training (lawtune.train.callbacks.GcPauses logs it)
        row["gc"] = [line.split(" INFO ", 1)[-1] for o in outs
                     for line in (work / f"{o.name.removeprefix('run-')}.log").read_text(errors="replace").splitlines()
                     if "full Python garbage collections" in line]
        if not single:  # against every one-process run so far (a variant compares with its own baseline)
            row["ratio_to"] = {k: round(row["tokens_per_s"] / v["tokens_per_s"], 3) for k, v in results.items() if k in singles}
        results[name] = row
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
