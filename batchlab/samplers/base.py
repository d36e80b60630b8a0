"""The contract every batchlab batch sampler follows.

A batchlab sampler builds *global* batches (the batch the loss sees) for a whole
epoch from a seeded generator, then hands each rank its slice. Subclasses write
one method, :meth:`GlobalBatchSampler.plan_epoch`, which returns the epoch's global
batches as lists of dataset indices; this base class supplies the rest:

* ``seed`` and ``set_epoch(epoch)``: the plan of epoch ``e`` depends only on
  ``(seed, e)`` (a ``torch.Generator`` seeded from both, see :func:`epoch_seed`;
  never a global RNG),
  so every rank builds the same plan without talking to the others;
* an exact ``__len__``, identical on every rank (the plan is built, then counted);
* ``state_dict()`` / ``load_state_dict()``: resume mid-epoch with no batch repeated
  or skipped (the state records the epoch and how many batches were yielded);
* ``num_replicas`` / ``rank``: rank ``r`` gets the ``r``-th contiguous slice of each
  global batch, so the global batch the loss gathers is the one the sampler built.

Example
-------
>>> class Sequential(GlobalBatchSampler):
...     def __init__(self, n, batch_size, **kw):
...         super().__init__(batch_size=batch_size, **kw)
...         self.n = n
...     def plan_epoch(self, generator):
...         order = torch.randperm(self.n, generator=generator).tolist()
...         return [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
>>> sampler = Sequential(10, 4, seed=0)
>>> len(sampler), [len(b) for b in sampler]
(3, [4, 4, 2])
"""

from __future__ import annotations

import logging
from typing import Any, Iterator

import torch
from torch.utils.data import Sampler

from batchlab._checks import check_positive_int
from batchlab.errors import BatchlabInputError

