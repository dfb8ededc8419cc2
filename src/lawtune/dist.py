"""Which process am I, how many are there: the one place that asks (torchrun / accelerate launch set RANK).

Before a process group exists (argument parsing, logging setup) the launcher's environment answers;
afterwards the process group does. Outside a distributed job there is one process, rank 0.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch

# How long a collective of ``join_launched_job``'s group waits for the slowest rank (distill: a batch of sampling).
JOB_TIMEOUT = timedelta(hours=2)


def _group_ready() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside a distributed job)."""
    return torch.distributed.get_rank() if _group_ready() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes of the running distributed job once its process group exists; 1 outside one (collective
    operations need the group, so the launcher's WORLD_SIZE alone does not count)."""
    return torch.distributed.get_world_size() if _group_ready() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes logs, reports and models."""
    return rank() == 0


def main_print(*args, **kwargs) -> None:
    """print on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


def sum_over_ranks(value: int) -> int:
    """value summed over the processes of a distributed job (the value itself in a single process)."""
    if world_size() == 1:
        return value
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


def cpu_group():
    """A process group for small collectives on CPU tensors, made by every rank at the same point: the job's own
    group where it is gloo, else a gloo group beside it (a CUDA tensor would make the CPU wait for the GPU to
    read its value back). None outside a distributed job."""
    if world_size() == 1:
        return None
    dist = torch.distributed
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` holds on some process of a distributed job (``flag`` itself in a single process); every
    rank must call this at the same point. ``group``: from ``cpu_group``."""
    if world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=group)
    return bool(value.item())


def gather_objects(obj) -> list:
    """obj from every rank, in rank order, on every rank ([obj] in a single process)."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def local_rank() -> int:
    """This process's rank on its node (the GPU it uses), from the launcher (0 outside a distributed job)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def join_launched_job() -> None:
    """Join the job torchrun / accelerate launch started this process in (nothing in a single process, or when a
    group exists already), for a command that does its own multi-process work (``distill``): a gloo group, as its
    collectives only move Python objects between CPUs; each rank's model goes on GPU ``local_rank()``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _group_ready():
        return
    if local_rank() < torch.cuda.device_count():  # else the model's device choice says what is missing
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend="gloo", timeout=JOB_TIMEOUT)


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a single process); every rank must call this at the same
    point."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def leave() -> None:
    """End this process's part in the job's process group at once, without waiting for the other ranks: for an
    error that ends the process (a process that exits with its gloo group alive can abort: see ``shutdown``)."""
    if _group_ready():
        torch.distributed.destroy_process_group()


def shutdown() -> None:
    """End the job's process group once every rank is done. Left to the interpreter's exit, gloo's threads are
    torn down while running, and a rank can abort ('terminate called without an active exception'; seen in the
    2-process CPU run of tests/test_bench.py after training had finished). Destroying the group only drops the
    registry's reference: a DDP model (its reducer) still holds the group, and a trainer in a reference cycle is freed
    by the interpreter's exit, so a collection first lets the group's threads end while the interpreter still runs
    (seen once more, after the barrier and the destroy alone, in the twenty-first session)."""
    if _group_ready():
        torch.distributed.barrier()
        gc.collect()
        torch.distributed.destroy_process_group()
        gc.collect()


def sharded_launch() -> str | None:
    """"FSDP" or "DeepSpeed" where ``accelerate launch`` started this process to shard the model that way (its
    config's distributed_type), else None."""
    for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() in ("1", "true", "yes"):
            return name
    return None
