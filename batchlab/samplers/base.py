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
* every ``iter()`` starts a clean pass over the epoch (an abandoned iterator shifts
  nothing), except the first pass after ``load_state_dict``, which resumes;
* ``state_dict()`` / ``load_state_dict()``: resume mid-epoch with no batch repeated
  or skipped. The state records the epoch and the batches done; ``state_dict(consumed=k)``
  counts the ``k`` batches the training loop *received*, not the ones a ``DataLoader``'s
  workers prefetched. ``load_state_dict`` refuses a state whose settings or data hashes
  (``RESUME_SETTINGS``, ``RESUME_DATA``) differ, and, as a backstop for what a sampler
  does not record (a dataset size left out of ``RESUME_SETTINGS``), one whose epoch plan
  hashes differently (``plan`` in the state);
* ``num_replicas`` / ``rank``: rank ``r`` gets the ``r``-th contiguous slice of each
  global batch, so the global batch the loss gathers is the one the sampler built.
  Every rank gets an equal, non-empty share of every batch; sizes for which that is
  impossible are refused (:meth:`GlobalBatchSampler.check_num_examples`).

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

import hashlib
import itertools
import logging
import operator
import warnings
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, Sampler

from batchlab._checks import check_positive_int
from batchlab.errors import BatchlabInputError, StaleArtifactError

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


_SEED_LIMIT = 2**32  # epoch_seed keeps 32 bits of the seed and of the epoch


