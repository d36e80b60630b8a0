"""The score matrices of sentence-transformers' in-batch losses, as batchlab InfoNCE problems.

sentence-transformers builds its losses from blocks of similarities that do not all
share a query vector: ``MultipleNegativesRankingLoss``'s ``doc_to_query`` row ``i`` scores
the *document* ``d_i`` against every query, and GISTEmbed's positive-positive block scores
``p_i`` against every positive, yet each row has ONE softmax over all of its blocks. Every
block ``b`` scores one of two row vectors (``u_i`` or ``v_i``, unit length) against unit keys
``K_b``. With the stacked row ``r_i = [u_i, v_i] / sqrt(2)`` and the keys padded to
``[K_b, 0]`` (blocks of ``u``) or ``[0, K_b]`` (blocks of ``v``), ``r_i . k = u_i . K_b / sqrt(2)``
(or ``v_i . K_b / sqrt(2)``), so one :func:`batchlab.losses.info_nce` call with scale
``sqrt(2) * s`` and a negative mask computes the joint softmax exactly, on batchlab's
reference, tiled or Triton path. Rows and keys stay unit vectors, as ``info_nce`` expects.

A row that uses only ``u`` (the default ``query_to_doc`` loss) skips the stacking.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from batchlab.errors import BatchlabInputError
from batchlab.losses import info_nce


def cosine_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit rows, as sentence-transformers' ``cos_sim`` normalises (``F.normalize(p=2, eps=1e-12)``)."""
    return F.normalize(x, p=2, dim=-1)


def world_and_rank() -> tuple[int, int]:
    """(world size, rank) of the default group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class Gathered:
    """This rank's rows against every rank's columns (sentence-transformers' ``gather_across_devices``).

    ``gather(x)`` concatenates every rank's ``x`` in rank order with batchlab's
    gather-with-gradient (:func:`batchlab.losses.distributed.strategies.gather_with_grad`,
    whose backward sums every rank's gradient, as ``torch.distributed.nn.all_gather`` does
    in sentence-transformers); ``offset`` is this rank's first global row. Without a
    process group (or with ``enabled=False``) it is the identity with offset 0.
    """

    def __init__(self, local_rows: int, device: torch.device, *, enabled: bool) -> None:
        world, rank = world_and_rank()
        self.active = bool(enabled) and world > 1
        self.sizes = [local_rows]
        self.offset = 0
        if self.active:
            from batchlab.losses.distributed.strategies import gather_sizes

            self.sizes = gather_sizes(local_rows, device)
            self.offset = sum(self.sizes[:rank])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        from batchlab.losses.distributed.strategies import gather_with_grad

        return gather_with_grad(x, sizes=self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass
class JointRows:
    """A joint softmax over key blocks scored by up to two row vectors (see the module docstring).

    Add blocks with :meth:`add`, then :meth:`loss`. The positive of row ``i`` is column
    ``targets[i]`` of the first block (its index in the concatenated keys).
    """

    u: torch.Tensor  # (n, d) unit rows
    v: torch.Tensor | None = None  # (n, d) unit rows, the second row vector
    blocks: list[tuple[str, torch.Tensor, torch.Tensor | None]] = field(default_factory=list)

    def add(self, side: str, keys: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Keys (m, d) scored by ``side`` ("u" or "v"); ``mask`` (n, m) True removes a score."""
        if side == "v" and self.v is None:
            raise BatchlabInputError("a block scored by v needs JointRows(u, v)")
        self.blocks.append((side, keys, mask))

    def loss(self, scale: float, targets: torch.Tensor, *, impl: str, reduction: str = "mean") -> torch.Tensor:
        two_sided = any(side == "v" for side, _, _ in self.blocks)
        keys, masks = [], []
        for side, k, mask in self.blocks:
            if two_sided:
                zeros = torch.zeros_like(k)
                k = torch.cat([k, zeros] if side == "u" else [zeros, k], dim=1)
            keys.append(k)
            masks.append(mask if mask is not None else torch.zeros(
                self.u.shape[0], k.shape[0], dtype=torch.bool, device=k.device))
        rows, s = self.u, float(scale)
        if two_sided:
            rows = torch.cat([self.u, self.v], dim=1) / math.sqrt(2.0)
            s *= math.sqrt(2.0)
        neg_mask = None
        if any(m is not None for _, _, m in self.blocks):
            neg_mask = torch.cat(masks, dim=1)
        return info_nce(rows, torch.cat(keys), s, symmetric=False, targets=targets, neg_mask=neg_mask,
                        reduction=reduction, impl=impl)
