"""Batches that are part teacher structure, part uniformly random.

A structured sampler (community groups, mined hard negatives, clusters) fills the first
``batch_size - round(mix_random * batch_size)`` places of every batch; the rest are
drawn uniformly from the examples that no structured part of this epoch used. Every
example is still seen at most once per epoch, the number of batches per epoch is that
of random batches of ``batch_size``, and each batch keeps a share of easy, unrelated
negatives beside the hard ones (the "mixed" batches of practitioners' recipes, and
B3's remark that a few random in-batch negatives keep the easy ones covered).

Example
-------
>>> import torch
>>> from batchlab.samplers import HardNegativeBatchSampler
>>> partners = (torch.arange(16) ^ 1).unsqueeze(1)  # 0 <-> 1, 2 <-> 3, ...
>>> base = HardNegativeBatchSampler(partners, 4, max_neighbourhood_fraction=0.5, seed=0)
>>> sampler = MixedBatchSampler(base, 16, batch_size=8, mix_random=0.5, seed=0)
>>> [len(b) for b in sampler], sorted(i for b in sampler for i in b) == list(range(16))
([8, 8], True)
"""

from __future__ import annotations

from typing import Any

import torch

from batchlab._checks import check_positive_int, check_real
from batchlab.errors import BatchlabInputError
from batchlab.samplers.base import GlobalBatchSampler, epoch_seed


class MixedBatchSampler(GlobalBatchSampler):
    """Each batch: one structured batch of ``base`` plus uniformly random examples.

    Parameters
    ----------
    base:
        The structured sampler; its ``batch_size`` must be ``batch_size - round(mix_random
        * batch_size)``. Its plan for the same epoch supplies the structured parts (in
        its order; its short batches are not used).
    num_examples:
        Dataset size ``N``.
    batch_size:
        Size of the mixed (global) batch.
    mix_random:
        Share of each batch drawn uniformly at random, in ``[0, 1)``; 0 gives ``base``'s
        batches (the first ``N // batch_size`` of them, then the examples they left out).
    **kwargs:
        ``drop_last``, ``seed``, ``num_replicas``, ``rank``, as in
        :class:`~batchlab.samplers.base.GlobalBatchSampler`; ``seed`` draws the random parts.
    """

    def __init__(
        self,
        base: GlobalBatchSampler,
        num_examples: int,
        *,
        batch_size: int,
        mix_random: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        self.num_examples = check_positive_int("num_examples", num_examples)
        if not isinstance(base, GlobalBatchSampler):
            raise BatchlabInputError(
                f"base must be a batchlab sampler (a GlobalBatchSampler, e.g. HardNegativeBatchSampler), "
                f"got {type(base).__name__}"
            )
        base_n = getattr(base, "num_examples", None)
        if base_n is not None and base_n != self.num_examples:
            raise BatchlabInputError(
                f"the structured sampler covers {base_n} examples but num_examples={num_examples}; both must "
                f"describe the same dataset (num_examples={base_n})"
            )
        self.check_num_examples(self.num_examples)
        if not 0.0 <= check_real("mix_random", mix_random) < 1.0:
            raise BatchlabInputError(f"mix_random must be in [0, 1) (the random share of a batch), got {mix_random!r}")
        self.mix_random = float(mix_random)
        self.num_random = random_share(self.batch_size, self.mix_random)
        if base.batch_size != self.batch_size - self.num_random:
            raise BatchlabInputError(
                f"the structured sampler builds batches of {base.batch_size}, but with mix_random={mix_random} "
                f"batches of {self.batch_size} need {self.batch_size - self.num_random} structured examples; "
                f"build it with batch_size={self.batch_size - self.num_random}"
            )
        self.base = base

    def plan_epoch(self, generator: torch.Generator) -> list[list[int]]:
        size, n = self.batch_size - self.num_random, self.num_examples
        steps = n // self.batch_size  # random batches' count; what is left over goes in a last, random batch
        self.base.set_epoch(self.epoch)
        structured = [b for b in self.base.global_batches() if len(b) == size][:steps]
        used = torch.zeros(n, dtype=torch.bool)
        for batch in structured:
            if min(batch) < 0 or max(batch) >= n:
                raise BatchlabInputError(
                    f"the structured sampler gave example ids outside [0, {n}) (num_examples); build both "
                    "samplers over the same dataset"
                )
            used[batch] = True
        # the base was seeded like this sampler: a stream of our own, or the random parts would
        # replay the base's first permutation (e.g. a random base's next batches)
        own = torch.Generator().manual_seed(epoch_seed(int(torch.randint(2**62, (1,), generator=generator)), 1))
        pool = torch.randperm(n, generator=own)
        pool = pool[~used[pool]].tolist()
        r = self.num_random
        batches = [batch + pool[i * r : (i + 1) * r] for i, batch in enumerate(structured)]
        rest = pool[len(structured) * r :]  # examples left when the structured batches ran out
        batches += [rest[i : i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
        return batches

    # "base": the structured sampler's own settings and data hashes, checked on resume
    RESUME_SETTINGS = ("mix_random", "num_examples", "base")


def random_share(batch_size: int, mix_random: float) -> int:
    """How many of a batch's ``batch_size`` places ``mix_random`` gives to random examples."""
    return int(round(float(mix_random) * batch_size))
