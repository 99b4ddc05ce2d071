"""Run one function on several CPU processes joined by a real gloo process group, as DDP does.

    results = run_on_ranks(compute, 2, tmp_path, extra_argument)   # [rank 0's return, rank 1's return]

``compute(rank, world_size, *args)`` runs in each spawned process once the group exists
(``torch.distributed`` calls work inside it, ``utils.runtime.distributed`` sees the group); what
it returns (tensors, numbers, lists, dicts) comes back through a file per rank. The ranks meet
through a file in ``folder``, not a TCP port, so two runs never collide and nothing waits on a
port. ``compute`` must live at module level (spawned processes import it by name). A rank that
raises fails the call with that rank's traceback.
"""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, compute, world_size: int, folder: str, args: tuple) -> None:
    torch.set_num_threads(1)  # two ranks on a two-core machine
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        result = compute(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


def run_on_ranks(compute, world_size: int, folder, *args) -> list:
    """``[compute(rank, world_size, *args) for rank in range(world_size)]``, each in its own process."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    mp.spawn(_rank_main, args=(compute, world_size, folder, args), nprocs=world_size, join=True)
    return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False) for rank in range(world_size)]
