"""torch.distributed under torchrun: NCCL on GPUs, gloo on CPUs. Without torchrun every helper
is the single-process case (rank 0 of 1)."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def joined() -> bool:
    """Whether this process is in a process group (``init`` under torchrun)."""
    return dist.is_initialized()


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, timeout: timedelta | None = None) -> None:
    """Join the process group torchrun describes (once). On GPUs, NCCL carries CUDA tensors
    (gradients, the loss) and gloo CPU ones: the stop-signal flag every process agrees on each
    step is a CPU tensor, which NCCL alone refuses, and a CUDA one would wait for the GPU.
    ``timeout``: how long joining and each collective may wait for the slowest process
    (torch's default: 30 minutes for gloo, 10 for NCCL)."""
    if world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout,
                                    device_id=device if device.index is not None else None)
        else:
            dist.init_process_group("gloo", timeout=timeout)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (any picklable object) on every process; itself without torchrun."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))  # over gloo
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` (any picklable object) in rank order on rank 0, None on the others
    (over gloo, as ``broadcast``); ``[obj]`` without torchrun."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over all processes (itself without torchrun)."""
    if dist.is_initialized():
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true in any process (itself without torchrun). It travels as a CPU
    tensor, which gloo carries without waiting for the GPU."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag))
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value > 0)
