"""Batches in which each anchor's mined hard negatives are themselves anchors.

If anchor ``a``'s mined negatives ``n1, n2, ...`` sit in the same batch as anchors,
the in-batch negatives of a contrastive loss include them: hard negatives for free,
with no extra encoder passes (the idea behind NGAME's and B3++'s batch-pooled
negatives). One anchor's neighbourhood must not fill the batch, though, or the batch
collapses onto one topic (and its false negatives): ``max_neighbourhood_fraction``
caps it.

Example
-------
>>> import torch
>>> negative_ids = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
>>> sampler = HardNegativeBatchSampler(negative_ids, batch_size=3, max_neighbourhood_fraction=1.0)
>>> sorted(sorted(b) for b in sampler)
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch

from batchlab._checks import check_positive_int, check_real
from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import GlobalBatchSampler

logger = logging.getLogger(__name__)


def _as_negative_ids(negative_ids: Any) -> torch.Tensor:
    """``negative_ids`` (tensor, array, or an object with ``.negative_ids``) as a checked CPU int64 tensor."""
    ids = getattr(negative_ids, "negative_ids", negative_ids)
    if isinstance(ids, np.ndarray):
        ids = torch.from_numpy(ids)
    if not isinstance(ids, torch.Tensor):
        raise BatchlabInputError(
            f"negative_ids must be a (N, m) integer tensor or array (or an object with .negative_ids), "
            f"got {type(negative_ids).__name__}"
        )
    if ids.dim() != 2:
        raise BatchlabInputError(
            f"negative_ids must have shape (N, m): row i lists anchor i's negatives, -1 for padding; "
            f"got shape {tuple(ids.shape)}"
        )
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise BatchlabInputError(f"negative_ids must hold integer ids, got dtype {ids.dtype}")
    if ids.shape[0] == 0:
        raise BatchlabInputError("negative_ids is empty (0 anchors); a sampler needs at least one example")
    ids = ids.detach().cpu().long()
    n = ids.shape[0]
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= n:
            raise BatchlabInputError(
                f"negative_ids holds ids in [{lo}, {hi}] but must lie in [-1, {n}) (-1 = padding): the "
                "negatives must be anchors of the same dataset (row i = example i). If you mined queries "
                "against a separate corpus, map corpus ids to dataset indices first"
            )
    return ids


class HardNegativeBatchSampler(GlobalBatchSampler):
    """Pack each anchor with its mined negatives, so they meet in one batch.

    Each epoch, anchors are visited in a random order. An anchor not yet placed opens
    a *neighbourhood*: itself followed by its not-yet-placed negatives in mined order
    (hardest first; with ``hops > 1`` then theirs, breadth-first), at most ``max(1, floor(max_neighbourhood_fraction * batch_size))``
    members and never more than the room left in the current batch. Neighbourhoods are
    appended to the batch until it is full. Every example is placed exactly once per
    epoch; negatives that were already placed elsewhere are skipped, so not every
    (anchor, negative) pair meets: :func:`pair_colocation_rate` measures how many do.

    Parameters
    ----------
    negative_ids:
        ``(N, m)`` integer ids (tensor or array), row ``i`` = negatives of example ``i``,
        ``-1`` for padding (as returned by ``mine_hard_negatives``); or any object with a
        ``.negative_ids`` attribute. Ids must be dataset indices in ``[0, N)``; an
        anchor listed among its own negatives is ignored.
    batch_size:
        Global batch size.
    max_neighbourhood_fraction:
        Cap on the share of a batch one neighbourhood (anchor + its negatives) may
        fill, in ``(0, 1]``. ``1 / batch_size`` or less gives random batches.
    hops:
        1: a neighbourhood is the anchor and its own negatives. 2 or more: it grows
        breadth-first to the negatives' negatives (and so on) until the cap, which
        keeps more (anchor, negative) pairs together at the price of more topical,
        and so more false-negative-prone, batches.
    drop_last, seed, num_replicas, rank:
        As in :class:`~batchlab.samplers.base.GlobalBatchSampler`. Neighbourhoods are
        contiguous in the global batch, so the rank split mostly keeps each on one rank.

    Notes
    -----
    Plan building is a Python loop over anchors and their ``m`` negatives, O(N m)
    (about a second per million anchor-negative entries).

    Example
    -------
    >>> ids = torch.tensor([[1], [0], [3], [2]])
    >>> sampler = HardNegativeBatchSampler(ids, batch_size=2, max_neighbourhood_fraction=1.0, seed=0)
    >>> sorted(sorted(b) for b in sampler)
    [[0, 1], [2, 3]]
    """

    def __init__(
        self,
        negative_ids: Any,
        batch_size: int,
        *,
        max_neighbourhood_fraction: float = 0.25,
        hops: int = 1,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, drop_last=drop_last, seed=seed, num_replicas=num_replicas, rank=rank)
        self.negative_ids = _as_negative_ids(negative_ids)
        self.num_examples = self.negative_ids.shape[0]
        if self.batch_size > self.num_examples:
            raise BatchlabInputError(
                f"batch_size ({self.batch_size}) is larger than the number of examples ({self.num_examples}); "
                f"use batch_size <= {self.num_examples}"
            )
        self.check_num_examples(self.num_examples)
        frac = check_real("max_neighbourhood_fraction", max_neighbourhood_fraction)
        if not 0.0 < frac <= 1.0:
            raise BatchlabInputError(f"max_neighbourhood_fraction must be in (0, 1], got {max_neighbourhood_fraction!r}")
        self.max_neighbourhood_fraction = frac
        self.neighbourhood_cap = max(1, int(frac * self.batch_size))
        self.hops = check_positive_int("hops", hops)
        self._rows = self.negative_ids.numpy()
        self._fingerprint: str | None = None

    def plan_groups(self, generator: torch.Generator) -> list[list[int]]:
        """The epoch's neighbourhoods (anchor first, then its negatives) in packing order.

        :meth:`plan_epoch` concatenates them into batches; a neighbourhood is cut short
        where the current batch has no more room.
        """
        rows = self._rows
        placed = np.zeros(self.num_examples, dtype=bool)
        groups: list[list[int]] = []
        room = self.batch_size
        for a in torch.randperm(self.num_examples, generator=generator).tolist():
            if placed[a]:
                continue
            cap = min(self.neighbourhood_cap, room)
            placed[a] = True
            group = [a]
            frontier = [a]
            # breadth-first over the mined-negative graph, hop by hop, until the cap
            for _ in range(self.hops):
                if len(group) >= cap:
                    break
                grown = len(group)
                for u in frontier:
                    for j in rows[u].tolist():
                        if j >= 0 and not placed[j]:
                            placed[j] = True
                            group.append(j)
                            if len(group) == cap:
                                break
                    if len(group) == cap:
                        break
                frontier = group[grown:]
            groups.append(group)
            room -= len(group)
            if room == 0:
                room = self.batch_size
        return groups

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        batches: list[list[int]] = [[]]
        for group in self.plan_groups(generator):
            if len(batches[-1]) == self.batch_size:
                batches.append([])
            batches[-1].extend(group)  # plan_groups never overfills a batch
        return batches

    def negatives_fingerprint(self, epoch: int | None = None) -> str:
        """A short content hash of ``negative_ids`` (every epoch's plan depends on them), computed once."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha1(np.ascontiguousarray(self._rows).tobytes()).hexdigest()[:16]
        return self._fingerprint

    RESUME_SETTINGS = ("max_neighbourhood_fraction", "hops")
    RESUME_DATA = {"negatives": ("negatives_fingerprint", "negative_ids")}


def pair_colocation_rate(batches: list[list[int]], negative_ids: Any) -> float:
    """Share of valid (anchor, negative) pairs whose two ends land in the same batch.

    Random batches of size ``B`` over ``N`` examples give about ``(B - 1) / (N - 1)``.

    Parameters
    ----------
    batches:
        Global batches (lists of dataset indices) covering each example at most once.
    negative_ids:
        ``(N, m)`` ids with ``-1`` padding (or an object with ``.negative_ids``).

    Example
    -------
    >>> pair_colocation_rate([[0, 1], [2, 3]], torch.tensor([[1], [2], [-1], [2]]))
    0.6666666666666666
    """
    ids = _as_negative_ids(negative_ids)
    batch_of = torch.full((ids.shape[0],), -1, dtype=torch.long)
    for b, batch in enumerate(batches):
        batch_of[torch.as_tensor(batch, dtype=torch.long)] = b
    anchors = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    valid = (ids >= 0) & (ids != anchors)
    same = batch_of[anchors[valid]] == batch_of[ids[valid]]
    same &= batch_of[anchors[valid]] >= 0
    return float(same.double().mean()) if valid.any() else 0.0
