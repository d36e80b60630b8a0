"""Run a function on several gloo ranks (CPU processes) and collect what each returned.

>>> per_rank = run_on_ranks(my_body, "float64", world=2)   # doctest: +SKIP

``body(rank, world, *args)`` must be a module-level function (the ranks are spawned
processes, which import it by name); whatever it returns is saved by each rank and
returned here as a list indexed by rank. Every rank pins torch to one thread and
meets the others at a barrier before ``destroy_process_group`` (without it, a rank that
leaves first can hang the other in gloo).
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank, world, init_file, out_dir, body, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = body(rank, world, *args)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_on_ranks(body, *args, world: int = 2) -> list:
    """``[body(r, world, *args) for r in range(world)]``, each on its own gloo rank."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(world, os.path.join(tmp, "init"), tmp, body, args), nprocs=world, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
