#!/usr/bin/env python
"""Time one all-reduce of a LoRA gradient's size between the GPUs of this machine (NCCL).

    torchrun --standalone --nproc_per_node 2 bench/allreduce.py            # 18.5 M fp32 values = the r16 LoRA of the 1.5B
    torchrun --standalone --nproc_per_node 2 bench/allreduce.py --numel 4e6

Tells whether the gradient exchange of a DDP step can cost more than a few milliseconds on the machine
at hand: rank 0 prints one JSON line with the median time of an all-reduce and the bus bandwidth it
implies (2 (n-1)/n x bytes / time, the figure nccl-tests report).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=float, default=18_464_768, help="values per all-reduce")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeat", type=int, default=20)
    opts = p.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    x = torch.ones(int(opts.numel), dtype=getattr(torch, opts.dtype), device=device)
    times = []
    for i in range(opts.repeat + 3):
        dist.barrier()
        if backend == "nccl":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_reduce(x)
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            import time
            t0 = time.perf_counter()
            dist.all_reduce(x)
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= 3:  # the first calls set up NCCL's channels
            times.append(ms)
    n = dist.get_world_size()
    if dist.get_rank() == 0:
        ms = statistics.median(times)
        size = x.numel() * x.element_size()
        print(json.dumps({"bench": "allreduce", "backend": backend, "world_size": n, "bytes": size,
                          # three significant digits: a slow link (gloo on a loaded CPU: 0.04 GB/s) is not 0.0
                          "median_ms": round(ms, 3), "bus_gb_s": float(f"{2 * (n - 1) / n * size / ms / 1e6:.3g}")}),
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
