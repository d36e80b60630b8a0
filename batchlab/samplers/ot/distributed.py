"""Global-batch OT under torch.distributed: gather, solve once, each rank gets its pairs.

Per-GPU OT couples only the examples on one GPU (torchcfm#19); the OT batch is then
the local batch, and the coupling gets worse as GPUs are added at a fixed global
batch. :func:`couple_global` gathers both batches from every rank, solves the
global problem once (on rank 0, then broadcast, or identically on every rank) and
hands every rank the partners of its own ``x0`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from batchlab._checks import check_choice
from batchlab.errors import BatchlabInputError
from batchlab.samplers.ot.couple import couple


@dataclass
class GlobalPairs:
    """What one rank gets back from :func:`couple_global`.

    Attributes
    ----------
    x0 : Tensor (n_local, ...)   this rank's x0, unchanged (gradients kept).
    x1 : Tensor (n_local, ...)   the partners of those rows, gathered from any rank.
    partner : LongTensor (n_local,)   global row of each partner in the gathered x1.
    perm : LongTensor (N,)   the global permutation (same on every rank).
    c1 : Tensor or None   the partners' conditions, if conditions were given.
    """

    x0: torch.Tensor
    x1: torch.Tensor
    partner: torch.Tensor
    perm: torch.Tensor
    c1: torch.Tensor | None = None


def _gather(x: torch.Tensor, world: int, group) -> torch.Tensor:
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, 0)


def couple_global(
    x0: torch.Tensor,
    x1: torch.Tensor,
    method: str = "exact",
    *,
    group: Any = None,
    solve_on: str = "rank0",
    condition: tuple[torch.Tensor, torch.Tensor] | None = None,
    **couple_kwargs: Any,
) -> GlobalPairs:
    """Couple the global batch and return this rank's pairs.

    Parameters
    ----------
    x0, x1 : Tensor (n_local, ...)
        This rank's share of each batch; every rank must hold the same ``n_local``.
        The global batch is the concatenation in rank order.
    method, couple_kwargs
        As for :func:`~batchlab.samplers.couple` (``generator`` must be seeded alike
        on every rank for ``solve_on="all"`` with ``partial``/``knn``).
    group : ProcessGroup, optional
        Default: the world.
    solve_on : {"rank0", "all"}
        ``"rank0"`` solves on rank 0 and broadcasts the permutation (one solve, the
        answer is identical everywhere); ``"all"`` solves on every rank (no broadcast;
        identical because every solver here is deterministic on identical inputs).
    condition : (c0, c1), optional
        Local conditions, gathered like the batches.

    Returns
    -------
    :class:`GlobalPairs`. Without an initialised process group this is plain
    :func:`couple` on the local batch.

    Examples
    --------
    >>> out = couple_global(torch.randn(8, 2), torch.randn(8, 2))  # no process group: local
    >>> out.x1.shape
    torch.Size([8, 2])
    """
    import torch.distributed as dist

    check_choice("solve_on", solve_on, ("rank0", "all"))
    if not (dist.is_available() and dist.is_initialized()):
        perm = couple(x0, x1, method, condition=condition, **couple_kwargs)
        c1 = condition[1][perm.to(condition[1].device)] if condition is not None else None
        return GlobalPairs(x0, x1[perm], perm, perm, c1)
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    n = x0.shape[0]
    if x1.shape[0] != n:
        raise BatchlabInputError(f"x0 and x1 must have the same local batch size, got {n} and {x1.shape[0]}")
    sizes = _gather(torch.tensor([n], device=x0.device), world, group)
    if bool((sizes != n).any()):
        raise BatchlabInputError(
            f"every rank must hold the same local batch size for the global coupling, got {sizes.tolist()}"
        )
    g0 = _gather(x0.detach(), world, group)
    g1 = _gather(x1.detach(), world, group)
    gcond = None
    if condition is not None:
        gcond = (_gather(condition[0], world, group), _gather(condition[1], world, group))
    if solve_on == "all":
        perm = couple(g0, g1, method, condition=gcond, **couple_kwargs)
    else:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        if rank == 0:
            perm = couple(g0, g1, method, condition=gcond, **couple_kwargs).contiguous()
        else:
            perm = torch.empty(world * n, dtype=torch.long, device=x0.device)
        dist.broadcast(perm, src=src, group=group)
    partner = perm[rank * n:(rank + 1) * n]
    c1 = gcond[1][partner.to(gcond[1].device)] if gcond is not None else None
    return GlobalPairs(x0, g1[partner], partner, perm, c1)
