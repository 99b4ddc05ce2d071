"""Thin helpers over torch.distributed (DDP launched by torchrun).

Everything here degrades to the single-process answer when no process group
exists, so the same code runs under ``python train.py`` and ``torchrun``.

Decisions inside a lock-step loop (skip this step, stop the run) must be taken by
all ranks together, or one rank waits forever in a collective the others never
enter: :func:`agree` sums small per-rank counts over a CPU (gloo) group, so the
answer is the same on every rank and asking never waits on the GPU.
"""
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_control_group = None  # gloo group for CPU-side agreement when the main backend is NCCL


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""
    distributed: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def launched_by_torchrun() -> DistInfo:
    """What torchrun's environment says about this process (no process group is joined)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed_mode(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (NCCL on CUDA, gloo on CPU).

    ``device`` is this process's device (``utils.runtime.device.resolve_device`` with the local rank).
    """
    global _control_group
    info = launched_by_torchrun()
    if not info.distributed:
        return info
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    # A generous timeout: rank 0 may spend minutes on COCO evaluation while the
    # others wait at the next collective.
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    _control_group = dist.new_group(backend="gloo") if use_cuda else None
    dist.barrier()
    return info


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (no-op without a process group)."""
    if not is_dist_avail_and_initialized():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def agree(*counts: float) -> list:
    """Sum of each count over all ranks, the same list on every rank; ``list(counts)`` alone.

    CPU tensors over gloo: no GPU stream synchronisation. Every rank must call it at the same point.
    """
    if not is_dist_avail_and_initialized():
        return [float(c) for c in counts]
    tensor = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    dist.all_reduce(tensor, group=_control_group)
    return tensor.tolist()


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank; ``[obj]`` without a process group."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj, group=_control_group)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank; ``obj`` itself without a process group."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=_control_group)
    return holder[0]


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def cleanup() -> None:
    global _control_group
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
    _control_group = None
