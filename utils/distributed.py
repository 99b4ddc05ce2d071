"""Thin helpers over torch.distributed (DDP launched by torchrun).

Everything here degrades to the single-process answer when no process group
exists, so the same code runs under ``python train.py`` and ``torchrun``.
"""
import datetime
import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed_mode(args) -> None:
    """Join the process group that torchrun describes in the environment.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.local_rank``
    and, on CUDA, ``args.device`` to this process's own GPU. The backend is NCCL
    for CUDA and gloo for CPU, so a CPU-only machine can run DDP too.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        args.distributed, args.rank, args.world_size, args.local_rank = False, 0, 1, 0
        return
    args.rank = int(os.environ["RANK"])
    args.world_size = int(os.environ["WORLD_SIZE"])
    args.local_rank = int(os.environ.get("LOCAL_RANK", 0))
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.local_rank)
        args.device = f"cuda:{args.local_rank}"
    backend = "nccl" if use_cuda else "gloo"
    # A generous timeout: rank 0 may spend minutes on COCO evaluation while the
    # others wait at the next collective.
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=60))
    dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (no-op without a process group). Differentiable is not needed."""
    if not is_dist_avail_and_initialized():
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor)
    return tensor / get_world_size()


def all_gather_object(obj) -> list:
    """Gather a picklable object from every rank; ``[obj]`` without a process group."""
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s object on every rank; ``obj`` itself without a process group."""
    if not is_dist_avail_and_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def cleanup() -> None:
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()