def _check_index(name: str, value: Any, *, maximum: int | None = None) -> int:
    """``value`` as a non-negative int (numpy ints welcome; bools, floats and strings refused)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise BatchlabInputError(f"{name} must be a non-negative integer, got {value!r}") from None
    if index < 0 or (maximum is not None and index >= maximum):
        bound = "" if maximum is None else f" and below {maximum}"
        raise BatchlabInputError(f"{name} must be a non-negative integer{bound}, got {index}")
    return index


def resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """Fill ``num_replicas`` and ``rank`` from ``torch.distributed`` when it is initialised."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    check_positive_int("num_replicas", num_replicas)
    if rank is None:
        if num_replicas > 1 and not initialised:
            # defaulting to rank 0 would give every process rank 0's batches
            raise BatchlabInputError(
                f"num_replicas={num_replicas} was given without rank, and torch.distributed is not initialised "
                f"to tell this process's rank; pass rank= (0 to {num_replicas - 1})"
            )
        rank = dist.get_rank() if initialised else 0
    rank = _check_index("rank", rank)
    if rank >= num_replicas:
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
        Base seed, an integer in ``[0, 2**32)``; epoch ``e`` uses ``epoch_seed(seed, e)``.
    num_replicas, rank:
        Distributed split; default from ``torch.distributed`` when initialised, else 1 and 0.

    Notes
    -----
    Passes and positions. Every ``iter(sampler)`` starts a clean pass over the current
    epoch, from its first batch, except the first pass after :meth:`load_state_dict`,
    which starts where the saved state stopped. An abandoned iterator never shifts a
    later pass. The sampler counts the batches it has handed out in the current pass;
    ``state_dict(consumed=k)`` records ``k`` instead, the batches the training loop has
    *received* from this pass (a ``DataLoader`` with workers fetches a few batches
    ahead, and those must not count). See :meth:`state_dict`.

    Writing a sampler: implement :meth:`plan_epoch`; name in ``RESUME_SETTINGS`` the
    attributes that shape the plan (a nested batchlab sampler, such as a base sampler,
    contributes all of its own settings), and in ``RESUME_DATA`` the content hashes of
    the data it is built from, as ``{state key: (method name, what the data is)}`` where
    ``method(epoch)`` returns the hash. :meth:`state_dict` records them and
    :meth:`load_state_dict` refuses a state saved with other values. Call
    :meth:`check_num_examples` once the dataset size is known, so impossible sizes fail
    at construction.
    """

    #: Attributes a saved state must match besides the seed, batch size, drop_last and split.
    RESUME_SETTINGS: tuple[str, ...] = ()
    #: Content hashes a saved state must match: ``{state key: (method(epoch) -> str, what)}``.
    RESUME_DATA: dict[str, tuple[str, str]] = {}

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
        if isinstance(drop_last, str) or drop_last not in (True, False):
            raise BatchlabInputError(f"drop_last must be True or False, got {drop_last!r}")
        self.drop_last = bool(drop_last)
        self.seed = _check_index("seed", seed, maximum=_SEED_LIMIT)
        self.num_replicas, self.rank = resolve_replicas(num_replicas, rank)
        if self.batch_size % self.num_replicas:
            raise BatchlabInputError(
                f"batch_size ({self.batch_size}) is the global batch and must be divisible by "
                f"num_replicas ({self.num_replicas}); use a multiple of {self.num_replicas}"
            )
        self.epoch = 0
        self._position = 0  # batches of this epoch handed out (pass start + this pass's batches)
        self._pass_start = 0  # where the current pass started
        self._resume_pending = False  # True between load_state_dict and the next __iter__
        self._pass: object | None = None  # token of the live pass; an abandoned pass stops counting
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        self._plan_hash: str | None = None  # plan_fingerprint of the cached plan; reset with the cache

    # -- what subclasses write -------------------------------------------------
    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        """Return this epoch's global batches (lists of dataset indices).

        Must be deterministic given ``generator``. Batches may be shorter than
        ``batch_size`` only at the end; the base class applies ``drop_last``.
        """
        raise NotImplementedError

    def check_num_examples(self, num_examples: int) -> None:
        """Refuse, at construction, dataset sizes whose epochs cannot be split or are empty.

        With ``drop_last=True`` an epoch needs at least one full batch. With ``drop_last=False``
        and several ranks, the last, short global batch must split into equal, non-empty
        shares, so ``num_examples`` must be a multiple of ``num_replicas`` (full batches
        always split evenly: ``batch_size`` is a multiple of ``num_replicas``).
        """
        n, b, world = int(num_examples), self.batch_size, self.num_replicas
        if self.drop_last and n < b:
            raise BatchlabInputError(
                f"drop_last=True with batch_size={b} but only {n} examples: every epoch would be empty; "
                f"use batch_size <= {n} or drop_last=False"
            )
        if not self.drop_last and world > 1 and n % world:
            last = n % b or b
            below, above = n - n % world, n + world - n % world
            raise BatchlabInputError(
                f"{n} examples cannot be split into equal, non-empty shares over num_replicas={world} ranks: "
                f"the last global batch would hold {last} example(s), not a multiple of {world}. Use "
                f"drop_last=True (drops that short batch; the plan moves which examples fall in it each epoch), "
                f"or a dataset of a multiple of {world} examples (e.g. {below} or {above})"
            )

    # -- the contract ----------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next ``__iter__`` yields; its next pass starts clean.

        The one exception: right after :meth:`load_state_dict`, ``set_epoch`` with the
        saved epoch keeps the loaded position (the usual resume loop calls
        ``set_epoch(epoch)`` before iterating).
        """
        epoch = _check_index("epoch", epoch, maximum=_SEED_LIMIT)
        if epoch == self.epoch and self._resume_pending:
            return
        self.epoch = epoch
        self._restart(0, resume=False)

    def _restart(self, position: int, *, resume: bool) -> None:
        self._position = self._pass_start = position
        self._resume_pending = resume
        self._pass = None

    def global_batches(self) -> list[list[int]]:
        """The current epoch's global batches after ``drop_last`` (cached per epoch)."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            self._plan_cache = (self.epoch, self._checked_plan(self.epoch))
            self._plan_hash = None
        return self._plan_cache[1]

    def _plan_for(self, epoch: int) -> list[list[int]]:
        """:meth:`global_batches` of ``epoch`` (``plan_epoch`` reads ``self.epoch``), leaving the epoch as it was."""
        current = self.epoch
        self.epoch = epoch
        try:
            return self.global_batches()
        finally:
            self.epoch = current

    def plan_fingerprint(self, epoch: int | None = None) -> str:
        """A short content hash of ``epoch``'s global batches (default: the current epoch), cached per plan.

        :meth:`state_dict` records it and :meth:`load_state_dict` refuses a state whose epoch
        plan hashes differently, even when every recorded setting matches.
        """
        plan = self._plan_for(self.epoch if epoch is None else epoch)
        if self._plan_hash is None:  # the plan is the cached one: global_batches resets the hash with it
            sizes = np.fromiter((len(b) for b in plan), dtype=np.int64, count=len(plan))
            flat = np.fromiter(itertools.chain.from_iterable(plan), dtype=np.int64, count=int(sizes.sum()))
            self._plan_hash = hashlib.sha1(sizes.tobytes() + flat.tobytes()).hexdigest()[:16]
        return self._plan_hash

    def _checked_plan(self, epoch: int) -> list[list[int]]:
        """``plan_epoch`` for ``epoch`` (== ``self.epoch``), after drop_last, checked for the rank split."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        plan = [list(map(int, b)) for b in self.plan_epoch(generator)]
        if self.drop_last:
            plan = [b for b in plan if len(b) == self.batch_size]
        plan = [b for b in plan if len(b) > 0]
        if not plan:
            raise BatchlabInputError(
                f"epoch {epoch} of {type(self).__name__} has no batch (batch_size={self.batch_size}, "
                f"drop_last={self.drop_last}); use a smaller batch_size or drop_last=False"
            )
        uneven = [i for i, b in enumerate(plan) if len(b) % self.num_replicas]
        if uneven:
            i = uneven[0]
            raise BatchlabInputError(
                f"global batch {i} of epoch {epoch} holds {len(plan[i])} example(s), which do not split into "
                f"equal, non-empty shares over num_replicas={self.num_replicas} ranks; use drop_last=True or "
                f"a dataset of a multiple of {self.num_replicas} examples"
            )
        return plan

    def local_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (equal shares: the plan is checked)."""
        if self.num_replicas == 1:
            return batch
        share = len(batch) // self.num_replicas
        return batch[self.rank * share : (self.rank + 1) * share]

    def __iter__(self) -> Iterator[list[int]]:
        if not self._resume_pending:
            self._restart(0, resume=False)  # a clean pass: nothing of this epoch done yet
        return self._run()

    def _run(self) -> Iterator[list[int]]:
        # The loaded position is taken when the pass *starts*, not at iter(): a DataLoader
        # iterator calls iter(batch_sampler) twice (in __init__ and in _reset) and runs
        # only the second, and torchdata's StatefulDataLoader makes one iterator before
        # it restores the sampler's state.
        plan = self.global_batches()
        start = self._position if self._resume_pending else 0
        self._restart(start, resume=False)
        token = self._pass = object()
        for i in range(start, len(plan)):
            if self._pass is token:  # a newer pass (or set_epoch) took over: stop counting
                self._position = i + 1
            yield self.local_slice(plan[i])

    def __len__(self) -> int:
        return len(self.global_batches())

    def resume_settings(self, epoch: int | None = None) -> dict[str, Any]:
        """The settings and data hashes that shape ``epoch``'s plan (what a state must match)."""
        epoch = self.epoch if epoch is None else epoch
        settings = {key: value for key, value, _ in self._settings(epoch)}
        for key, value in settings.items():
            if isinstance(value, GlobalBatchSampler):
                settings[key] = value.resume_settings(epoch)
        return settings

    def _settings(self, epoch: int) -> Iterator[tuple[str, Any, str | None]]:
        """(state key, value, what the data is, or None for a setting), in checking order."""
        yield "sampler", type(self).__name__, None
        for key in ("seed", "batch_size", "drop_last", "num_replicas", *self.RESUME_SETTINGS):
            yield key, getattr(self, key), None
        for key, (method, what) in self.RESUME_DATA.items():
            yield key, getattr(self, method)(epoch), what

    def state_dict(self, *, consumed: int | None = None) -> dict[str, Any]:
        """Everything needed to resume exactly: the epoch, the position in it, and the settings.

        Parameters
        ----------
        consumed:
            How many batches the training loop has received from the current pass over
            the sampler (``step + 1`` in ``for step, batch in enumerate(loader)``; after a
            resume, the pass starts at the loaded position and ``consumed`` counts from
            there). Give it whenever a ``DataLoader`` with ``num_workers > 0`` sits between
            the sampler and the loop: its workers prefetch batches the loop has not seen.
            Without it, the position is the number of batches the sampler handed out,
            which is exact when the loop iterates the sampler itself, through
            ``num_workers=0``, or through torchdata's ``StatefulDataLoader`` (which calls
            ``state_dict()`` when each batch leaves the sampler and keeps the one that
            matches what the loop received).

        Returns
        -------
        dict
            ``epoch``, ``batches_yielded`` (the position: batches of the epoch done),
            :meth:`resume_settings` and ``plan`` (:meth:`plan_fingerprint` of the epoch);
            plain Python values (JSON- and ``torch.save``-able).
        """
        position = self._position
        if consumed is not None:
            handed = self._position - self._pass_start
            consumed = _check_index("consumed", consumed)
            if consumed > handed:
                raise BatchlabInputError(
                    f"consumed={consumed} but the current pass has handed out only {handed} batches "
                    f"(from position {self._pass_start} of epoch {self.epoch}); count the batches the loop "
                    "received since the last iter(loader) (or set_epoch)"
                )
            position = self._pass_start + consumed
        return {
            "epoch": self.epoch,
            "batches_yielded": position,
            **self.resume_settings(self.epoch),
            "plan": self.plan_fingerprint(self.epoch),
        }

    def check_resume(self, state: dict[str, Any]) -> None:
        """Raise when ``state`` was saved with settings or data that give another plan."""
        if not isinstance(state, dict):
            raise BatchlabInputError(f"a sampler state must be the dict from state_dict(), got {type(state).__name__}")
        epoch = _check_index("the state's epoch", state.get("epoch"), maximum=_SEED_LIMIT)
        settings, data, missing = self._mismatches(state, epoch, "")
        if "plan" not in state:
            missing.append("plan")
        if missing:
            warnings.warn(
                f"the saved sampler state has no {', '.join(missing)} (a state from an older batchlab?); "
                "those settings could not be checked",
                stacklevel=3,
            )
        if settings or data:
            error = BatchlabInputError if settings else StaleArtifactError
            raise error(
                "cannot resume: the saved state gives another plan than this sampler: "
                + "; ".join(settings + data)
                + ". Build the sampler with the settings, and from the data, it had when the state was saved"
            )
        if "plan" in state and state["plan"] != self.plan_fingerprint(epoch):
            # every recorded setting matches, yet the batches differ: something the sampler does not
            # record (e.g. a subclass that leaves its dataset size out of RESUME_SETTINGS) or its code
            raise BatchlabInputError(
                f"cannot resume: epoch {epoch} of the saved state had another plan (hash {state['plan']!r}) than "
                f"this {type(self).__name__} builds ({len(self._plan_for(epoch))} batches, hash "
                f"{self.plan_fingerprint(epoch)!r}), although the settings the state records match: a setting "
                "it does not record differs (e.g. the dataset size), or the sampler's code or torch's random "
                "generator changed. Build the sampler as it was when the state was saved"
            )

    def _mismatches(self, state: dict[str, Any], epoch: int, prefix: str) -> tuple[list[str], list[str], list[str]]:
        settings, data, missing = [], [], []
        for key, mine, what in self._settings(epoch):
            name = prefix + key
            if key not in state:
                missing.append(name)
            elif isinstance(mine, GlobalBatchSampler):
                saved = state[key]
                if not isinstance(saved, dict):
                    settings.append(f"{name} is {saved!r} in the state, a {type(mine).__name__} here")
                    continue
                more = mine._mismatches(saved, epoch, name + ".")
                settings, data, missing = settings + more[0], data + more[1], missing + more[2]
            elif state[key] != mine:
                if what is None:
                    settings.append(f"{name}={state[key]!r} in the state but {name}={mine!r} here")
                else:
                    data.append(
                        f"{name}: the state was built from other {what} (hash {state[key]}), this sampler's "
                        f"{what} hash to {mine}"
                    )
        return settings, data, missing

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next pass starts where the state stopped.

        Refuses (:class:`~batchlab.errors.BatchlabInputError`, or
        :class:`~batchlab.errors.StaleArtifactError` for other data) a state whose
        settings or data hashes differ from this sampler's, or whose epoch plan does
        (:meth:`plan_fingerprint`: the backstop for what the settings do not record, such
        as a dataset size a subclass leaves out). A state saved at the end of
        its epoch, loaded into a sampler already set to a later epoch (torchdata's
        ``StatefulDataLoader`` restores the sampler after your ``set_epoch``), leaves that
        later epoch in place: nothing of the saved epoch is left to resume.
        """
        self.check_resume(state)
        epoch = int(state["epoch"])
        position = _check_index("the state's batches_yielded", state.get("batches_yielded"))
        current = self.epoch
        total = len(self._plan_for(epoch))
        if position > total:
            raise BatchlabInputError(
                f"cannot resume: the state says {position} batches of epoch {epoch} were done but that epoch has "
                f"{total}; was it saved by a sampler with another dataset size?"
            )
        if position == total and current > epoch:
            return
        self.epoch = epoch
        self._restart(position, resume=True)


class ShardedBatchSampler(Sampler[list[int]]):
    """Split the global batches of any batch sampler across ranks.

    Wraps a sampler that yields *global* batches (any ``torch.utils.data`` batch
    sampler, seeded the same on every rank) and yields rank ``rank``'s contiguous
    slice of each, so the batch the loss gathers is the batch the sampler built.
    Every share is equal and non-empty: a global batch whose size is not a multiple of
    ``num_replicas`` raises (at construction when the wrapped sampler is a
    ``torch.utils.data.BatchSampler`` over a sized sampler, whose last batch is known).
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
        if isinstance(batch_sampler, BatchSampler) and hasattr(batch_sampler.sampler, "__len__"):
            n, size = len(batch_sampler.sampler), batch_sampler.batch_size
            sizes = [size] if batch_sampler.drop_last or n % size == 0 else [size, n % size]
            for b in sizes:
                self._check_split(b)

    def _check_split(self, size: int) -> None:
        if size % self.num_replicas:
            raise BatchlabInputError(
                f"a global batch of {size} example(s) cannot be split into equal, non-empty shares over "
                f"{self.num_replicas} ranks; use a batch size and a dataset size that are multiples of "
                f"{self.num_replicas}, or drop_last=True"
            )

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batch_sampler:
            batch = list(batch)
            self._check_split(len(batch))
            share = len(batch) // self.num_replicas
            yield batch[self.rank * share : (self.rank + 1) * share]

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)
        elif hasattr(getattr(self.batch_sampler, "sampler", None), "set_epoch"):
            self.batch_sampler.sampler.set_epoch(epoch)

    def state_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The wrapped sampler's state (``consumed=`` passes through to a batchlab sampler)."""
        if not hasattr(self.batch_sampler, "state_dict"):
            raise BatchlabInputError(
                f"{type(self.batch_sampler).__name__} has no state_dict, so it cannot be resumed exactly"
            )
        return self.batch_sampler.state_dict(**kwargs)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not hasattr(self.batch_sampler, "load_state_dict"):
            raise BatchlabInputError(f"{type(self.batch_sampler).__name__} has no load_state_dict")
        self.batch_sampler.load_state_dict(state)