logger = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of ``epoch``: distinct for every (seed, epoch) pair.

    ``seed + epoch`` (sentence-transformers' convention) makes seed 1 at epoch 1 replay
    seed 2 at epoch 0. Both are packed into 64 bits and mixed (splitmix64) down to 32
    bits, because torch's CPU generator (mt19937) keeps only the low 32 bits of its
    seed: the bare packing gave every seed the same epoch-0 plan.

    >>> len({epoch_seed(s, e) for s in range(50) for e in range(50)})
    2500
    """
    z = (((int(seed) & 0xFFFFFFFF) << 32) | (int(epoch) & 0xFFFFFFFF)) + 0x9E3779B97F4A7C15
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return (z ^ (z >> 32)) & 0xFFFFFFFF


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill ``num_replicas`` and ``rank`` from ``torch.distributed`` when it is initialised."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    check_positive_int("num_replicas", num_replicas)
    if not 0 <= rank < num_replicas:
        raise BatchlabInputError(f"rank must be in [0, {num_replicas}), got {rank}")
    return num_replicas, rank


class GlobalBatchSampler(Sampler[list[int]]):
    """Base class: seeded global batches, an exact length, resumption and the rank split.

    Parameters
    ----------
    batch_size:
        Size of the *global* batch (summed over ranks). Must be divisible by
        ``num_replicas`` so every rank gets the same share.
    drop_last:
        Drop a final global batch smaller than ``batch_size``.
    seed:
        Base seed; epoch ``e`` uses ``epoch_seed(seed, e)``.
    num_replicas, rank:
        Distributed split; default from ``torch.distributed`` when initialised, else 1 and 0.

    Subclasses name in ``RESUME_SETTINGS`` the attributes that shape their plan: they go
    into :meth:`state_dict`, and :meth:`load_state_dict` refuses a state saved with other
    values.
    """

    #: Attributes a saved state must match besides the seed, batch size and split.
    RESUME_SETTINGS: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        batch_size: int,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.drop_last = bool(drop_last)
        self.seed = int(seed)
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        if self.batch_size % self.num_replicas:
            raise BatchlabInputError(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by "
                f"num_replicas ({self.num_replicas}); use a multiple of {self.num_replicas}"
            )
        self.epoch = 0
        self._yielded = 0  # global batches already yielded in the current epoch
        self._plan_cache: tuple[int, list[list[int]]] | None = None

    # -- what subclasses write -------------------------------------------------
    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        """Return this epoch's global batches (lists of dataset indices).

        Must be deterministic given ``generator``. Batches may be shorter than
        ``batch_size`` only at the end; the base class applies ``drop_last``.
        """
        raise NotImplementedError

    # -- the contract ----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields (resets mid-epoch progress)."""
        if int(epoch) != self.epoch:
            self._yielded = 0
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches after ``drop_last`` (cached per epoch)."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
            plan = [list(map(int, b)) for b in self.plan_epoch(generator)]
            if self.drop_last:
                plan = [b for b in plan if len(b) == self.batch_size]
            plan = [b for b in plan if len(b) > 0]
            self._plan_cache = (self.epoch, plan)
        return self._plan_cache[1]

    def local_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (shares differ by at most one)."""
        if self.num_replicas == 1:
            return batch
        base, extra = divmod(len(batch), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return batch[start : start + base + (1 if self.rank < extra else 0)]

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_batches()
        start = self._yielded
        for i in range(start, len(plan)):
            self._yielded = i + 1
            yield self.local_slice(plan[i])
        # a finished epoch leaves nothing to resume: the next epoch starts from 0
        self._yielded = 0

    def __len__(self) -> int:
        return len(self.global_batches())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: epoch, batches yielded, seed, the split and ``RESUME_SETTINGS``."""
        return {
            "sampler": type(self).__name__,
            "epoch": self.epoch,
            "batches_yielded": self._yielded,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            **{key: getattr(self, key) for key in self.RESUME_SETTINGS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from a different configuration."""
        for key in ("sampler", "seed", "batch_size", "num_replicas", *self.RESUME_SETTINGS):
            mine = type(self).__name__ if key == "sampler" else getattr(self, key)
            if key in state and state[key] != mine:
                raise BatchlabInputError(
                    f"cannot resume: the saved state has {key}={state[key]!r} but this sampler has "
                    f"{key}={mine!r}; build the sampler with the same settings it was saved with"
                )
        self.epoch = int(state["epoch"])
        self._yielded = int(state["batches_yielded"])
        if not 0 <= self._yielded <= len(self):
            raise BatchlabInputError(
                f"cannot resume: the state says {self._yielded} batches were yielded but the epoch has {len(self)}"
            )


class ShardedBatchSampler(Sampler[list[int]]):
    """Split the global batches of any batch sampler across ranks.

    Wraps a sampler that yields *global* batches (any ``torch.utils.data`` batch
    sampler, seeded the same on every rank) and yields rank ``rank``'s contiguous
    slice of each, so the batch the loss gathers is the batch the sampler built.
    ``set_epoch``, ``state_dict`` and ``load_state_dict`` pass through to the wrapped
    sampler when it has them. batchlab's own samplers split by themselves
    (``num_replicas=``, ``rank=``); this wrapper is for everything else.

    >>> from torch.utils.data import BatchSampler, SequentialSampler
    >>> inner = BatchSampler(SequentialSampler(range(8)), batch_size=4, drop_last=False)
    >>> list(ShardedBatchSampler(inner, num_replicas=2, rank=1))
    [[2, 3], [6, 7]]
    """

    def __init__(self, batch_sampler, *, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.batch_sampler = batch_sampler
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            if len(batch) < self.num_replicas:
                raise BatchlabInputError(
                    f"a global batch of {len(batch)} example(s) cannot be split over {self.num_replicas} ranks; "
                    "use drop_last=True or a batch size that is a multiple of the world size"
                )
            base, extra = divmod(len(batch), self.num_replicas)
            start = self.rank * base + min(self.rank, extra)
            yield batch[start : start + base + (1 if self.rank < extra else 0)]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
        elif hasattr(getattr(self.batch_sampler, "sampler", None), "set_epoch"):
            self.batch_sampler.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        if not hasattr(self.batch_sampler, "state_dict"):
            raise BatchlabInputError(
                f"{type(self.batch_sampler).__name__} has no state_dict, so it cannot be resumed exactly"
            )
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not hasattr(self.batch_sampler, "load_state_dict"):
            raise BatchlabInputError(f"{type(self.batch_sampler).__name__} has no load_state_dict")
        self.batch_sampler.load_state_dict(state)
